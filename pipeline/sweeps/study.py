"""Optuna sweeps across architectures: storage, sampler and pruner, workers, trials, MLflow.

A sweep (pipeline/sweep_spec.py) names candidate experiment specs that compete over conditional spaces.
Workers (processes on this machine, or on other machines given the same database URL) share one study.
Optuna stores neither sampler nor pruner, so every worker builds both from the spec. A trial records the
host and pid of its worker and a heartbeat; a RUNNING trial whose worker is gone is marked failed and its
parameters are queued again, so a rerun continues the study where it stopped. Whatever goes wrong inside a
trial (an invalid combination, an impossible architecture, a crash, a divergence) fails that trial only,
with its reason.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.engine import interrupts
from pipeline.engine.repeats import available_cores
from pipeline.engine.runfiles import Cost, read_run_fields
from pipeline.specs.errors import UserError
from pipeline.specs.experiment import ExperimentSpec
from pipeline.specs.sweep import COST_KEYS, Sweep, load_sweep
from pipeline.sweeps.space import InvalidTrial, build_trial_spec, check_trial_buildable, grid_points, sample_candidate, trial_name

# ── storage, sampler, pruner ─────────────────────────────────────────────────
RDB_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")
DEFAULT_STORAGE = "journal"  # measured in bench/bench_sweep.py: see the report there


def default_storage_url(sweeps_dir: str | Path, name: str) -> str:
    folder = Path(sweeps_dir)
    if DEFAULT_STORAGE == "journal":
        return str(folder / f"{name}.journal")
    return f"sqlite:///{folder / f'{name}.db'}"


def open_storage(url: str):
    """An RDB URL (sqlite:///..., postgresql://...) or a journal file path (JournalStorage, append-only log)."""
    import optuna
    if url.startswith(RDB_SCHEMES):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # Wait for the write lock instead of failing after SQLite's default 5 s.
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        from pipeline.sweeps.dblock import SERVER_SCHEMES, server_lock
        if url.startswith(SERVER_SCHEMES):
            with server_lock(url, "archlab-optuna-tables"):  # hosts starting at once race to create the tables
                return optuna.storages.RDBStorage(url)
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    path = Path(url).resolve()  # absolute: a relative one makes the lock's symlink dangle, and a stale lock
    path.parent.mkdir(parents=True, exist_ok=True)  # left by a killed worker is then never broken (a hang)
    return JournalStorage(JournalFileBackend(str(path)))


def lock_path(url: str) -> Path | None:
    """A file lock beside a local storage makes 'count the budget, then ask a trial' atomic across workers."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///") + ".sweep-lock")
    if url.startswith(RDB_SCHEMES):
        return None  # a server: no shared disk; budget_lock holds a lock in the server instead
    return Path(url + ".sweep-lock")


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def budget_lock(url: str, study_name: str):
    """Makes 'count the budget, then ask a trial' atomic for every worker of the study: a lock in the database
    server for PostgreSQL/MySQL (workers on several machines), else a file lock beside the local storage."""
    from pipeline.sweeps.dblock import SERVER_SCHEMES, server_lock
    if url.startswith(SERVER_SCHEMES):
        return server_lock(url, f"archlab-sweep:{study_name}")
    return file_lock(lock_path(url))


class _SameCandidate:
    """A view of a study holding only one candidate's trials: what a median pruner compares with."""

    def __init__(self, study, candidate: str):
        self._study, self._candidate = study, candidate

    @property
    def direction(self):
        return self._study.direction

    @property
    def directions(self):
        return self._study.directions

    def get_trials(self, deepcopy: bool = True, states=None):
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.params.get("candidate") == self._candidate]


def make_pruner(sweep: Sweep):
    import optuna

    class PerCandidatePruner(optuna.pruners.BasePruner):
        """Compare a trial only with trials of its own architecture: a slow starter is not judged by a fast one."""

        def __init__(self, inner):
            self.inner = inner

        def prune(self, study, trial) -> bool:
            return self.inner.prune(_SameCandidate(study, trial.params.get("candidate")), trial)

    p = sweep.spec.pruner
    if p.name == "median":
        # Epochs are reported as steps 1, 2, ...: warmup_epochs=1 lets pruning start at epoch 2.
        return PerCandidatePruner(optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials,
                                                              n_warmup_steps=p.warmup_epochs + 1))
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=sweep.epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def make_sampler(sweep: Sweep, seed: int):
    import optuna
    s = sweep.spec.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "tpe":
            # group=True: the space is conditional, so TPE models each candidate's sub-space jointly.
            return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed, multivariate=True,
                                              group=True, constant_liar=True)
        if s.name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=seed)
        # random, and grid (whose points are all queued up front; the sampler never gets asked)
        return optuna.samplers.RandomSampler(seed=seed)


