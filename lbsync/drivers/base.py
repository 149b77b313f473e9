"""The one small interface every LB driver implements, and the table that picks one by name.

A round for one target goes: render → stage → ``validate`` → swap → ``reload`` → ``verify``.
A driver that can change membership without a reload also implements ``runtime_update``;
the daemon offers it every change first and reloads only when it declines.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from lbsync.commands import run_command
from lbsync.config import Target
from lbsync.errors import DriverError, ValidationFailed
from lbsync.model import Snapshot
from lbsync.stage.tree import StagedConfig


@dataclass(frozen=True)
class ReloadTicket:
    """What ``reload`` saw before signalling, so ``verify`` can tell the new generation.

    Each driver returns its own subclass with typed fields. ``started_at`` is
    ``time.monotonic()`` in every driver: a driver that compares it with wall-clock data
    (log line times, process start times) converts at that one place.
    """

    started_at: float


TicketT = TypeVar("TicketT", bound=ReloadTicket)


def own_ticket(ticket: ReloadTicket, kind: type[TicketT], target: str) -> TicketT:
    """``ticket`` as the driver's own ticket type; DriverError if another driver made it."""
    if not isinstance(ticket, kind):
        raise DriverError(f"not a {kind.__name__}: {type(ticket).__name__}", target=target)
    return ticket


class Driver(abc.ABC):
    """Drives one LB instance. Methods raise ``lbsync.errors`` types, never third-party ones."""

    kind: ClassVar[str]

    def __init__(self, target: Any) -> None:
        self.target = target

    @property
    def name(self) -> str:
        return str(self.target.name)

    @abc.abstractmethod
    def validate(self, staged: StagedConfig) -> None:
        """Run the LB's own checker on the staged tree; raise ``ValidationFailed``."""

    @property
    def checks_staged_tree(self) -> bool:
        """Whether ``validate`` looks at the staged tree at all; when it does not (a
        command target without ``check_command``), no tree is staged for it."""
        return True

    @abc.abstractmethod
    def reload(self) -> ReloadTicket:
        """Ask the LB to load the (already swapped-in) config; raise ``ReloadFailed``."""

    @abc.abstractmethod
    def verify(self, ticket: ReloadTicket) -> None:
        """Confirm the reload took effect; raise ``VerifyFailed`` (rollback follows)."""

    def template_context(self, snapshot: Snapshot) -> Mapping[str, Any]:
        """Extra names for this target's templates (e.g. stable HAProxy slot assignments)."""
        return {}

    def line_shape(self) -> Callable[[str], list[str]] | None:
        """How to read the structure of one rendered line (see lbsync.structure), or None
        for no structural check (the default: the command driver's format is the
        operator's own, and only its checker knows what a directive is)."""
        return None

    def runtime_update(self, old: Snapshot | None, new: Snapshot) -> bool:
        """Apply ``old → new`` without a reload if the LB can. True = done, no reload needed.

        The default declines, so every change goes through validate + swap + reload. The
        rendered files are still written (without a reload) after a True, so a later
        reload or restart comes up with the same membership.
        """
        return False

    # True while ``tick`` has periodic work: the daemon's loop then turns every 0.5 s
    # instead of sleeping until its next deadline.
    ticks = False

    def tick(self, applied: Snapshot | None) -> bool:
        """Called from the daemon's loop between rounds (often; the driver rate-limits).

        ``applied`` is the snapshot the target's pipeline last applied. A driver whose LB
        holds runtime state that a restart loses (nginx runtime mode) checks it here and
        restores it. True = in step as far as the driver can tell; False = it could not
        check or restore (already logged; worth showing as degraded). Never raises.
        """
        return True

    def lb_identity(self) -> Hashable | None:
        """Which LB process runs now (e.g. master pid + start time), cheaply, for the
        reconcile comparison: a change means the LB was restarted by someone else. None:
        unknown or not running (the default: the driver cannot tell)."""
        return None

    def repair_runtime(self, applied: Snapshot | None) -> bool:
        """For the reconcile comparison: compare the runtime state the LB reports (HAProxy
        ``show servers state``) with what ``applied`` implies, and correct it over the
        runtime API. True = something differed and was corrected; ``DriverError`` when it
        could not be (the caller reloads the files on disk). The default keeps no runtime
        state: False. (nginx runtime mode repairs its Lua lists in ``tick``.)"""
        return False

    def runtime_status(self) -> Mapping[str, Any] | None:
        """For the daemon's /status: the driver's runtime state (None: it keeps none)."""
        return None


def run_checker(
    argv: list[str],
    *,
    staged: StagedConfig,
    live_config: Path,
    timeout: float,
    what: str,
    shown_argv: list[str] | None = None,
    clean: Callable[[str], str] = str,
) -> None:
    """Run the LB's own checker on ``staged``; ValidationFailed if it refuses.

    The report names files as the operator knows them (the directory of ``live_config``,
    e.g. ``/etc/nginx/…``), not the staging dir: ``clean`` prepares the checker's stderr
    first, and ``shown_argv`` is the command to quote (default: ``argv``). A checker that
    did not run or timed out raises ``run_command``'s error unchanged.
    """
    try:
        run_command(argv, timeout=timeout, error=ValidationFailed, what=what)
    except ValidationFailed as err:
        if err.returncode is None:  # did not run or timed out: nothing to translate
            raise
        live_dir = os.path.dirname(os.path.abspath(live_config))
        raise ValidationFailed(
            f"{what} (exit {err.returncode})",
            command=shown_argv if shown_argv is not None else err.command,
            returncode=err.returncode,
            stderr=staged.live_paths(clean(err.stderr), live_dir),
        ) from err


DriverFactory = Callable[[Target], Driver]

_DRIVERS: dict[str, DriverFactory] = {}


def register_driver(kind: str) -> Callable[[type[Driver]], type[Driver]]:
    def add(cls: type[Driver]) -> type[Driver]:
        cls.kind = kind
        _DRIVERS[kind] = cls
        return cls

    return add


def driver_for(target: Target) -> Driver:
    """The driver named by ``target.driver``, built for that target.

    The kind is also the module name, imported on first use, so a host that only runs
    nginx never imports the HAProxy driver.
    """
    if target.driver not in _DRIVERS:
        importlib.import_module(f"lbsync.drivers.{target.driver}")
    return _DRIVERS[target.driver](target)
