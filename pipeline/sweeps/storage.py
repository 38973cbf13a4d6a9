"""Where a study lives and how workers share it: storage, the budget lock, sampler and pruner, and the state
that lets a rerun carry on (heartbeats, interrupted trials failed and queued again).

Optuna stores neither sampler nor pruner, so every worker builds both from the spec. A trial records the
host and pid of its worker and a heartbeat; a RUNNING trial whose worker is gone is marked failed and its
parameters are queued again, so a rerun continues the study where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.specs.sweep import Sweep

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
        median = optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs + 1)
        return PerCandidatePruner(median) if p.scope == "candidate" else median
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
STALE_AFTER_S = 150.0  # a trial on another machine silent for five beats is taken for dead and queued again


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