# ── study state: budget, interrupted trials ──────────────────────────────────
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # a trial on another machine silent this long is taken for dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_orphan(trial, host: str, now: float) -> bool:
    attrs = trial.user_attrs
    if attrs.get("worker_host") == host and "worker_pid" in attrs:
        return not _pid_alive(int(attrs["worker_pid"]))
    beat = attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else now)
    return now - float(beat) > STALE_AFTER_S


def requeue(study, trial) -> bool:
    """Mark a trial interrupted and failed, then queue its parameters again. Only the caller that wins the
    RUNNING → FAIL transition queues the retry, so two processes recovering at once queue it once."""
    import optuna
    from optuna.trial import TrialState
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    root = trial.user_attrs.get("retry_of", trial.number)
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": root})
    return True


def recover_interrupted(study, on_recovered: Callable[[Any], None] | None = None) -> list[int]:
    """Trials left RUNNING by a worker that died: marked failed (interrupted) and queued again;
    `on_recovered(trial)` then tidies what else the dead worker left (its MLflow run)."""
    from optuna.trial import TrialState
    host, now = socket.gethostname(), time.time()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_orphan(trial, host, now) and requeue(study, trial):
            recovered.append(trial.number)
            if on_recovered is not None:
                on_recovered(trial)
    return recovered


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


def trials_used(study) -> int:
    """Trials that count against the budget: finished or running, except those a dead worker interrupted."""
    from optuna.trial import TrialState
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("interrupted"))


def has_waiting(study) -> bool:
    from optuna.trial import TrialState
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


@contextlib.contextmanager
def heartbeat(study, trial) -> Iterator[None]:
    """Stamp the trial every HEARTBEAT_S seconds, so workers elsewhere can tell it from a dead one."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                study._storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


# ── one worker ───────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class SweepJob:
    """What a worker process needs (picklable: workers are spawned, not forked)."""

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


def _load_study(job: SweepJob, sweep: Sweep):
    import optuna
    return optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage_url),
                             sampler=make_sampler(sweep, job.seed), pruner=make_pruner(sweep))


def _budget_left(study, sweep: Sweep, job: SweepJob) -> bool:
    if job.deadline is not None and time.time() >= job.deadline:
        return False
    if sweep.spec.sampler.name == "grid":
        return has_waiting(study) and (sweep.spec.budget.trials is None or trials_used(study) < sweep.spec.budget.trials)
    return sweep.spec.budget.trials is None or trials_used(study) < sweep.spec.budget.trials


def run_worker(job: SweepJob) -> int:
    """Ask, train and tell trials until the budget is spent. Returns the number of trials this worker ran."""
    import optuna

    from pipeline.data.prepare import load_prepared
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.threads:
        import torch
        torch.set_num_threads(job.threads)
    sweep = load_sweep(job.sweep_path, job.specs_dir)
    data = load_prepared(job.data_dir)
    study = _load_study(job, sweep)
    host, pid = socket.gethostname(), os.getpid()
    tidy = end_orphan_runs(job.tracking_uri, sweep.name, job.study_name)
    ran = 0
    while True:
        interrupts.check()  # a Ctrl-C noted while the last trial was told stops here, before a new one is asked
        with budget_lock(job.storage_url, job.study_name):
            recover_interrupted(study, tidy)
            if not _budget_left(study, sweep, job):
                break
            trial = study.ask()
            # Set while still under the lock: from here on the trial is visibly owned by a live process.
            trial.set_user_attr("worker_host", host)
            trial.set_user_attr("worker_pid", pid)
        with heartbeat(study, trial):
            run_trial(study, trial, sweep, data, job)
        ran += 1
    return ran


def _worker_main(job: SweepJob) -> None:
    """Entry point of a spawned worker process: exit 2 on a user error, as the CLI does."""
    try:
        with interrupts.deferred():  # the terminal's Ctrl-C reaches every worker: each stops between steps
            run_worker(job)
    except UserError as err:
        print(f"archlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


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


def sweep_inputs(sweep: Sweep, data_meta: dict) -> dict:
    """What a sweep reads, as content hashes: its own spec, each candidate's spec, its dataset. The DVC sweep
    stage depends on this digest, so editing a spec the sweep does not use leaves the sweep up to date."""
    import hashlib
    own = hashlib.sha256(json.dumps(sweep.spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    return {"sweep": own, "candidates": {key: base.spec_hash() for key, base in sorted(sweep.bases.items())},
            "data": {sweep.dataset: data_meta.get("content_hash")}}


def mlflow_experiment(sweep_name: str) -> str:
    return f"sweeps/{sweep_name}"


def mlflow_params(obj: Any) -> dict[str, str]:
    """Flattened params with MLflow-legal keys: model.layers[0].channels → model.layers.0.channels."""
    from pipeline.engine.tracking import flatten
    return {k.replace("[", ".").replace("]", ""): v for k, v in flatten(obj).items()}


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
        from optuna.trial import TrialState
        from mlflow.tracking import MlflowClient
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
    study.tell(trial, state=TrialState.FAIL)


def run_trial(study, trial, sweep: Sweep, data, job: SweepJob) -> None:
    """Sample, build, train and tell one trial. Whatever goes wrong inside a trial fails that trial only."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.io import atomic_write_text
    from pipeline.specs.experiment import spec_to_yaml
    from pipeline.engine.train import train_experiment

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
        study.tell(trial, state=TrialState.PRUNED)
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
    study.tell(trial, values)


