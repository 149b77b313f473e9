"""The guard: hold a service's update that would take too much out of rotation, until confirmed.

Before a round applies a snapshot, ``Guard.admit`` compares it with the last admitted one
(``judge``, pure) service by service. A service whose update passes the limits of
``[guard]`` is held — its last admitted version stays in the snapshot the round applies
(``model.compose``) — until the update persists for ``guard.hold`` or an operator confirms
it; every other service's changes apply as usual. One rule stays global: an empty catalog
(wiped cluster, wrong prefix) holds everything and only ``lbsync confirm`` releases it.

``lbsync confirm`` touches ``<state_dir>/confirm`` (releases every hold);
``lbsync confirm --service NAME`` touches ``<state_dir>/confirm.d/NAME`` (that service's
hold only). Both are created relative to directory descriptors, never through a symlink;
the daemon reads their times with ``confirmed_at`` while something is held.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from lbsync.config import GuardSettings
from lbsync.errors import ConfigError, StageError
from lbsync.fileio import open_dir, opened_dir, touch
from lbsync.model import Service, Snapshot, changed_services, compose
from lbsync.scheduler import Clock
from lbsync.values import SERVICE_NAME

log = structlog.get_logger("lbsync.guard")

CONFIRM_FILE = "confirm"
CONFIRM_DIR = "confirm.d"

ConfirmedAt = Callable[[str | None], float]
"""Wall time of the last confirmation of a service's hold (None: of every hold)."""


@dataclass(frozen=True)
class Verdict:
    """Why an update is held."""

    reason: str
    removed: int = 0
    total: int = 0
    needs_confirmation: bool = False


@dataclass(frozen=True)
class Judgement:
    """``catalog``: the empty-catalog rule tripped (holds everything); ``services``: the
    services whose own update passes the limits."""

    catalog: Verdict | None = None
    services: Mapping[str, Verdict] = field(default_factory=dict)

    @property
    def held(self) -> bool:
        return self.catalog is not None or bool(self.services)


def judge(settings: GuardSettings, applied: Snapshot | None, candidate: Snapshot) -> Judgement:
    """Would ``applied → candidate`` take too much out of rotation? Pure; no clock.

    Costs the services that changed: snapshots share unchanged ``Service`` objects.
    """
    if applied is None:
        return Judgement()
    if not candidate.services and any(s.up_ids for s in applied.services.values()):
        total = sum(len(s.up_ids) for s in applied.services.values())
        reason = "the catalog is empty (wiped cluster or wrong prefix?): confirm to apply"
        return Judgement(catalog=Verdict(reason, total, total, needs_confirmation=True))
    services = {}
    for name in changed_services(applied, candidate):
        old, new = applied.services.get(name), candidate.services.get(name)
        verdict = judge_service(settings, name, old, new)
        if verdict is not None:
            services[name] = verdict
    return Judgement(services=services)


def judge_service(
    settings: GuardSettings, name: str, old: Service | None, new: Service | None
) -> Verdict | None:
    """Would ``old → new`` take too much of service ``name`` out of rotation? Pure."""
    if old is None or not old.up_ids:
        return None
    was = len(old.up_ids)
    now_ids = new.up_ids if new is not None else frozenset()
    # The catalog hands an unchanged set over as the same object (O(instances) otherwise).
    removed = 0 if now_ids is old.up_ids else len(old.up_ids - now_ids)
    if removed >= settings.min_removed and removed / was > settings.max_removed_fraction:
        limit = f"max_removed_fraction {settings.max_removed_fraction:g}"
        reason = f"update removes {removed} of {was} usable instances of {name!r} (over {limit})"
        return Verdict(reason, removed, was)
    minimum = settings.min_instances.get(name)
    now = len(now_ids)
    if minimum is not None and now < minimum and now < was:
        reason = f"service {name!r} would drop to {now} usable (min_instances {minimum})"
        return Verdict(reason, was - now, was)
    return None


