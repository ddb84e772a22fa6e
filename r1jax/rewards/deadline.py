"""`call_with_deadline(fn, args, timeout)`: a time bound on pure-Python work that works in any thread.

math-verify bounds its work with `signal.alarm`, which raises `ValueError` outside the main thread
(the bug that hit verl's and TRL's reward workers). Here:
- in the main thread, an interval timer (`setitimer`, sub-second) whose handler raises a
  BaseException, so that library code catching `Exception` cannot swallow it; a timer already
  running is restored afterwards;
- in any other thread, the call runs in a helper process (one per process, started on first use,
  in its main thread under the same timer) that is killed and replaced if it overruns, which also
  covers C code that never returns to the interpreter.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class _Deadline(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that sympy's `except Exception` can't eat it."""


def _call_with_itimer(fn: Callable[..., _T], args: tuple, timeout: float) -> _T:
    armed = [True]

    def on_alarm(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _Deadline

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            return fn(*args)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        raise TimeoutError(f"gave up after {timeout} s") from None
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # someone else's timer was running: give back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


_helper_lock = threading.Lock()
_helper: Any = None


def _call_in_helper(fn: Callable[..., _T], args: tuple, timeout: float) -> _T:
    """Off the main thread no signal can interrupt us: run in a helper process and kill it on overrun."""
    global _helper
    from r1jax.rewards.pool import HardTimeoutWorker

    with _helper_lock:
        if _helper is None or not _helper.alive():
            _helper = HardTimeoutWorker()
        # The helper runs `fn` in its main thread, under the interval timer; the outer bound only
        # matters for code that holds the GIL in C.
        return _helper.call(call_with_deadline, (fn, args, timeout), timeout=timeout + 2.0)


def call_with_deadline(fn: Callable[..., _T], args: tuple, timeout: float | None) -> _T:
    """`fn(*args)`, raising TimeoutError after `timeout` s, from any thread. None: no bound."""
    if timeout is None or timeout <= 0:
        return fn(*args)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _call_with_itimer(fn, args, timeout)
    return _call_in_helper(fn, args, timeout)
