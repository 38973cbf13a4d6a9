"""Ctrl-C at a safe point.

A KeyboardInterrupt raised wherever SIGINT happens to land can cut a database write in half: an MLflow flush
left holding SQLite's write lock makes every other process's write fail with "database is locked", and one
landing in a garbage-collection callback prints a traceback Python cannot let us catch. Inside `deferred()`
the first SIGINT (or SIGTERM) is only noted; the training loop calls `check()` between steps, which raises
KeyboardInterrupt there. A second signal raises at once, so a stuck process still stops. A signal the process
inherited as ignored (a background job's SIGINT) stays ignored.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "requested": False}


def _note(signum, frame) -> None:
    if _state["requested"]:
        raise KeyboardInterrupt  # asked twice: stop now, wherever we are
    _state["requested"] = True


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for inside `deferred()`; cheap when none was."""
    if _state["requested"]:
        _state["requested"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within, SIGINT and SIGTERM wait for the next `check()`. Nested uses share the outer one; outside the main
    thread (where no handler may be set) it changes nothing. A stop asked for but not yet raised when the
    outermost block ends is raised there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state["depth"] == 0
    # A signal the process was started ignoring stays ignored, as Python itself leaves it (a background job
    # ignores the terminal's Ctrl-C): the workers of a process that ignores it must not stop on it alone.
    taken = [s for s in _SIGNALS if signal.getsignal(s) is not signal.SIG_IGN] if outermost else []
    previous = [signal.signal(s, _note) for s in taken]
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if outermost:
            for s, handler in zip(taken, previous):
                signal.signal(s, handler)
            pending, _state["requested"] = _state["requested"], False
    if outermost and pending:
        raise KeyboardInterrupt