@dataclass(frozen=True)
class Hold:
    """A held update: ``service`` None for the whole catalog (the empty-catalog rule)."""

    service: str | None
    verdict: Verdict
    since: float  # monotonic
    since_wall: float  # compared with the confirm files' times

    def document(self, hold_time: float) -> dict[str, object]:
        return {
            "reason": self.verdict.reason,
            "removed": self.verdict.removed,
            "total": self.verdict.total,
            "since": self.since_wall,
            "needs_confirmation": self.verdict.needs_confirmation,
            "release_at": None if self.verdict.needs_confirmation else self.since_wall + hold_time,
        }


@dataclass(frozen=True)
class Decision:
    """What ``Guard.admit`` decided: the snapshot to apply (None: nothing, the whole
    catalog is held) and the holds that started in this round."""

    snapshot: Snapshot | None
    started: tuple[Hold, ...] = ()


class Guard:
    """Holds each service's update past the limits until it persists for ``hold`` or is
    confirmed; the other services' updates apply meanwhile.

    A held service is not partially applied: the LB keeps its last admitted version until
    the hold is released, and then gets the service as it is by then.
    """

    def __init__(
        self,
        settings: GuardSettings,
        clock: Clock = time.monotonic,
        confirm: str = "lbsync confirm",
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.confirm = confirm  # the command to name in guard.held
        self.catalog_hold: Hold | None = None
        self.holds: dict[str, Hold] = {}

    def with_settings(self, settings: GuardSettings) -> Guard:
        """This guard under new settings (SIGHUP), keeping its holds and their start times:
        a reload neither releases a hold nor restarts its clock; a hold the new limits no
        longer justify ends at the next round."""
        guard = Guard(settings, self.clock, self.confirm)
        guard.catalog_hold, guard.holds = self.catalog_hold, dict(self.holds)
        return guard

    @property
    def holding(self) -> bool:
        return self.catalog_hold is not None or bool(self.holds)

    def admit(
        self, applied: Snapshot | None, candidate: Snapshot, confirmed_at: ConfirmedAt
    ) -> Decision:
        """What of ``candidate`` to apply now: it with every held service as in ``applied``."""
        judgement = judge(self.settings, applied, candidate)
        if judgement.catalog is not None:
            return self._hold_catalog(judgement.catalog, candidate, confirmed_at)
        self._release_catalog(candidate.revision)
        started: list[Hold] = []
        holds: dict[str, Hold] = {}
        for name, verdict in judgement.services.items():
            hold = self.holds.get(name)
            if hold is None:
                hold = self._start(name, verdict, candidate.revision)
                started.append(hold)
            why = self._release_why(hold, confirmed_at)
            if why:
                self._log_released(hold, candidate.revision, why)
                continue
            holds[name] = replace(hold, verdict=verdict)
        for name in self.holds.keys() - holds.keys() - judgement.services.keys():
            why = "no longer over the limits"
            log.warning("guard.released", service=name, revision=candidate.revision, why=why)
        self.holds = holds
        if applied is None or not holds:
            return Decision(candidate, tuple(started))
        return Decision(compose(applied, candidate, holds.keys()), tuple(started))

    def release_at(self) -> float | None:
        """The earliest a hold ends by time alone (None: nothing held, or only by confirm).

        While the catalog is held (empty), service holds wait: nothing is applied anyway."""
        if self.catalog_hold is not None:
            return None
        ends = [h.since + self.settings.hold for h in self.holds.values()]
        return min(ends, default=None)

    def may_end(self, confirmed_at: ConfirmedAt) -> bool:
        """A hold whose time is up, or that an operator has confirmed since it started."""
        if self.catalog_hold is not None:
            return bool(self._release_why(self.catalog_hold, confirmed_at))
        return any(self._release_why(hold, confirmed_at) for hold in self.holds.values())

    def _hold_catalog(
        self, verdict: Verdict, candidate: Snapshot, confirmed_at: ConfirmedAt
    ) -> Decision:
        hold = self.catalog_hold
        started: tuple[Hold, ...] = ()
        if hold is None:
            hold = self._start(None, verdict, candidate.revision)
            started = (hold,)
        if self._release_why(hold, confirmed_at):
            # confirming the empty catalog applies it whole: every service hold goes too
            for released in (hold, *self.holds.values()):
                self._log_released(released, candidate.revision, "confirmed")
            self.catalog_hold, self.holds = None, {}
            return Decision(candidate, started)
        self.catalog_hold = replace(hold, verdict=verdict)
        return Decision(None, started)

    def _release_catalog(self, revision: int) -> None:
        if self.catalog_hold is not None:
            log.warning("guard.released", service=None, revision=revision, why="no longer empty")
            self.catalog_hold = None

    def _start(self, service: str | None, verdict: Verdict, revision: int) -> Hold:
        hold = Hold(service, verdict, self.clock(), time.time())
        confirm = self.confirm if service is None else f"{self.confirm} --service {service}"
        log.warning(
            "guard.held",
            service=service,
            revision=revision,
            reason=verdict.reason,
            removed=verdict.removed,
            total=verdict.total,
            hold_s=None if verdict.needs_confirmation else self.settings.hold,
            confirm=confirm,
        )
        return hold

    def _release_why(self, hold: Hold, confirmed_at: ConfirmedAt) -> str:
        """Why ``hold`` ends now ("": it does not)."""
        if self._confirmed(hold, confirmed_at):
            return "confirmed"
        timed_out = self.clock() - hold.since >= self.settings.hold
        return "hold time over" if timed_out and not hold.verdict.needs_confirmation else ""

    @staticmethod
    def _confirmed(hold: Hold, confirmed_at: ConfirmedAt) -> bool:
        if confirmed_at(None) > hold.since_wall:
            return True
        return hold.service is not None and confirmed_at(hold.service) > hold.since_wall

    @staticmethod
    def _log_released(hold: Hold, revision: int, why: str) -> None:
        log.warning(
            "guard.released",
            service=hold.service,
            revision=revision,
            reason=hold.verdict.reason,
            why=why,
        )


def confirm_held(state_dir: Path, service: str | None = None) -> Path:
    """Tell a running daemon to apply what its guard holds: every hold, or ``service``'s.

    Touches ``confirm`` or ``confirm.d/<service>``, created relative to the directories'
    descriptors, never through a symlink: one planted at either name is refused, not
    followed. ``service`` must be a valid service name (it becomes a file name).
    """
    if service is not None and not SERVICE_NAME.fullmatch(service):
        raise ConfigError(f"{service!r} is not a service name", field="--service")
    name = CONFIRM_FILE if service is None else service
    path = state_dir / CONFIRM_FILE if service is None else state_dir / CONFIRM_DIR / service
    try:
        with opened_dir(state_dir, create=True, follow_symlinks=False) as state_fd:
            if service is None:
                touch(state_fd, name)
            else:
                with _confirm_dir(state_fd) as dir_fd:
                    touch(dir_fd, name)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StageError(
                "the confirm file is a symlink: refused (remove it; lbsync creates the file)",
                path=str(path),
            ) from exc
        raise StageError(f"cannot write the confirmation: {exc.strerror}", path=str(path)) from exc
    return path


@contextlib.contextmanager
def _confirm_dir(state_fd: int) -> Iterator[int]:
    """``confirm.d`` relative to the state directory's descriptor, made (0700) if missing;
    a symlink at its name fails (``ELOOP``/``ENOTDIR``), it is not followed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(CONFIRM_DIR, flags, dir_fd=state_fd)
    except FileNotFoundError:
        os.mkdir(CONFIRM_DIR, 0o700, dir_fd=state_fd)
        fd = os.open(CONFIRM_DIR, flags, dir_fd=state_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def confirmed_at(state_dir: Path, service: str | None = None) -> float:
    """When ``lbsync confirm`` (``--service``) last touched its file; 0.0 if never. A
    symlink at the file's (or ``confirm.d``'s) name counts for nothing."""
    try:
        if service is None:
            info = os.stat(state_dir / CONFIRM_FILE, follow_symlinks=False)
        else:
            fd = open_dir(state_dir / CONFIRM_DIR, follow_symlinks=False)
            try:
                info = os.stat(service, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
    except OSError:
        return 0.0
    return info.st_mtime if stat.S_ISREG(info.st_mode) else 0.0
