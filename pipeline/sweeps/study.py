"""Optuna sweeps across architectures: what `archlab sweep` calls.

A sweep (pipeline/specs/sweep.py) names candidate experiment specs that compete over conditional spaces.
run_sweep opens or continues the study, runs its workers (pipeline/sweeps/workers.py) until the budget is
spent, then writes the report. Storage, locks and recovery live in storage.py; one trial's life in trials.py.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.repeats import available_cores
from pipeline.specs.errors import UserError
from pipeline.specs.sweep import Sweep
from pipeline.sweeps.space import grid_points
from pipeline.sweeps.storage import (budget_lock, make_pruner, make_sampler, open_storage, recover_interrupted,
                                     trials_used)
from pipeline.sweeps.trials import SweepJob, end_orphan_runs, mlflow_experiment, mlflow_params
from pipeline.sweeps.workers import budget_left, run_workers, worker_death

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta


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


def require_validation(sweep: Sweep, meta: DataMeta) -> None:
    """A sweep ranks its trials by a validation metric: data without a validation split is refused."""
    from pipeline.data.prepare import has_validation
    if not has_validation(meta):
        raise UserError(sweep.path, f"the sweep ranks trials by {sweep.spec.objective.metric}, a validation "
                        f"metric, but dataset {meta.name!r} has no validation split (its split.val_fraction is 0)",
                        field="objective.metric")


def preflight(sweep: Sweep, data) -> None:
    """Before any trial: the data has a validation split, each candidate builds on it, and reports the
    objective's metric."""
    from pipeline.engine.checks import check_buildable
    from pipeline.engine.tasks import make_task
    from pipeline.engine.train import evaluate_split
    require_validation(sweep, data.meta)
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


def sweep_inputs(sweep: Sweep, data_meta: DataMeta) -> dict:
    """What a sweep reads, as content hashes: its own spec, each candidate's spec, its dataset. The DVC sweep
    stage depends on this digest, so editing a spec the sweep does not use leaves the sweep up to date."""
    import hashlib
    own = hashlib.sha256(json.dumps(sweep.spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    return {"sweep": own, "candidates": {key: base.spec_hash() for key, base in sorted(sweep.bases.items())},
            "data": {sweep.dataset: data_meta.content_hash}}



def _start(sweep: Sweep, study, storage_url: str, tracking_uri: str | None,
           tidy: Callable[[Any], None] | None) -> tuple[list[int], Any]:
    """Under the budget lock: recover what dead workers left, queue a grid's points, open the parent MLflow run
    (hosts starting at once share one) → (recovered trial numbers, the parent run's tracker or None)."""
    with budget_lock(storage_url, sweep.study_name):
        recovered = recover_interrupted(study, tidy)
        if sweep.spec.sampler.name == "grid":
            for point in grid_points(sweep):
                study.enqueue_trial(point, skip_if_exists=True)
        return recovered, _parent_run(sweep, study, tracking_uri)


def _jobs(sweep: Sweep, workers: int, dirs: tuple[str | Path, str | Path, str | Path], storage_url: str,
          tracking_uri: str | None, parent, before: int) -> list[SweepJob]:
    """One job per worker; each seeds its sampler apart from the others' and from earlier runs' workers."""
    data_dir, runs_dir, specs_dir = dirs
    deadline = time.time() + sweep.spec.budget.timeout_s if sweep.spec.budget.timeout_s else None
    threads = None if workers == 1 else max(1, available_cores() // workers)  # one worker: this process's own
    return [SweepJob(sweep_path=str(sweep.path), specs_dir=str(specs_dir), storage_url=storage_url,
                     study_name=sweep.study_name, data_dir=str(data_dir), runs_dir=str(runs_dir),
                     tracking_uri=tracking_uri, parent_run_id=parent.run_id if parent else None, deadline=deadline,
                     seed=sweep.spec.seed + 1000 * k + before, threads=threads, worker=k) for k in range(workers)]


def _run_workers(sweep: Sweep, study, jobs: list[SweepJob], tidy, recovered: list[int], dead: list[str]) -> None:
    """Run the jobs to the end: the first in this process, each other in a spawned process. A worker that dies
    is one line in `dead`, and its trial is recovered at once, not at the end."""
    storage_url = jobs[0].storage_url

    def on_exit(worker: int, code: int) -> None:
        line = worker_death(worker, code)
        if line is not None:
            print(f"archlab: {line}", file=sys.stderr)
            dead.append(line)
            with budget_lock(storage_url, sweep.study_name):  # its trial and MLflow run, now, not at the end
                recovered.extend(recover_interrupted(study, tidy))

    codes = run_workers(jobs[0], jobs[1:], on_exit)
    if any(code == 2 for code in codes):
        raise UserError(sweep.path, "a worker stopped on an error in the sweep (see above)")


def _close_parent(parent, study, best: dict[str, Any], report_dir: Path, complete: bool) -> None:
    """The parent MLflow run gets the best values, the report's files, and ends (KILLED if the budget is not spent)."""
    if parent is None:
        return
    parent.log_metrics({k: v for k, v in best.items() if isinstance(v, (int, float))}, step=trials_used(study))
    parent.set_tags({"best_trial": str(best.get("trial", "")), "best_candidate": str(best.get("candidate", ""))})
    for path in sorted(report_dir.iterdir()):
        if path.is_file():
            parent.log_artifact(path, "report")
    parent.end("FINISHED" if complete else "KILLED")


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
    recovered, parent = _start(sweep, study, storage_url, tracking_uri, tidy)
    before = trials_used(study)
    jobs = _jobs(sweep, workers, (data_dir, runs_dir, specs_dir), storage_url, tracking_uri, parent, before)
    dead: list[str] = []
    try:
        _run_workers(sweep, study, jobs, tidy, recovered, dead)
    except BaseException:
        with contextlib.suppress(Exception), budget_lock(storage_url, sweep.study_name):
            recover_interrupted(study, tidy)  # what stopped workers left running: failed, queued, runs KILLED
        if parent is not None:
            parent.end("KILLED")
        raise
    study = open_study(sweep, storage_url, sweep.spec.seed)
    with budget_lock(storage_url, sweep.study_name):
        recovered += recover_interrupted(study, tidy)  # a dead worker's trial the survivors did not take up
    complete = not budget_left(study, sweep, jobs[0])
    write_report(study, sweep, Path(report_dir), storage_url, specs_dir=Path(specs_dir))
    best = best_summary(study, sweep)
    _close_parent(parent, study, best, Path(report_dir), complete)
    return SweepResult(study.study_name, storage_url, Path(report_dir), trials_used(study),
                       trials_used(study) - before, recovered, best, terminal_table(study, sweep), complete=complete,
                       dead_workers=dead)
