"""The guard: hold an update that would take too much out of rotation, until confirmed.

Before a round applies a snapshot, ``Guard.admit`` compares it with the last admitted one
(``judge``, pure) and holds an update past the limits of ``[guard]`` until it persists for
``guard.hold`` or an operator runs ``lbsync confirm``, which touches ``<state_dir>/confirm``
(``confirm_held``); the daemon reads that file's time with ``confirmed_at``.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from lbsync.config import GuardSettings
from lbsync.errors import StageError
from lbsync.fileio import opened_dir, touch
from lbsync.model import Snapshot
from lbsync.scheduler import Clock

log = structlog.get_logger("lbsync.guard")

CONFIRM_FILE = "confirm"


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

    def may_end(self, confirmed_at: float) -> bool:
        """A held update whose hold time is up, or that an operator has confirmed since."""
        if self.held is None:
            return False
        release = self.release_at()
        confirmed = confirmed_at > (self.held_since_wall or float("inf"))
        return confirmed or (release is not None and self.clock() >= release)

    def log_held(self, revision: int, confirm: str) -> None:
        """One ``guard.held`` event for the update now held; ``confirm``: the command to run."""
        held = self.held
        if held is None:
            return
        log.warning(
            "guard.held",
            revision=revision,
            reason=held.reason,
            removed=held.removed,
            total=held.total,
            hold_s=None if held.needs_confirmation else self.settings.hold,
            confirm=confirm,
        )

    def _release(self) -> None:
        self.held = None
        self.held_since = self.held_since_wall = None


def confirm_held(state_dir: Path) -> Path:
    """Tell a running daemon to apply the update its guard is holding (touches a file).

    The file is created or touched relative to the state directory's descriptor, never
    through a symlink: one planted at its name is refused, not followed."""
    path = state_dir / CONFIRM_FILE
    try:
        with opened_dir(state_dir, create=True, follow_symlinks=False) as dir_fd:
            touch(dir_fd, CONFIRM_FILE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StageError(
                "the confirm file is a symlink: refused (remove it; lbsync creates the file)",
                path=str(path),
            ) from exc
        raise StageError(f"cannot write the confirmation: {exc.strerror}", path=str(path)) from exc
    return path


def confirmed_at(state_dir: Path) -> float:
    """When ``lbsync confirm`` last touched its file; a symlink there counts for nothing."""
    try:
        info = os.stat(state_dir / CONFIRM_FILE, follow_symlinks=False)
    except OSError:
        return 0.0
    return info.st_mtime if stat.S_ISREG(info.st_mode) else 0.0
