"""Workers: each asks, trains and tells trials until the budget is spent; K of them run as spawned processes
(on this machine, or on others given the same database URL) that share one study. Ctrl-C and SIGTERM stop
every worker at a safe point, and a worker that dies leaves its trial to be queued again.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from pipeline.engine import interrupts
from pipeline.specs.errors import UserError
from pipeline.specs.sweep import Sweep, load_sweep
from pipeline.sweeps.storage import (budget_lock, has_waiting, heartbeat, make_pruner, make_sampler, open_storage,
                                     recover_interrupted, trials_used)
from pipeline.sweeps.trials import SweepJob, end_orphan_runs, run_trial


def _load_study(job: SweepJob, sweep: Sweep):
    import optuna
    return optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage_url),
                             sampler=make_sampler(sweep, job.seed), pruner=make_pruner(sweep))


def budget_left(study, sweep: Sweep, job: SweepJob) -> bool:
    if job.deadline is not None and time.time() >= job.deadline:
        return False
    under_budget = sweep.spec.budget.trials is None or trials_used(study) < sweep.spec.budget.trials
    if sweep.spec.sampler.name == "grid":  # a grid ends with its queued points
        return has_waiting(study) and under_budget
    return under_budget


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
            if not budget_left(study, sweep, job):
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


def spawn_workers(jobs: list[SweepJob], on_exit: Callable[[int, int], None]) -> list[int]:
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


def worker_death(worker: int, code: int) -> str | None:
    """One line for a worker that did not end by itself (killed by a signal, or crashed); None if it did."""
    if code in (0, 2):  # done, or stopped on a user error it reported itself
        return None
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"crashed (exit status {code})"
    return f"sweep worker {worker} {how}; its trial is queued again and the other workers went on"
