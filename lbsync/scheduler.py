"""When to run a round: coalesce bursts of changes into one render + reload per target.

A round is due once changes have been quiet for ``wait.min`` (quiescence), but never later
than ``wait.max`` after the first change of the burst, and never sooner than
``wait.min_interval`` after the previous round. Each round reloads every target at most
once however many of its templates changed, so a burst of 1,000 events in a second ends
in one or two reloads, not a storm.

Pure logic over an injectable clock: the daemon asks ``due_in()`` how long it may block
waiting for the next event, and calls ``round_done()`` after each round.

Guards sit here too: before a round applies a snapshot, ``Guard.admit`` compares it with
the last admitted one and holds an update that would take too much out of rotation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lbsync.config import GuardSettings, WaitSettings
from lbsync.model import Snapshot

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


@dataclass(frozen=True)
class Verdict:
    """Why an update is held (``reason`` empty = admitted)."""

    reason: str = ""
    removed: int = 0
    total: int = 0
    needs_confirmation: bool = False

    @property
    def held(self) -> bool:
        return bool(self.reason)


def judge(settings: GuardSettings, applied: Snapshot | None, candidate: Snapshot) -> Verdict:
    """Would ``applied → candidate`` take too much out of rotation? Pure; no clock.

    Costs the services that changed: snapshots share unchanged ``Service`` objects.
    """
    if applied is None:
        return Verdict()
    total = sum(len(s.up_ids) for s in applied.services.values())
    removed = _removed(applied, candidate)
    if total and not candidate.services:
        return Verdict(
            "the catalog is empty (wiped cluster or wrong prefix?): confirm to apply",
            removed,
            total,
            needs_confirmation=True,
        )
    if (
        total
        and removed >= settings.min_removed
        and removed / total > settings.max_removed_fraction
    ):
        share = f"{removed} of {total} usable instances"
        limit = f"max_removed_fraction {settings.max_removed_fraction:g}"
        return Verdict(f"update removes {share} (over {limit})", removed, total)
    for service, minimum in sorted(settings.min_instances.items()):
        was, now = _count(applied, service), _count(candidate, service)
        if now < minimum and now < was:
            reason = f"service {service!r} would drop to {now} usable (min_instances {minimum})"
            return Verdict(reason, was - now, was)
    return Verdict()


def _removed(applied: Snapshot, candidate: Snapshot) -> int:
    """Usable instances of ``applied`` that are not usable in ``candidate``."""
    removed = 0
    for name, old in applied.services.items():
        new = candidate.services.get(name)
        if new is old:
            continue
        removed += len(old.up_ids - new.up_ids) if new is not None else len(old.up_ids)
    return removed


def _count(snapshot: Snapshot, service: str) -> int:
    found = snapshot.services.get(service)
    return len(found.up_ids) if found else 0


class Guard:
    """Holds an update past the limits until it persists for ``hold`` or is confirmed.

    A held update is not partially applied: the LB keeps the last admitted state until the
    hold is released, and then gets the whole (by then current) catalog.
    """

    def __init__(self, settings: GuardSettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.held: Verdict | None = None
        self.held_since: float | None = None
        self.held_since_wall: float | None = None

    def admit(self, applied: Snapshot | None, candidate: Snapshot, confirmed_at: float) -> bool:
        """True to apply ``candidate`` now. ``confirmed_at``: wall time of the last confirm."""
        verdict = judge(self.settings, applied, candidate)
        if not verdict.held:
            self._release()
            return True
        if self.held_since is None or self.held_since_wall is None:
            self.held_since, self.held_since_wall = self.clock(), time.time()
        self.held = verdict
        if confirmed_at > self.held_since_wall:
            self._release()
            return True
        if not verdict.needs_confirmation and self.clock() - self.held_since >= self.settings.hold:
            self._release()
            return True
        return False

    def release_at(self) -> float | None:
        """When a held update will be released by time alone (None: not held, or needs confirm)."""
        if self.held is None or self.held_since is None or self.held.needs_confirmation:
            return None
        return self.held_since + self.settings.hold

    def _release(self) -> None:
        self.held = None
        self.held_since = self.held_since_wall = None
