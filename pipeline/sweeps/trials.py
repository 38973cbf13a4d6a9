"""One trial's life: ask's parameters → a trial spec → train (reporting epochs, pruning) → tell, with its
nested MLflow run. Whatever goes wrong inside a trial (an invalid combination, an impossible architecture,
a crash, a divergence) fails that trial only, with its reason.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.runfiles import Cost, read_run_fields
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec
from pipeline.specs.sweep import COST_KEYS, Sweep
from pipeline.sweeps.space import InvalidTrial, build_trial_spec, check_trial_buildable, sample_candidate, trial_name
from pipeline.sweeps.storage import STALE_AFTER_S, requeue


@dataclass(frozen=True)
class SweepJob:
    """What a worker process needs (picklable: workers are spawned, not forked). It lives here, not in
    workers.py, because a trial and its MLflow run read it too, and workers.py imports this module."""

    sweep_path: str
    specs_dir: str
    storage_url: str
    study_name: str
    data_dir: str
    runs_dir: str
    tracking_uri: str | None
    parent_run_id: str | None
    deadline: float | None  # time.time() after which no trial starts
    seed: int
    threads: int | None = None
    worker: int = 0


def mlflow_experiment(sweep_name: str) -> str:
    return f"sweeps/{sweep_name}"


def mlflow_params(obj: Any) -> dict[str, str]:
    """Flattened params with MLflow-legal keys: model.layers[0].channels → model.layers.0.channels."""
    from pipeline.engine.tracking import flatten
    return {k.replace("[", ".").replace("]", ""): v for k, v in flatten(obj).items()}


def end_orphan_runs(tracking_uri: str | None, sweep_name: str, study_name: str) -> Callable[[Any], None] | None:
    """A hook for recover_interrupted: the MLflow runs a dead worker left RUNNING for a trial are marked
    KILLED (a retry that resumes the trial's checkpoint reopens its run)."""
    if tracking_uri is None:
        return None

    def end(trial) -> None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(mlflow_experiment(sweep_name))
        if exp is None:
            return
        for run in client.search_runs([exp.experiment_id], filter_string=(
                f"tags.`sweep.study` = '{study_name}' and tags.`sweep.trial` = '{trial.number}' and "
                "attributes.status = 'RUNNING'")):
            client.set_terminated(run.info.run_id, "KILLED")
    return end


# ── one trial ────────────────────────────────────────────────────────────────
class TrialMonitor:
    """The per-epoch callback: reports the validation metric to Optuna and prunes."""

    def __init__(self, trial, metric: str, report: bool, prune: bool):
        self.trial, self.metric, self.report, self.prune = trial, metric, report, prune
        self.rows: list[dict] = []

    def __call__(self, epoch: int, row: dict) -> None:
        import optuna
        self.rows.append(row)
        value = row.get(self.metric)
        if self.report and value is not None and math.isfinite(value):
            self.trial.report(value, epoch)
            if self.prune and self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.metric}={value:.4g}")


def _replay_history(trial, run_dir: Path, spec: ExperimentSpec, metric: str) -> None:
    """A retried trial resumes its run's checkpoint: report the epochs it already has, so the pruner sees them."""
    import torch

    from pipeline.engine.train import CHECKPOINT
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("spec_hash") != spec.spec_hash():
        return
    for row in ckpt["state"]["history"]:
        value = row.get(metric)
        if value is not None and math.isfinite(value):
            trial.report(value, int(row["epoch"]))


def _checkpoint_epoch(run_dir: Path) -> int:
    import torch

    from pipeline.engine.train import CHECKPOINT
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["state"]["epoch"])


