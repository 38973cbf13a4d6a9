"""Repeats: an experiment trained over several seeds, each a run of its own in runs/NAME/seed-K/.

Seeds are independent, so they train side by side in worker processes, each with its share of the cores
(torch threads = cores // workers: two workers of two threads each on two cores ran up to 20x slower
from OpenMP oversubscription). A seed whose run is finished and evaluated for this very spec is skipped,
so adding a seed trains only the new one; a killed seed resumes from its checkpoint like any run.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.checkpoints import seed_dir
from pipeline.specs.experiment import ExperimentSpec

FINISHED = ("finished", "early_stopped", "diverged")


def seed_spec(spec: ExperimentSpec, seed: int, vary_split: bool) -> ExperimentSpec:
    """The spec of one seed's run: its training seed, and with `vary: split` its own train/val split."""
    data = spec.data.model_copy(update={"split_seed": seed if vary_split else spec.data.split_seed})
    return spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed}), "data": data})


def is_done(spec: ExperimentSpec, run_dir: Path, evaluate: bool, *, data_hash: str | None) -> bool:
    """Trained to the end for exactly this spec and data (`data_hash`: the prepared dataset's content hash), and
    evaluated for it when asked."""
    from pipeline.engine.runfiles import SHIFTED_ACCURACY, Evaluation, RunMetrics, read_run_fields
    from pipeline.engine.warmstart import init_hash
    metrics = read_run_fields(run_dir, RunMetrics)  # a missing or broken file: not done, trained again
    if metrics.get("spec_hash") != spec.spec_hash() or metrics.get("status") not in FINISHED:
        return False
    if metrics.get("data_hash") != data_hash:  # the dataset was prepared anew since (params.yaml changed it)
        return False
    if metrics.get("init_hash") != init_hash(spec):  # the run it started from was trained again since
        return False
    if not evaluate:
        return True
    evaluation = read_run_fields(run_dir, Evaluation)
    # spec_hash leaves the extra evaluations out (they change no training): the shifts scored are checked here.
    shifts_scored = {int(k) for k in evaluation.get("test", {}).get(SHIFTED_ACCURACY, {})}
    return evaluation.get("spec_hash") == spec.spec_hash() and shifts_scored == set(spec.evaluate.shifts)


@dataclass(frozen=True)
class SeedJob:
    """One seed's run; picklable, for a spawned worker."""

    spec_path: str
    seed: int
    vary_split: bool
    data_dir: str
    run_dir: str
    tracking_uri: str | None
    evaluate: bool
    threads: int | None = None  # None: keep the process's own setting
    restart: bool = False  # set a (corrupt) checkpoint aside and train afresh


def run_seed(job: SeedJob) -> dict:
    """Train (or resume) one seed, then evaluate it when asked; → the run's metrics.json."""
    import torch

    from pipeline.data.prepare import load_prepared
    from pipeline.engine.evaluate import evaluate_run
    from pipeline.engine.train import train_experiment
    from pipeline.specs.experiment import load_spec
    if job.threads:
        torch.set_num_threads(job.threads)
    spec = seed_spec(load_spec(job.spec_path), job.seed, job.vary_split)
    data = load_prepared(job.data_dir)
    tags = {"archlab.experiment": spec.name, "archlab.seed": str(job.seed)}
    metrics = train_experiment(spec, job.spec_path, data, job.run_dir, job.tracking_uri, progress=False,
                               restart=job.restart,
                               extra_tags=tags, run_name=f"{spec.name}/seed-{job.seed}")
    if job.evaluate:
        evaluate_run(spec, data, job.run_dir, job.tracking_uri)
    return metrics


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_plan(pending: int, workers: int | None) -> tuple[int, int]:
    """(processes, torch threads each): at most one process per pending seed and per core."""
    cores = available_cores()
    processes = max(1, min(pending, workers or cores, cores))
    return processes, max(1, cores // processes)


def open_tracking_store(uri: str, experiments: Iterable[str]) -> None:
    """Create the MLflow store and experiments once, here: workers that each find them missing race to create
    them (a fresh SQLite store's migration fails under two at once)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    for experiment in dict.fromkeys(experiments):
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment)


def run_seeds(jobs: list[SeedJob], workers: int | None = None, experiments: Iterable[str] = ()) -> list[SeedJob]:
    """Run the jobs (skipped ones already removed) side by side; → the jobs that ran. One job, or one worker,
    runs in this process with its threads untouched. `experiments`: the MLflow experiments the runs log to."""
    processes, threads = worker_plan(len(jobs), workers)
    if processes <= 1:
        for done, job in enumerate(jobs, 1):
            _report_progress(done, len(jobs), job, run_seed(job))
        return jobs
    if jobs[0].tracking_uri and experiments:
        open_tracking_store(jobs[0].tracking_uri, experiments)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    ctx = multiprocessing.get_context("spawn")  # forking a process that holds torch threads is unsafe
    failure: BaseException | None = None
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        futures = {pool.submit(run_seed, SeedJob(**{**job.__dict__, "threads": threads})): job for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            try:
                _report_progress(done, len(jobs), futures[future], future.result())
            except Exception as err:  # noqa: BLE001 - raised below, once the pool has finished its other seeds
                failure = failure or err
    if failure is not None:
        raise failure
    return jobs


def _report_progress(done: int, total: int, job: SeedJob, metrics: dict) -> None:
    """One line per finished run, as it finishes: a long pool is not silent until its end."""
    print(f"[{done}/{total}] {job.run_dir}: {metrics.get('status')}, training loop "
          f"{metrics.get('train_time_s') or 0:.1f} s", flush=True)


def seed_jobs(spec: ExperimentSpec, spec_path: str | Path, seeds: list[int], vary_split: bool, data_dir: Path,
              run_dir: Path, tracking_uri: str | None, evaluate: bool,
              restart: bool = False) -> tuple[list[SeedJob], list[int]]:
    """(jobs still to run, seeds already done for this spec and data)."""
    from pipeline.data.prepare import read_meta
    meta = read_meta(data_dir)
    data_hash = meta.content_hash if meta else None
    jobs, done = [], []
    for seed in seeds:
        folder = seed_dir(run_dir, seed)
        if is_done(seed_spec(spec, seed, vary_split), folder, evaluate, data_hash=data_hash):
            done.append(seed)
        else:
            jobs.append(SeedJob(str(spec_path), seed, vary_split, str(data_dir), str(folder), tracking_uri, evaluate,
                                restart=restart))
    return jobs, done