# ── the whole sweep (what `archlab sweep` calls) ─────────────────────────────
@dataclass
class SweepResult:
    study_name: str
    storage_url: str
    report_dir: Path
    trials: int  # finished trials in the study
    ran: int  # of which this command ran
    recovered: list[int]
    best: dict[str, Any]
    per_architecture: str  # the best trial of each candidate, a text table for the terminal
    complete: bool = True  # the budget is spent (False: a worker died and the rest stopped short of it)
    dead_workers: list[str] = field(default_factory=list)  # one line each


def preflight(sweep: Sweep, data) -> None:
    """Before any trial: each candidate builds on the data, and reports the objective's metric."""
    from pipeline.engine.checks import check_buildable
    from pipeline.engine.tasks import make_task
    from pipeline.engine.train import evaluate_split
    metric = sweep.spec.objective.metric
    for key, base in sweep.bases.items():
        model, _ = check_buildable(base, data.meta, sweep.base_paths[key])
        task = make_task(base.task, data.meta)
        t = data.tensors
        available = [f"val/{k}" for k in evaluate_split(model, task, t["val_x"][:8], t["val_y"][:8])]
        if metric not in available:
            raise UserError(sweep.path, f"{metric} is not a validation metric of candidate {key!r} (task "
                            f"{base.task} reports: {', '.join(available)})", field="objective.metric")


def open_study(sweep: Sweep, storage_url: str, seed: int):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=sweep.study_name, storage=open_storage(storage_url),
                                directions=sweep.directions, sampler=make_sampler(sweep, seed),
                                pruner=make_pruner(sweep), load_if_exists=True)
    objectives = [sweep.spec.objective.metric, *sweep.spec.objective.costs]
    if study.metric_names != objectives:  # the dashboard's axis labels: val/accuracy, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since 3.2 in practice
            study.set_metric_names(objectives)
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", sweep.name)
        study.set_user_attr("objectives", objectives)
        study.set_user_attr("candidates", list(sweep.spec.candidates))
    return study


def _parent_run(sweep: Sweep, study, tracking_uri: str | None):
    if tracking_uri is None:
        return None
    from pipeline.engine.tracking import Tracker, source_tags
    tracker = Tracker(tracking_uri, mlflow_experiment(sweep.name), run_id=study.user_attrs.get("mlflow_parent_run_id"),
                      run_name=study.study_name)
    if study.user_attrs.get("mlflow_parent_run_id") != tracker.run_id:
        study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
    tracker.log_params(mlflow_params({k: v for k, v in sweep.spec.model_dump(mode="json").items()
                                      if k != "description"}))
    tracker.set_tags({"sweep": sweep.name, "sweep.study": study.study_name, "sweep.role": "parent",
                      **source_tags(sweep.path, sweep.spec.description)})
    tracker.log_artifact(sweep.path)
    return tracker


