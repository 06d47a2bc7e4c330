"""The per-attack time budget, enforced: a SIGALRM timer (signal.setitimer) in the main thread raises
`BudgetExceeded` inside the attack when its budget runs out, so a slow attack is stopped, not only marked.

The exception derives from BaseException, like KeyboardInterrupt, so an attack's own `except Exception` does not
swallow it. Python runs signal handlers between bytecodes: one long native call (a large matmul, an SVD, a scipy
assignment) finishes before the attack stops. Where no timer can be set (not the main thread, no SIGALRM on this
platform) the attack runs to its end and the driver only marks it over budget, as before.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass


class BudgetExceeded(BaseException):
    """Raised inside an attack when its time budget is spent (see `stop_after`)."""


@dataclass
class Timer:
    """What `stop_after` did: whether it could arm a timer, and whether the budget ran out."""

    armed: bool = False
    fired: bool = False


def can_interrupt() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def stop_after(seconds: float | None):
    """Raise BudgetExceeded in this (main) thread once `seconds` have passed inside the block; yields a Timer.
    An outer ITIMER_REAL (pytest-timeout's, say) is kept: it is restored afterwards, less the time spent, and if
    it falls due first its own handler runs."""
    timer = Timer()
    if not seconds or seconds <= 0 or not can_interrupt():
        yield timer
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    t0 = time.monotonic()
    outer_due = [False]

    def on_alarm(signum, frame):
        if not timer.armed:
            return
        if outer_left and time.monotonic() - t0 >= outer_left - 1e-3 and callable(previous):
            timer.armed, outer_due[0] = False, True
            previous(signum, frame)  # the outer timer was due first: its handler decides
            return
        timer.armed, timer.fired = False, True
        raise BudgetExceeded(f"stopped at the budget ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    timer.armed = True
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield timer
    finally:
        timer.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left and not outer_due[0]:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - t0), 1e-3))
