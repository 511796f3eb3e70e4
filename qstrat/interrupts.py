"""Ctrl-C, SIGTERM and SIGHUP as a stop request, acted on where a run can stop cleanly.

Python raises KeyboardInterrupt wherever the main thread happens to be.  In the loop that
collects the workers' results, that may be a result callback or a journal write, outside
joblib's generator, so that joblib's own abort never runs.  So the command line's
handler raises at once only outside such a loop, or while the loop waits inside joblib
(which then aborts itself: no more dispatch, its workers killed).  Anywhere else in the loop
it only records the request, and the loop stops after the result at hand.  Signals after the
first are ignored: the process is already on its way out, and its cleanup must run whole.

Python drops an exception raised where it cannot propagate (a weakref callback, ``__del__``: "Exception
ignored in ...").  A stop request raised there would be lost, and every signal after it ignored: the
command would run to its end, deaf.  Such a request is delivered again, by the same signal.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class _StopState:
    requested = False
    deferred = False  # inside a result loop: raise only while it waits
    waiting = False
    raised: tuple[int, KeyboardInterrupt] | None = None  # the last stop raised, and by which signal
    exiting = False  # the exit code is decided: signals are ignored for good


_state = _StopState()


def _on_stop_signal(signum: int, frame: object) -> None:
    if _state.requested:
        return
    _state.requested = True
    if not _state.deferred or _state.waiting:
        stop = KeyboardInterrupt()
        _state.raised = (signum, stop)
        raise stop


def _redeliver_dropped_stop(unraisable: object, previous=sys.unraisablehook) -> None:
    """sys.unraisablehook: a stop request that Python dropped is raised again by the same signal, sent
    from another thread a moment later: raised from here, its handler would run inside this hook, which
    drops exceptions too."""
    raised = _state.raised
    if raised is not None and getattr(unraisable, "exc_value", None) is raised[1] and not _state.exiting:
        _state.raised, _state.requested = None, False
        resend = threading.Timer(0.01, signal.raise_signal, (raised[0],))
        resend.daemon = True
        resend.start()
        return
    previous(unraisable)


def handle_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP stop the process's run as described above (main thread only).

    For a command's whole process: the handlers stay, so that a second Ctrl-C cannot cut
    the exit short either."""
    _state.requested = False
    _state.exiting = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_stop_signal)
    sys.unraisablehook = _redeliver_dropped_stop
    # a closed terminal stops the run as cleanly (its default left temporaries behind); under nohup
    # SIGHUP is ignored, and stays so
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _on_stop_signal)


def ignore_stop_signals() -> None:
    """The command is over and its exit code decided: a signal while the interpreter exits
    (joining the worker pool's threads) must not end it with a traceback."""
    _state.requested = True
    _state.exiting = True


def raise_if_stop_requested() -> None:
    if _state.requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_stops() -> Iterator[None]:
    """A result loop: a stop request raises only at :func:`raise_if_stop_requested`, within
    :func:`interruptible_wait`, or on leaving the loop (none is lost)."""
    outer = _state.deferred
    _state.deferred = True
    try:
        yield
    finally:
        _state.deferred = outer
    raise_if_stop_requested()


@contextlib.contextmanager
def interruptible_wait() -> Iterator[None]:
    """A wait that a KeyboardInterrupt may end at any point (joblib aborts on it)."""
    _state.waiting = True
    try:
        raise_if_stop_requested()  # a request that came before the wait began
        yield
    finally:
        _state.waiting = False


@contextlib.contextmanager
def workers_deaf_to_interrupts() -> Iterator[None]:
    """Worker processes started in here (and by the threads started in here) never receive SIGINT.

    Ctrl-C in a terminal goes to the whole process group: a worker still importing printed its
    KeyboardInterrupt traceback.  The run's own process stops its workers (joblib kills them); a
    blocked signal mask is inherited through fork and exec, a handler is not.  A Ctrl-C meanwhile
    waits for the block's end, when this process takes it as usual."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    # started by the first spawn, the stdlib's resource tracker would unblock SIGINT on its way (it
    # unblocks rather than restores); running already, it leaves the mask alone
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

