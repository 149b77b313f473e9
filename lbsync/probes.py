"""Combining probe verdicts: the quorum of live probers, and the per-service panic threshold.

Every prober (``lbsync probe``) writes its verdict on an instance under its own lease, so the
verdicts present in etcd are exactly those of the live probers that report on it. An
instance is *probed down* when at least ``quorum`` of them say down (default: a majority of
those reporting; a single prober is its own majority). When the probed-down instances would
be more than ``panic_threshold`` of a service's registered-up instances, the checker is more
likely wrong than the fleet: probe verdicts are ignored for that service (Envoy's panic
mode), and registrations and health marks alone decide.

Pure functions over frozen values, called by the catalog's per-service build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from lbsync.config import ProbeSettings
from lbsync.model import ProbeVerdict, Snapshot, State, changed_services

log = structlog.get_logger("lbsync.probes")


@dataclass(frozen=True, slots=True)
class ProbePolicy:
    """How verdicts combine: ``quorum`` None means a majority of the reporting probers."""

    quorum: int | None = None
    panic_threshold: float = 0.5


DEFAULT_POLICY = ProbePolicy()


def policy_of(settings: ProbeSettings) -> ProbePolicy:
    return ProbePolicy(quorum=settings.quorum, panic_threshold=settings.panic_threshold)


def quorum_down(verdicts: Mapping[str, ProbeVerdict] | None, quorum: int | None) -> bool:
    """Whether enough of the reporting probers say down.

    A configured ``quorum`` is a count of probers, not capped by how many report: with
    ``quorum = 2`` one surviving prober can no longer take an instance out alone.
    """
    if not verdicts:
        return False
    down = sum(1 for verdict in verdicts.values() if verdict.status is State.DOWN)
    needed = quorum if quorum is not None else len(verdicts) // 2 + 1
    return down >= needed


def in_panic(base_states: Sequence[State], probed_down: Sequence[bool], threshold: float) -> bool:
    """Whether probes would take more than ``threshold`` of the registered-up instances out.

    ``base_states[i]`` is instance i's state from registration and health mark alone;
    ``probed_down[i]`` whether a quorum of probers says it is down. Only instances that are up
    without probes count: a drained or marked-down instance is not taken out by probes.
    """
    up = [down for state, down in zip(base_states, probed_down, strict=True) if state is State.UP]
    taken_out = sum(up)
    return taken_out > 0 and taken_out > threshold * len(up)


@dataclass
class PanicWatch:
    """The services in panic, with one ``probe.panic`` / ``probe.panic_over`` event per change."""

    services: frozenset[str] = field(default_factory=frozenset)
    _seen: Snapshot | None = field(default=None, repr=False, compare=False)  # the last one seen

    def update(self, snapshot: Snapshot) -> None:
        """Looks at the services that changed since the last snapshot (the catalog hands an
        unchanged service over as the same object), not at every service."""
        now = self._panics(snapshot)
        self._seen = snapshot
        if now == self.services:
            return
        for name in sorted(now - self.services):
            service = snapshot.services[name]
            log.warning(
                "probe.panic",
                service=name,
                probed_down=sum(1 for i in service.instances if i.probed_down),
                instances=len(service.instances),
                revision=snapshot.revision,
            )
        for name in sorted(self.services - now):
            log.info("probe.panic_over", service=name, revision=snapshot.revision)
        self.services = now

    def _panics(self, snapshot: Snapshot) -> frozenset[str]:
        """The services in panic in ``snapshot``."""
        if self._seen is None:
            return frozenset(n for n, service in snapshot.services.items() if service.panic)
        changed = changed_services(self._seen, snapshot)
        if not changed:
            return self.services
        services = snapshot.services
        calm = {n for n in changed if n not in services or not services[n].panic}
        return (self.services - calm) | {n for n in changed if n not in calm}
