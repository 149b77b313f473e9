"""Prometheus metrics: one private registry, ``lbsync_`` names, one small function per fact.

The daemon calls these functions; ``lbsync.http.StatusServer`` serves the registry on
``/metrics``. Nothing here touches prometheus_client's global registry, so embedding
lbsync (or importing it in tests) never collides with anyone else's metrics.

The series exist only once ``enable`` has built them: the daemon does when it serves
``[http] listen`` (before its first round, so they count from the start); until then
every function here returns at once. Without an endpoint nobody can read them, and
prometheus_client's import and the collectors (~20 ms) stay off the way to the first
applied config.

Every series, and what to alert on, is listed in ``docs/operations.md`` ("Metrics and
endpoints"). The functions are cheap: ``set_catalog`` recounts only the services whose
``Service`` object changed since the last call (snapshots share unchanged ones), so a
single change at 10,000 instances costs one service, not the catalog.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from itertools import compress
from operator import is_not, itemgetter
from typing import get_args

from lbsync import __version__
from lbsync.errors import ValidationFailed
from lbsync.model import Service, Snapshot, State
from lbsync.outcome import Action, Outcome

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


class _Series:
    """Every collector, in one private registry (``enable`` builds it once)."""

    def __init__(self) -> None:
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

        # ``*_created`` series double every counter and histogram for no operational value.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # Like the default registry: process_* (CPU, RSS, fds), python_info, python_gc_*.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        self.build = Info("lbsync_build", "lbsync version", registry=registry)
        self.build.info({"version": __version__})

        self.rounds = Counter(
            "lbsync_rounds",
            "Rounds per target by what they did: unchanged, runtime, reloaded, rolled_back, "
            "failed.",
            ["target", "action"],
            registry=registry,
        )
        self.reloads = Counter(
            "lbsync_reloads",
            "Reloads issued per target; result=failed when the reload or its verification failed.",
            ["target", "result"],
            registry=registry,
        )
        self.runtime_updates = Counter(
            "lbsync_runtime_updates",
            "Membership changes applied through the LB's runtime API, without a reload.",
            ["target"],
            registry=registry,
        )
        self.validation_failures = Counter(
            "lbsync_validation_failures",
            "Rendered configs the LB's own checker refused (nothing was written or reloaded).",
            ["target"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "lbsync_rollbacks",
            "Reloads that failed and were rolled back to the last-known-good files.",
            ["target"],
            registry=registry,
        )
        self.round_errors = Counter(
            "lbsync_round_errors",
            "Failed or rolled-back rounds by error class (RenderError, ValidationFailed, ...).",
            ["target", "error"],
            registry=registry,
        )
        self.last_round_success = Gauge(
            "lbsync_last_round_success",
            "1 if the target's latest round succeeded (LB matches the catalog), 0 if it failed.",
            ["target"],
            registry=registry,
        )
        self.last_success_time = Gauge(
            "lbsync_last_success_timestamp_seconds",
            "Unix time of the target's latest successful round.",
            ["target"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "lbsync_stage_seconds",
            "Time spent per round stage: render, validate, runtime, swap, reload, verify.",
            ["target", "stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.event_to_apply = Histogram(
            "lbsync_event_to_apply_seconds",
            "From an etcd change reaching lbsync to the target having applied it.",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.services_held = Gauge(
            "lbsync_services_held",
            "Services held at their last applied version because their own change fails.",
            ["target"],
            registry=registry,
        )
        self.service_holds = Counter(
            "lbsync_service_holds",
            "Times a service's change was held back, by error class (RenderError, ...).",
            ["target", "error"],
            registry=registry,
        )
        self.instances = Gauge(
            "lbsync_instances",
            "Instances in the catalog per service and effective state (up, drain, down).",
            ["service", "state"],
            registry=registry,
        )
        self.probe_panic = Gauge(
            "lbsync_probe_panic",
            "1 while probe verdicts are ignored for a service (more than panic_threshold "
            "probed down).",
            ["service"],
            registry=registry,
        )
        self.etcd_connected = Gauge(
            "lbsync_etcd_connected", "1 while the etcd watch is established.", registry=registry
        )
        self.last_sync_revision = Gauge(
            "lbsync_last_sync_revision", "The etcd revision the catalog is at.", registry=registry
        )
        self.last_sync_time = Gauge(
            "lbsync_last_sync_timestamp_seconds",
            "Unix time the catalog was last known to match etcd (advances while connected).",
            registry=registry,
        )
        self.guard_holds = Counter(
            "lbsync_guard_holds",
            "Service updates (or empty catalogs) held by the guard: they would remove too much "
            "at once.",
            ["target"],
            registry=registry,
        )
        self.guard_holding = Gauge(
            "lbsync_guard_holding",
            "1 while the guard holds something (waiting for the hold time or an operator).",
            registry=registry,
        )
        self.guard_held_services = Gauge(
            "lbsync_guard_held_services",
            "Services whose update the guard holds now (their names are in /status).",
            registry=registry,
        )
        self.rejected_values = Counter(
            "lbsync_rejected_values",
            "etcd values rejected as unusable or unsafe (dropped; the rest still renders).",
            registry=registry,
        )
        self.runtime_tampered = Counter(
            "lbsync_runtime_tampered",
            "Upstreams found changed in the LB's runtime state by someone else, then repaired.",
            ["target"],
            registry=registry,
        )
        self.drift_repaired = Counter(
            "lbsync_drift_repaired_total",
            "Live state found differing from the last good round and repaired, by what differed "
            "(file_edited, lb_restarted).",
            ["target", "kind"],
            registry=registry,
        )
        self.retries = Counter(
            "lbsync_retries_total",
            "Failed rounds scheduled to be tried again without an etcd change (backoff).",
            registry=registry,
        )
        self.alerts = Counter(
            "lbsync_alerts",
            "Situations that need a human, by kind: rollback, rollback_failed.",
            ["kind"],
            registry=registry,
        )


class _Enabled:
    """The series once ``enable`` built them; None until then (every function a no-op)."""

    series: _Series | None = None


def enable() -> _Series:
    """Build the series (once) and start recording; returns them (``.registry`` to serve)."""
    if _Enabled.series is None:
        _Enabled.series = _Series()
    return _Enabled.series


def init_targets(targets: Iterable[str]) -> None:
    """Create every per-target series at 0, so rates and absent() work from the start."""
    if (m := _Enabled.series) is None:
        return
    for target in targets:
        for action in ACTIONS:
            m.rounds.labels(target, action)
        for result in ("ok", "failed"):
            m.reloads.labels(target, result)
        m.runtime_updates.labels(target)
        m.validation_failures.labels(target)
        m.rollbacks.labels(target)
        m.guard_holds.labels(target)
        m.runtime_tampered.labels(target)
        m.services_held.labels(target)


def record_outcome(outcome: Outcome) -> None:
    """Count one round of one target and observe its stage durations (ms → s)."""
    if (m := _Enabled.series) is None:
        return
    target = outcome.target
    m.rounds.labels(target, outcome.action).inc()
    if outcome.action == "runtime":
        m.runtime_updates.labels(target).inc()
    if "reload" in outcome.durations or outcome.action in ("reloaded", "rolled_back"):
        m.reloads.labels(target, "ok" if outcome.action == "reloaded" else "failed").inc()
    if outcome.action == "rolled_back":
        m.rollbacks.labels(target).inc()
    if isinstance(outcome.error, ValidationFailed):
        m.validation_failures.labels(target).inc()
    if outcome.error is not None:
        m.round_errors.labels(target, type(outcome.error).__name__).inc()
    m.services_held.labels(target).set(len(outcome.held))
    m.last_round_success.labels(target).set(1 if outcome.ok else 0)
    if outcome.ok:
        m.last_success_time.labels(target).set(time.time())
    for stage, milliseconds in outcome.durations.items():
        m.stage_seconds.labels(target, stage).observe(milliseconds / 1000)


def observe_event_to_apply(seconds: float, target: str) -> None:
    if (m := _Enabled.series) is not None:
        m.event_to_apply.labels(target).observe(seconds)


# service name → (the Service object last counted, its counts); main-loop thread only.
_counted: dict[str, tuple[Service, dict[State, int]]] = {}


def set_catalog(snapshot: Snapshot) -> None:
    """``lbsync_instances{service,state}`` from a snapshot; removed services are cleared.

    Only the services whose object changed since the last call are counted again (the
    catalog hands an unchanged service over as the same object)."""
    if (m := _Enabled.series) is None:
        return
    services = snapshot.services
    for name in _moved(services):
        service = services.get(name)
        if service is None:
            del _counted[name]
            for state in State:
                with contextlib.suppress(KeyError):
                    m.instances.remove(name, state.value)
            with contextlib.suppress(KeyError):
                m.probe_panic.remove(name)
            continue
        # The service's views by state (the catalog fills them in without a pass per
        # instance, and the render reads ``up`` anyway): 100,000 instances, ~5 ms less.
        counts = {State.UP: len(service.up), State.DRAIN: len(service.draining)}
        counts[State.DOWN] = len(service.down)
        for state, count in counts.items():
            m.instances.labels(name, state.value).set(count)
        m.probe_panic.labels(name).set(1 if service.panic else 0)
        _counted[name] = (service, counts)


def _moved(services: Mapping[str, Service]) -> list[str]:
    """The names whose service is not the one last counted: added, removed or changed.
    With the same names, compared object by object in C passes (1,000 services: a Python
    pass per round cost 0.16 ms)."""
    if services.keys() == _counted.keys():
        before = map(itemgetter(0), map(_counted.__getitem__, services))
        return list(compress(services, map(is_not, services.values(), before)))
    gone = (None, None)
    names = services.keys() | _counted.keys()
    return [n for n in names if _counted.get(n, gone)[0] is not services.get(n)]


def set_etcd(connected: bool, revision: int, synced_at: float | None) -> None:
    """Connection state and catalog revision; ``synced_at`` (Unix time) None leaves it as is."""
    if (m := _Enabled.series) is None:
        return
    m.etcd_connected.set(1 if connected else 0)
    m.last_sync_revision.set(revision)
    if synced_at is not None:
        m.last_sync_time.set(synced_at)


def service_held(target: str, error: str) -> None:
    if (m := _Enabled.series) is not None:
        m.service_holds.labels(target, error).inc()


def guard_held(target: str, holds: int = 1) -> None:
    if (m := _Enabled.series) is not None:
        m.guard_holds.labels(target).inc(holds)


def set_guard(held_services: int, holding: bool) -> None:
    """The guard's state after a round: how many services it holds, and whether anything
    (those, or an empty catalog) is held. No per-service label: the names are in /status,
    and a label per service would leave a series behind for every service ever held."""
    if (m := _Enabled.series) is None:
        return
    m.guard_held_services.set(held_services)
    m.guard_holding.set(1 if holding else 0)


def value_rejected() -> None:
    if (m := _Enabled.series) is not None:
        m.rejected_values.inc()


def runtime_tampered(target: str) -> None:
    if (m := _Enabled.series) is not None:
        m.runtime_tampered.labels(target).inc()


def drift_repaired(target: str, kind: str) -> None:
    if (m := _Enabled.series) is not None:
        m.drift_repaired.labels(target, kind).inc()


def retry_scheduled() -> None:
    if (m := _Enabled.series) is not None:
        m.retries.inc()


def alert(kind: str) -> None:
    if (m := _Enabled.series) is not None:
        m.alerts.labels(kind).inc()
