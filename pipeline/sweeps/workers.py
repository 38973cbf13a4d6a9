"""Workers: each asks, trains and tells trials until the budget is spent. K of them share one study: the first in
the sweep's own process, the others spawned (and more on other machines given the same database URL). Ctrl-C
and SIGTERM stop every worker at a safe point, and a worker that dies leaves its trial to be queued again.
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


def run_workers(here: SweepJob, spawned: list[SweepJob], on_exit: Callable[[int, int], None]) -> list[int]:
    """Run `here` in this process and each of `spawned` in a process of its own, all to the end → the spawned
    ones' exit codes; `on_exit(worker, code)` as each of those ends. This process has paid its imports already
    and would otherwise wait idle, while a spawned worker pays them again before its first trial. Ctrl-C or
    SIGTERM stops every one of them."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # forking a process that holds torch threads is unsafe
    procs = {job.worker: ctx.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{job.worker}")
             for job in spawned}
    stopping = threading.Event()  # once set, a worker's exit is part of the stop, not news to report
    in_main = threading.current_thread() is threading.main_thread()  # only there may a handler be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None  # SIGTERM stops the workers too
    try:
        for p in procs.values():
            p.start()
        _work_while_reaping(here, procs, on_exit, stopping)
    except BaseException as err:
        stopping.set()
        # Ctrl-C reached every worker from the terminal: they get time to stop by themselves. Anything else
        # reached only this process, so they are asked at once.
        _stop_workers(list(procs.values()), grace_s=10 if isinstance(err, KeyboardInterrupt) else 0)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return [p.exitcode for p in procs.values()]


def _work_while_reaping(job: SweepJob, procs: dict, on_exit: Callable[[int, int], None],
                        stopping: threading.Event) -> None:
    """Run `job` here, with its share of the threads, while a thread reaps the spawned workers."""
    import torch
    failures: list[BaseException] = []

    def reap() -> None:
        try:
            _reap(procs, on_exit, stopping)
        except BaseException as err:  # noqa: BLE001 - raised in the main thread, below
            failures.append(err)

    reaper = threading.Thread(target=reap, name="sweep-reaper", daemon=True)
    reaper.start()
    threads = torch.get_num_threads()
    try:
        with interrupts.deferred():  # Ctrl-C and SIGTERM stop this worker between steps, as they do the others
            run_worker(job)
    finally:
        torch.set_num_threads(threads)
    reaper.join()
    if failures:
        raise failures[0]


def _reap(procs: dict, on_exit: Callable[[int, int], None], stopping: threading.Event) -> None:
    """Wait for every process, reaping each as it ends: a dead one left a zombie looks alive to the others' pid
    check, and its trial would wait for the end of the sweep to be taken up again."""
    from multiprocessing.connection import wait
    running = dict(procs)
    while running:
        ended = wait([p.sentinel for p in running.values()])
        if stopping.is_set():
            return
        for worker, p in [(k, p) for k, p in running.items() if p.sentinel in ended]:
            p.join()
            del running[worker]
            on_exit(worker, p.exitcode)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_workers(procs, grace_s: float = 10) -> None:
    """Each worker gets `grace_s` to stop by itself (a terminal's Ctrl-C reached it too, and it queues its
    trial again), then is sent SIGINT, then terminated, then killed, so that nothing outlives the sweep. (A
    second SIGINT stops a worker at once, wherever it is: it is sent only after the grace.)"""
    deadline = time.monotonic() + grace_s
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
    if code in (0, 2, 130):  # done, stopped on a user error it reported itself, or stopped by Ctrl-C or SIGTERM
        return None  # (having queued its trial again itself)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"crashed (exit status {code})"
    return f"sweep worker {worker} {how}; its trial is queued again and the other workers went on"