class ChildRun:
    """The trial's nested MLflow run: found (training made it) or created (an invalid trial never trained)."""

    def __init__(self, job: SweepJob, sweep: Sweep, trial, candidate: str, name: str):
        self.job, self.sweep, self.trial, self.candidate, self.name = job, sweep, trial, candidate, name

    @property
    def enabled(self) -> bool:
        return self.job.tracking_uri is not None

    def tags(self, state: str) -> dict[str, str]:
        return {"sweep": self.sweep.name, "sweep.study": self.job.study_name, "sweep.trial": str(self.trial.number),
                "sweep.candidate": self.candidate, "candidate_kind": self.sweep.bases[self.candidate].model.kind,
                "state": state}

    def find(self) -> str | None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=self.job.tracking_uri)
        exp = client.get_experiment_by_name(mlflow_experiment(self.sweep.name))
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                  filter_string=f"tags.`sweep.study` = '{self.job.study_name}' and "
                                                f"tags.`sweep.trial` = '{self.trial.number}'")
        return runs[0].info.run_id if runs else None

    def close_interrupted(self, study, root: int) -> None:
        """A retry closes the runs its interrupted predecessors left RUNNING (their worker died unseen) as KILLED.
        Resuming the checkpoint on the same machine reopens its run; on another machine the retry starts afresh."""
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState
        lost = {str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.user_attrs.get("interrupted") and int(t.user_attrs.get("retry_of", t.number)) == root}
        client = MlflowClient(tracking_uri=self.job.tracking_uri)
        exp = client.get_experiment_by_name(mlflow_experiment(self.sweep.name))
        if not lost or exp is None:
            return
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`sweep.study` = "
                                      f"'{self.job.study_name}' and attributes.status = 'RUNNING'"):
            if run.data.tags.get("sweep.trial") in lost:
                client.set_tag(run.info.run_id, "state", "interrupted")
                client.set_terminated(run.info.run_id, status="KILLED")

    def finish(self, run_id: str | None, state: str, reason: str | None = None, rows: list[dict] | None = None,
               from_epoch: int = 0, values: dict[str, Any] | None = None) -> None:
        """Tag the run with its state; a pruned run gets the epochs its trainer had not flushed yet."""
        if not self.enabled:
            return
        from pipeline.engine.tracking import Tracker
        tracker = Tracker(self.job.tracking_uri, mlflow_experiment(self.sweep.name), run_id=run_id,
                          run_name=self.name, parent_run_id=self.job.parent_run_id)
        tags = self.tags(state)
        if reason:
            tags["fail_reason"] = reason[:5000]
        tracker.set_tags(tags)
        if values is not None:
            tracker.log_params(mlflow_params(values))
        for row in rows or []:
            if row["epoch"] > from_epoch:
                tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")}, step=row["epoch"])
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
        tracker.end(status)


def _fail(study, trial, reason: str, child: ChildRun, run_id: str | None = None,
          values: dict[str, Any] | None = None) -> None:
    from optuna.trial import TrialState
    trial.set_user_attr("fail_reason", reason)
    print(f"[sweep {child.sweep.name}] trial {trial.number} ({child.candidate}) failed: {reason}", file=sys.stderr)
    child.finish(run_id, "failed", reason=reason, values=values)
    tell(study, trial, state=TrialState.FAIL)


def run_trial(study, trial, sweep: Sweep, data, job: SweepJob) -> None:
    """Sample, build, train and tell one trial. Whatever goes wrong inside a trial fails that trial only."""
    from pipeline.io import atomic_write_text
    from pipeline.specs.experiment import spec_to_yaml

    candidate, values = sample_candidate(trial, sweep)
    root = int(trial.user_attrs.get("retry_of", trial.number))  # a retry resumes its original's run folder
    name = trial_name(sweep.name, root)
    run_dir = Path(job.runs_dir) / f"trial-{root:04d}"
    trial.set_user_attr("kind", sweep.bases[candidate].model.kind)
    trial.set_user_attr("run_dir", str(run_dir))
    child = ChildRun(job, sweep, trial, candidate, name)
    if child.enabled and "retry_of" in trial.user_attrs:
        child.close_interrupted(study, root)
    try:
        spec = build_trial_spec(sweep, candidate, values, name,
                                f"Sweep {sweep.name}, trial {root}: candidate {candidate}.")
        check_trial_buildable(spec, data.meta)
    except InvalidTrial as err:
        _fail(study, trial, str(err), child, values=values)
        return
    spec_file = run_dir / "spec.yaml"
    atomic_write_text(spec_file, spec_to_yaml(spec, os.path.relpath(Path(job.specs_dir) / "schema.json", run_dir)))
    _train_and_tell(study, trial, sweep, data, job, spec, spec_file, child)


