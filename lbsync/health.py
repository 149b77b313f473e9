"""What the daemon knows about itself: ``Health``, and what /healthz, /readyz and /status say."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lbsync.catalog import Catalog
from lbsync.guard import Guard
from lbsync.model import SourceStatus
from lbsync.outcome import Outcome
from lbsync.pipeline import TargetPipeline

STUCK = 30.0  # /healthz fails when the loop has not turned for this long


@dataclass
class Health:
    """What the loop knows about itself, for logs and the status endpoint."""

    connected: bool = False
    synced: bool = False  # a full read of etcd has been applied to the catalog
    revision: int = 0
    last_loop: float = 0.0
    # When the loop, blocked with nothing to do, next turns by itself (a message or a
    # signal may wake it earlier): it is not stuck before then.
    asleep_until: float = 0.0
    disconnected_since: float | None = None
    # Set while running on the persisted catalog: how old it was when loaded, and when.
    saved_catalog_age: float | None = None
    saved_catalog_loaded_at: float | None = None
    endpoint: str | None = None
    ready_notified: bool = False
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    failing_since: dict[str, float] = field(default_factory=dict)  # target → Unix time

    def note_outcome(self, outcome: Outcome, wall: float) -> None:
        """Take a round's outcome; a failing target keeps the time of its first failure."""
        self.outcomes[outcome.target] = outcome
        if outcome.ok:
            self.failing_since.pop(outcome.target, None)
        else:
            self.failing_since.setdefault(outcome.target, wall)

    def forget_targets_except(self, names: set[str]) -> None:
        """After a reconfiguration: targets that are gone are neither failing nor shown."""
        for gone in (self.outcomes.keys() | self.failing_since.keys()) - names:
            self.outcomes.pop(gone, None)
            self.failing_since.pop(gone, None)

    def staleness(self, now: float) -> float:
        """How far behind etcd the catalog may be (0 while connected and synced)."""
        if self.connected and self.synced:
            return 0.0
        if not self.synced and self.saved_catalog_age is not None and self.saved_catalog_loaded_at:
            return self.saved_catalog_age + (now - self.saved_catalog_loaded_at)
        if self.disconnected_since is not None:
            return now - self.disconnected_since
        return float("inf")

    def note_status(self, status: SourceStatus, now: float) -> None:
        """Take the source's connection state."""
        self.connected = status.connected
        self.endpoint = status.endpoint or self.endpoint
        if status.connected:
            self.disconnected_since = None
        elif self.disconnected_since is None:
            self.disconnected_since = now

    def healthy(self, now: float) -> tuple[bool, str]:
        """The main loop is turning (or asleep until its next deadline, as planned)."""
        idle = now - max(self.last_loop, self.asleep_until)
        if idle > STUCK:
            return False, f"main loop has not turned for {idle:.0f}s"
        return True, ""

    def ready(self, now: float, max_staleness: float) -> tuple[bool, str]:
        """First sync done, and etcd reachable or the catalog fresh enough.

        A failing target does not make lbsync unready: its LB keeps serving the last good
        config, which is as good as lbsync can make it until the cause goes away, and a
        not-ready sidecar would take a working LB out of rotation. It is named in the
        reason (and in /status, with since when) instead, and retried with backoff.
        """
        if not (self.synced or self.saved_catalog_age is not None):
            return False, "no catalog yet: waiting for the first read of etcd"
        staleness = self.staleness(now)
        if staleness > max_staleness:
            return False, f"etcd unreachable; catalog is {staleness:.0f}s stale"
        if not self.connected:
            return True, f"etcd unreachable; serving a catalog {staleness:.0f}s stale"
        return True, self._failing_reason()

    def _failing_reason(self) -> str:
        failing = sorted(dict(self.failing_since).items())
        if not failing:
            return ""
        names = ", ".join(
            f"{t} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(w))}" for t, w in failing
        )
        return f"failing target(s), LB serving its last good config: {names}"


def status_document(
    health: Health,
    guard: Guard,
    catalog: Catalog,
    pipelines: Sequence[TargetPipeline],
    now: float,
    *,
    probe_panic: Iterable[str] = (),
) -> dict[str, object]:
    """The ``/status`` document. Runs on an HTTP thread while the main loop goes on."""
    return {
        "revision": catalog.revision,
        "etcd": {
            "connected": health.connected,
            "endpoint": health.endpoint,
            "synced": health.synced,
            "staleness_s": _finite(health.staleness(now)),
        },
        "held": guard_document(guard),
        # list() first: the main loop may change these while this (HTTP) thread reads
        "rejected": {key: err.reason for key, err in list(catalog.rejected.items())},
        "probe_panic": sorted(probe_panic),
        "targets": {
            name: _outcome_document(o, health.failing_since.get(name))
            for name, o in list(health.outcomes.items())
        },
        "runtime": {
            p.driver.name: status
            for p in pipelines
            if (status := p.driver.runtime_status()) is not None
        },
    }


def guard_document(guard: Guard) -> dict[str, object]:
    """What the guard holds: the whole catalog (the empty-catalog rule) and per service."""
    hold_time = guard.settings.hold
    catalog = guard.catalog_hold
    return {
        "catalog": None if catalog is None else catalog.document(hold_time),
        # list() first: the main loop replaces the holds while this (HTTP) thread reads
        "services": {name: h.document(hold_time) for name, h in list(guard.holds.items())},
    }


def _finite(value: float) -> float | None:
    return None if value == float("inf") else round(value, 3)


def _outcome_document(outcome: Outcome, failing_since: float | None) -> dict[str, object]:
    return {
        "failing_since": failing_since,
        "action": outcome.action,
        "revision": outcome.revision,
        "files": list(outcome.files),
        "error": str(outcome.error) if outcome.error else None,
        "ms": dict(outcome.durations),
        "held": {name: held.document() for name, held in outcome.held.items()},
    }
