"""Prometheus metrics: one private registry, ``lbsync_`` names, one small function per fact.

The daemon calls these functions; ``lbsync.http.StatusServer`` serves ``REGISTRY`` on
``/metrics``. Nothing here touches prometheus_client's global registry, so embedding
lbsync (or importing it in tests) never collides with anyone else's metrics.

Every series, and what to alert on, is listed in ``docs/operations.md`` ("Metrics and
endpoints"). The functions are cheap: ``set_catalog`` recounts only the services whose
``Service`` object changed since the last call (snapshots share unchanged ones), so a
single change at 10,000 instances costs one service, not the catalog.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector

from lbsync import __version__
from lbsync.errors import ValidationFailed
from lbsync.model import Service, Snapshot, State
from lbsync.outcome import Action, Outcome

# ``*_created`` series double every counter and histogram for no operational value.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

# Like the default registry: process_* (CPU, RSS, fds), python_info, python_gc_*.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

ACTIONS: tuple[Action, ...] = get_args(Action)
STAGES = ("render", "validate", "runtime", "swap", "reload", "verify")

# Stage durations: nginx -t on a small config is ~5 ms, HAProxy -c at 10k servers ~64 ms,
# a reload verify can take seconds.
STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Event → applied: the targets are p99 ≤ 10 ms (10 instances) and ≤ 30 ms (10k), so the
# buckets are fine around those and coarse up to 10 s.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip

BUILD = Info("lbsync_build", "lbsync version", registry=REGISTRY)
BUILD.info({"version": __version__})

ROUNDS = Counter(
    "lbsync_rounds",
    "Rounds per target by what they did: unchanged, runtime, reloaded, rolled_back, failed.",
    ["target", "action"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "lbsync_reloads",
    "Reloads issued per target; result=failed when the reload or its verification failed.",
    ["target", "result"],
    registry=REGISTRY,
)
RUNTIME_UPDATES = Counter(
    "lbsync_runtime_updates",
    "Membership changes applied through the LB's runtime API, without a reload.",
    ["target"],
    registry=REGISTRY,
)
VALIDATION_FAILURES = Counter(
    "lbsync_validation_failures",
    "Rendered configs the LB's own checker refused (nothing was written or reloaded).",
    ["target"],
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "lbsync_rollbacks",
    "Reloads that failed and were rolled back to the last-known-good files.",
    ["target"],
    registry=REGISTRY,
)
ROUND_ERRORS = Counter(
    "lbsync_round_errors",
    "Failed or rolled-back rounds by error class (RenderError, ValidationFailed, ...).",
    ["target", "error"],
    registry=REGISTRY,
)
LAST_ROUND_SUCCESS = Gauge(
    "lbsync_last_round_success",
    "1 if the target's latest round succeeded (LB matches the catalog), 0 if it failed.",
    ["target"],
    registry=REGISTRY,
)
LAST_SUCCESS_TIME = Gauge(
    "lbsync_last_success_timestamp_seconds",
    "Unix time of the target's latest successful round.",
    ["target"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "lbsync_stage_seconds",
    "Time spent per round stage: render, validate, runtime, swap, reload, verify.",
    ["target", "stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
EVENT_TO_APPLY = Histogram(
    "lbsync_event_to_apply_seconds",
    "From an etcd change reaching lbsync to the target having applied it.",
    ["target"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
SERVICES_HELD = Gauge(
    "lbsync_services_held",
    "Services held at their last applied version because their own change fails.",
    ["target"],
    registry=REGISTRY,
)
SERVICE_HOLDS = Counter(
    "lbsync_service_holds",
    "Times a service's change was held back, by error class (RenderError, ...).",
    ["target", "error"],
    registry=REGISTRY,
)
INSTANCES = Gauge(
    "lbsync_instances",
    "Instances in the catalog per service and effective state (up, drain, down).",
    ["service", "state"],
    registry=REGISTRY,
)
PROBE_PANIC = Gauge(
    "lbsync_probe_panic",
    "1 while probe verdicts are ignored for a service (more than panic_threshold probed down).",
    ["service"],
    registry=REGISTRY,
)
ETCD_CONNECTED = Gauge(
    "lbsync_etcd_connected", "1 while the etcd watch is established.", registry=REGISTRY
)
LAST_SYNC_REVISION = Gauge(
    "lbsync_last_sync_revision", "The etcd revision the catalog is at.", registry=REGISTRY
)
LAST_SYNC_TIME = Gauge(
    "lbsync_last_sync_timestamp_seconds",
    "Unix time the catalog was last known to match etcd (advances while connected).",
    registry=REGISTRY,
)
GUARD_HOLDS = Counter(
    "lbsync_guard_holds",
    "Service updates (or empty catalogs) held by the guard: they would remove too much at once.",
    ["target"],
    registry=REGISTRY,
)
GUARD_HOLDING = Gauge(
    "lbsync_guard_holding",
    "1 while the guard holds something (waiting for the hold time or an operator).",
    registry=REGISTRY,
)
GUARD_HELD_SERVICES = Gauge(
    "lbsync_guard_held_services",
    "Services whose update the guard holds now (their names are in /status).",
    registry=REGISTRY,
)
REJECTED_VALUES = Counter(
    "lbsync_rejected_values",
    "etcd values rejected as unusable or unsafe (dropped; the rest still renders).",
    registry=REGISTRY,
)
RUNTIME_TAMPERED = Counter(
    "lbsync_runtime_tampered",
    "Upstreams found changed in the LB's runtime state by someone else, then repaired.",
    ["target"],
    registry=REGISTRY,
)
DRIFT_REPAIRED = Counter(
    "lbsync_drift_repaired_total",
    "Live state found differing from the last good round and repaired, by what differed "
    "(file_edited, lb_restarted).",
    ["target", "kind"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "lbsync_retries_total",
    "Failed rounds scheduled to be tried again without an etcd change (backoff).",
    registry=REGISTRY,
)
ALERTS = Counter(
    "lbsync_alerts",
    "Situations that need a human, by kind: rollback, rollback_failed.",
    ["kind"],
    registry=REGISTRY,
)


def init_targets(targets: Iterable[str]) -> None:
    """Create every per-target series at 0, so rates and absent() work from the start."""
    for target in targets:
        for action in ACTIONS:
            ROUNDS.labels(target, action)
        for result in ("ok", "failed"):
            RELOADS.labels(target, result)
        RUNTIME_UPDATES.labels(target)
        VALIDATION_FAILURES.labels(target)
        ROLLBACKS.labels(target)
        GUARD_HOLDS.labels(target)
        RUNTIME_TAMPERED.labels(target)
        SERVICES_HELD.labels(target)


def record_outcome(outcome: Outcome) -> None:
    """Count one round of one target and observe its stage durations (ms → s)."""
    target = outcome.target
    ROUNDS.labels(target, outcome.action).inc()
    if outcome.action == "runtime":
        RUNTIME_UPDATES.labels(target).inc()
    if "reload" in outcome.durations or outcome.action in ("reloaded", "rolled_back"):
        RELOADS.labels(target, "ok" if outcome.action == "reloaded" else "failed").inc()
    if outcome.action == "rolled_back":
        ROLLBACKS.labels(target).inc()
    if isinstance(outcome.error, ValidationFailed):
        VALIDATION_FAILURES.labels(target).inc()
    if outcome.error is not None:
        ROUND_ERRORS.labels(target, type(outcome.error).__name__).inc()
    SERVICES_HELD.labels(target).set(len(outcome.held))
    LAST_ROUND_SUCCESS.labels(target).set(1 if outcome.ok else 0)
    if outcome.ok:
        LAST_SUCCESS_TIME.labels(target).set(time.time())
    for stage, milliseconds in outcome.durations.items():
        STAGE_SECONDS.labels(target, stage).observe(milliseconds / 1000)


def observe_event_to_apply(seconds: float, target: str) -> None:
    EVENT_TO_APPLY.labels(target).observe(seconds)


# service name → (the Service object last counted, its counts); main-loop thread only.
_counted: dict[str, tuple[Service, dict[State, int]]] = {}


def set_catalog(snapshot: Snapshot) -> None:
    """``lbsync_instances{service,state}`` from a snapshot; removed services are cleared."""
    for name in [n for n in _counted if n not in snapshot.services]:
        del _counted[name]
        for state in State:
            with contextlib.suppress(KeyError):
                INSTANCES.remove(name, state.value)
        with contextlib.suppress(KeyError):
            PROBE_PANIC.remove(name)
    for name, service in snapshot.services.items():
        seen = _counted.get(name)
        if seen is not None and seen[0] is service:
            continue  # the same object: unchanged since the last snapshot
        # The service's views by state (the catalog fills them in without a pass per
        # instance, and the render reads ``up`` anyway): 100,000 instances, ~5 ms less.
        counts = {State.UP: len(service.up), State.DRAIN: len(service.draining)}
        counts[State.DOWN] = len(service.down)
        for state, count in counts.items():
            INSTANCES.labels(name, state.value).set(count)
        PROBE_PANIC.labels(name).set(1 if service.panic else 0)
        _counted[name] = (service, counts)


def set_etcd(connected: bool, revision: int, synced_at: float | None) -> None:
    """Connection state and catalog revision; ``synced_at`` (Unix time) None leaves it as is."""
    ETCD_CONNECTED.set(1 if connected else 0)
    LAST_SYNC_REVISION.set(revision)
    if synced_at is not None:
        LAST_SYNC_TIME.set(synced_at)


def service_held(target: str, error: str) -> None:
    SERVICE_HOLDS.labels(target, error).inc()


def guard_held(target: str, holds: int = 1) -> None:
    GUARD_HOLDS.labels(target).inc(holds)


def set_guard(held_services: int, holding: bool) -> None:
    """The guard's state after a round: how many services it holds, and whether anything
    (those, or an empty catalog) is held. No per-service label: the names are in /status,
    and a label per service would leave a series behind for every service ever held."""
    GUARD_HELD_SERVICES.set(held_services)
    GUARD_HOLDING.set(1 if holding else 0)


def value_rejected() -> None:
    REJECTED_VALUES.inc()


def runtime_tampered(target: str) -> None:
    RUNTIME_TAMPERED.labels(target).inc()


def drift_repaired(target: str, kind: str) -> None:
    DRIFT_REPAIRED.labels(target, kind).inc()


def retry_scheduled() -> None:
    RETRIES.inc()


def alert(kind: str) -> None:
    ALERTS.labels(kind).inc()
