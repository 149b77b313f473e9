"""When to run a round: coalesce bursts of changes into one render + reload per target.

A round is due once changes have been quiet for ``wait.min`` (quiescence), but never later
than ``wait.max`` after the first change of the burst, and never sooner than
``wait.min_interval`` after the previous round. Each round reloads every target at most
once however many of its templates changed, so a burst of 1,000 events in a second ends
in one or two reloads, not a storm.

Pure logic over an injectable clock: the daemon asks ``due_in()`` how long it may block
waiting for the next event, and calls ``round_done()`` after each round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lbsync.config import WaitSettings

Clock = Callable[[], float]


class Scheduler:
    def __init__(self, wait: WaitSettings, clock: Clock = time.monotonic) -> None:
        self.wait = wait
        self.clock = clock
        self._first_change: float | None = None
        self._last_change: float | None = None
        self._last_round: float | None = None

    @property
    def pending(self) -> bool:
        """Changes have arrived that no round has applied yet."""
        return self._first_change is not None

    def changed(self) -> None:
        """Note that the catalog changed now."""
        now = self.clock()
        if self._first_change is None:
            self._first_change = now
        self._last_change = now

    def due_at(self) -> float | None:
        """The clock time at which the next round should run; None when nothing is pending."""
        if self._first_change is None or self._last_change is None:
            return None
        quiet = self._last_change + self.wait.min
        capped = self._first_change + self.wait.max
        due = min(quiet, capped)
        if self._last_round is not None:
            due = max(due, self._last_round + self.wait.min_interval)
        return due

    def due_in(self) -> float | None:
        """Seconds until the next round (0 = now); None when nothing is pending."""
        due = self.due_at()
        return None if due is None else max(0.0, due - self.clock())

    def is_due(self) -> bool:
        return self.due_in() == 0.0

    def round_done(self) -> None:
        """A round applied everything pending as of when it started."""
        self._first_change = None
        self._last_change = None
        self._last_round = self.clock()
