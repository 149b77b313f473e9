"""What wakes the daemon's main loop: flags set by signal handlers, and its next deadline.

The loop blocks until a source message, a flag or its earliest deadline; it polls (at
most every ``TICK``) only while something can only be polled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

# Longest the loop blocks while something can only be polled: a guard hold's confirm file,
# a driver's runtime state (``Driver.ticks``). Otherwise it sleeps until its next deadline:
# each wake-up costs CPU even when idle (a timed wait is ~75 us of system time on a VM).
TICK = 0.5


class Flags:
    """Set by signal handlers (or tests), read by the main loop; setting one wakes the loop
    (``wake`` must be signal-safe)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._stop = self._reconfigure = False

    @property
    def stop(self) -> bool:
        return self._stop

    @stop.setter
    def stop(self, value: bool) -> None:
        self._stop = value
        if value:
            self._wake()

    @property
    def reconfigure(self) -> bool:
        return self._reconfigure

    @reconfigure.setter
    def reconfigure(self, value: bool) -> None:
        self._reconfigure = value
        if value:
            self._wake()


def wait_budget(deadlines: Iterable[float | None], now: float, *, polling: bool) -> float:
    """How long the loop may block: until the earliest of ``deadlines`` (clock times; None:
    none), at most ``TICK`` while ``polling``; ``math.inf`` when nothing is due at all
    (a message or a signal wakes it)."""
    due = min((d for d in deadlines if d is not None), default=math.inf)
    budget = max(0.0, due - now)
    return min(budget, TICK) if polling else budget