def _spawn_workers(jobs: list[SweepJob], on_exit: Callable[[int, int], None]) -> list[int]:
    """Run the workers to the end → their exit codes; `on_exit(worker, code)` as each one ends. Ctrl-C or
    SIGTERM stops every one of them."""
    import multiprocessing
    from multiprocessing.connection import wait
    ctx = multiprocessing.get_context("spawn")  # forking a process that holds torch threads is unsafe
    procs = [ctx.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{job.worker}") for job in jobs]
    in_main = threading.current_thread() is threading.main_thread()  # only there may a handler be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None  # SIGTERM stops the workers too
    try:
        for p in procs:
            p.start()
        running = dict(enumerate(procs))
        while running:
            # Reap each worker as it ends: a dead one left a zombie looks alive to the others' pid check,
            # and its trial would wait for the end of the sweep to be taken up again.
            ended = wait([p.sentinel for p in running.values()])
            for worker, p in [(k, p) for k, p in running.items() if p.sentinel in ended]:
                p.join()
                del running[worker]
                on_exit(worker, p.exitcode)
    except KeyboardInterrupt:
        _stop_workers(procs)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return [p.exitcode for p in procs]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_workers(procs) -> None:
    """Workers got the terminal's SIGINT too and queue their trials again; one that does not stop is asked
    again, then terminated, then killed, so that nothing outlives the sweep."""
    deadline = time.monotonic() + 10
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for ask, wait in ((lambda p: os.kill(p.pid, signal.SIGINT), 20), (lambda p: p.terminate(), 5),
                      (lambda p: p.kill(), 5)):
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                ask(p)
        for p in alive:
            p.join(timeout=wait)


def _worker_death(worker: int, code: int) -> str | None:
    """One line for a worker that did not end by itself (killed by a signal, or crashed); None if it did."""
    if code in (0, 2):  # done, or stopped on a user error it reported itself
        return None
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"crashed (exit status {code})"
    return f"sweep worker {worker} {how}; its trial is queued again and the other workers went on"


def run_sweep(sweep: Sweep, data_dir: str | Path, runs_dir: str | Path, report_dir: str | Path,
              storage_url: str, workers: int = 1, tracking_uri: str | None = None,
              specs_dir: str | Path = "specs") -> SweepResult:
    """Create or continue the study, run K workers until the budget is spent, then write the report."""
    from pipeline.data.prepare import load_prepared
    from pipeline.specs.errors import refuse_unless_ours
    from pipeline.sweeps.report import REPORT_KIND, best_summary, terminal_table, write_report
    refuse_unless_ours(report_dir, REPORT_KIND)  # before any trial: the report must have somewhere to go
    data = load_prepared(data_dir)
    preflight(sweep, data)
    study = open_study(sweep, storage_url, sweep.spec.seed)
    tidy = end_orphan_runs(tracking_uri, sweep.name, study.study_name)
    with budget_lock(storage_url, sweep.study_name):
        recovered = recover_interrupted(study, tidy)
        if sweep.spec.sampler.name == "grid":
            for point in grid_points(sweep):
                study.enqueue_trial(point, skip_if_exists=True)
        parent = _parent_run(sweep, study, tracking_uri)  # under the lock: hosts starting at once share one
    before = trials_used(study)
    deadline = time.time() + sweep.spec.budget.timeout_s if sweep.spec.budget.timeout_s else None
    threads = max(1, available_cores() // workers)
    jobs = [SweepJob(sweep_path=str(sweep.path), specs_dir=str(specs_dir), storage_url=storage_url,
                     study_name=sweep.study_name, data_dir=str(data_dir), runs_dir=str(runs_dir),
                     tracking_uri=tracking_uri, parent_run_id=parent.run_id if parent else None, deadline=deadline,
                     seed=sweep.spec.seed + 1000 * k + before, threads=threads, worker=k) for k in range(workers)]
    dead: list[str] = []
    try:
        if workers == 1:
            with interrupts.deferred():  # in-process: keep this process's threads
                run_worker(SweepJob(**{**jobs[0].__dict__, "threads": None}))
        else:
            def on_exit(worker: int, code: int) -> None:
                line = _worker_death(worker, code)
                if line is not None:
                    print(f"archlab: {line}", file=sys.stderr)
                    dead.append(line)
                    with budget_lock(storage_url, sweep.study_name):  # its trial and MLflow run, now, not at the end
                        recovered.extend(recover_interrupted(study, tidy))

            codes = _spawn_workers(jobs, on_exit)
            if any(code == 2 for code in codes):
                raise UserError(sweep.path, "a worker stopped on an error in the sweep (see above)")
    except BaseException:
        with contextlib.suppress(Exception), budget_lock(storage_url, sweep.study_name):
            recover_interrupted(study, tidy)  # what stopped workers left running: failed, queued, runs KILLED
        if parent is not None:
            parent.end("KILLED")
        raise
    study = open_study(sweep, storage_url, sweep.spec.seed)
    with budget_lock(storage_url, sweep.study_name):
        recovered += recover_interrupted(study, tidy)  # a dead worker's trial the survivors did not take up
    complete = not _budget_left(study, sweep, jobs[0])
    write_report(study, sweep, Path(report_dir), storage_url, specs_dir=Path(specs_dir))
    best = best_summary(study, sweep)
    if parent is not None:
        parent.log_metrics({k: v for k, v in best.items() if isinstance(v, (int, float))}, step=trials_used(study))
        parent.set_tags({"best_trial": str(best.get("trial", "")), "best_candidate": str(best.get("candidate", ""))})
        for path in sorted(Path(report_dir).iterdir()):
            if path.is_file():
                parent.log_artifact(path, "report")
        parent.end("FINISHED" if complete else "KILLED")
    return SweepResult(study.study_name, storage_url, Path(report_dir), trials_used(study),
                       trials_used(study) - before, recovered, best, terminal_table(study, sweep), complete=complete,
                       dead_workers=dead)