def _train_and_tell(study, trial, sweep: Sweep, data, job: SweepJob, spec: ExperimentSpec, spec_file: Path,
                    child: ChildRun) -> None:
    """Train the trial's spec, reporting each epoch to the pruner, and tell the study how it ended."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.engine.train import train_experiment

    run_dir = spec_file.parent
    metric = sweep.spec.objective.metric
    single = not sweep.multi_objective
    monitor = TrialMonitor(trial, metric, report=single, prune=single and sweep.spec.pruner.name != "none")
    if single:
        _replay_history(trial, run_dir, spec, metric)
    try:
        metrics = train_experiment(spec, spec_file, data, run_dir, job.tracking_uri, callbacks=[monitor],
                                   progress=False, parent_run_id=job.parent_run_id, extra_tags=child.tags("running"),
                                   experiment=mlflow_experiment(sweep.name))
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("pruned_at_epoch", monitor.rows[-1]["epoch"] if monitor.rows else 0)
        if child.enabled:
            child.finish(child.find(), "pruned", reason=str(pruned), rows=monitor.rows,
                         from_epoch=_checkpoint_epoch(run_dir))
        tell(study, trial, state=TrialState.PRUNED)
        return
    except KeyboardInterrupt:
        if child.enabled:
            with contextlib.suppress(Exception):
                child.finish(child.find(), "interrupted")
        requeue(study, study._storage.get_trial(trial._trial_id))
        raise
    except UserError:
        raise  # the sweep itself is wrong (not this trial): stop, exit 2
    except Exception as err:  # noqa: BLE001 - a crash in one trial must not end the study
        traceback.print_exc()
        _fail(study, trial, f"training crashed: {type(err).__name__}: {err}", child,
              run_id=child.find() if child.enabled else None)
        return
    finish_trial(study, trial, sweep, metrics, run_dir, child)


def _cost_values(run_dir: Path) -> dict:
    """The trial run's cost.json; {} without one (an objective that needs it then fails the trial, naming it)."""
    return read_run_fields(run_dir, Cost)


def finish_trial(study, trial, sweep: Sweep, metrics: dict, run_dir: Path, child: ChildRun) -> None:
    metric = sweep.spec.objective.metric
    value = metrics["best"].get(metric, metrics["final"].get(metric))
    cost = _cost_values(run_dir)
    for key in COST_KEYS.values():
        if key in cost:
            trial.set_user_attr(key, cost[key])
    trial.set_user_attr("status", metrics["status"])
    trial.set_user_attr("epochs", metrics["epochs"])
    run_id = metrics.get("mlflow_run_id")
    if metrics["status"] == "diverged" or value is None or not math.isfinite(value):
        _fail(study, trial, f"diverged: {metric}={value} (NaN or Inf loss)" if metrics["status"] == "diverged"
              else f"no finite {metric} in the run's metrics", child, run_id=run_id)
        return
    values = [float(value)]
    for cost_name in sweep.spec.objective.costs:
        if COST_KEYS[cost_name] not in cost:
            _fail(study, trial, f"cost.json has no {COST_KEYS[cost_name]} (needed by the {cost_name} objective)",
                  child, run_id=run_id)
            return
        values.append(float(cost[COST_KEYS[cost_name]]))
    child.finish(run_id, "complete")
    tell(study, trial, values)


def tell(study, trial, values=None, state=None) -> None:
    """Tell the study how the trial ended, unless another host already took it for dead (no heartbeat reached
    the study for STALE_AFTER_S) and queued it again: then its retry counts, and this result is dropped."""
    from optuna.trial import TrialState
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        print(f"archlab: trial {trial.number} was taken for dead by a worker on another host and queued again (no "
              f"heartbeat for {STALE_AFTER_S:.0f} s); this result is dropped and the retry counts", file=sys.stderr)
        return
    study.tell(trial, values, state=state, skip_if_finished=True)  # a recovery at this very moment: no crash

