"""Ctrl-C inside `interrupts.deferred()` waits for the next safe point; outside it, Python's own behaviour."""
import os
import signal

import pytest

from pipeline.engine import interrupts


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own Ctrl-C handler, whatever this test process inherited (a background job starts with SIGINT
    ignored, and Python then leaves it so)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode of this (main) thread


def test_a_deferred_ctrl_c_is_raised_at_the_next_check_not_where_it_landed():
    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        _ctrl_c()
        reached.append("after the signal")  # a tracker write here would finish
        interrupts.check()
        reached.append("after the check")
    assert reached == ["after the signal"]
    interrupts.check()  # the request was spent: nothing left over for the next block


def test_sigterm_is_deferred_like_ctrl_c_and_a_second_signal_raises_at_once():
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c()  # the second ask: raised where it lands, no waiting for a check
        interrupts.check()  # the first ask is still pending and is raised here
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_noted_but_never_checked_is_raised_as_the_outermost_block_ends_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():  # nested: shares the outer block
                _ctrl_c()
            assert signal.getsignal(signal.SIGINT) is not before  # still deferring after the inner block
    assert signal.getsignal(signal.SIGINT) is before


def test_check_outside_a_deferred_block_is_a_no_op():
    interrupts.check()


def test_a_signal_the_process_ignores_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job starts
    with interrupts.deferred():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        _ctrl_c()
        interrupts.check()  # nothing was noted: no KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
