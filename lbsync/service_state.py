"""One service's state in the catalog, and the frozen ``Service`` it builds.

``Catalog`` keeps one ``ServiceState`` per service: its registrations, health marks,
settings and probe verdicts by instance, and what the last build made of each instance,
so that a change rebuilds only what it touched (the rest of the instances, and the views
by state, are handed over from the last ``Service``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain, pairwise
from typing import Any, TypeVar

from pydantic import BaseModel

from lbsync.model import HealthMark, Instance, ProbeVerdict, Service, SettingValue, State
from lbsync.probes import DEFAULT_POLICY, ProbePolicy, in_panic, quorum_down
from lbsync.values import Registration

# What an Instance was built from; the same inputs (by identity) give the same Instance.
_Built = tuple[Registration, HealthMark | None, Mapping[str, ProbeVerdict] | None, bool, Instance]


@dataclass
class ServiceState:
    registrations: dict[str, Registration] = field(default_factory=dict)
    health: dict[str, HealthMark] = field(default_factory=dict)
    settings: dict[str, SettingValue] = field(default_factory=dict)
    # Verdicts by instance id, then prober; an inner dict is replaced (never mutated) on
    # every change, so an unchanged one is the same object as at the last build.
    probes: dict[str, dict[str, ProbeVerdict]] = field(default_factory=dict)
    # The Instance last built for each id, with what it was built from: a rebuild after one
    # event makes one new Instance, not one per instance.
    instances: dict[str, _Built] = field(default_factory=dict)
    # The last build's ids, sorted, and their instances in the same order; the ids whose
    # registration, health mark or verdicts changed since; whether that build can be
    # patched with those ids alone (it saw no verdicts, so no instance's state depended
    # on another's: no panic). Patching makes a change O(changed ids), not O(instances).
    order: list[str] = field(default_factory=list)
    in_order: list[Instance] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    patchable: bool = False
    # The last build's ids whose instance is not up: with none (or a few), the service's
    # views by state come from the instance tuple in C instead of a pass per instance.
    off: set[str] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.registrations or self.health or self.settings or self.probes)

    def touch(self, kind: str, iid: str) -> None:
        """An event changed ``kind`` for ``iid`` (a probe verdict's id is ``<id>/<prober>``)."""
        if kind != "settings":
            self.changed.add(iid.partition("/")[0])

    def build(
        self, name: str, policy: ProbePolicy = DEFAULT_POLICY, previous: Service | None = None
    ) -> Service:
        """The service as it now is; ``previous``: the one the last build returned."""
        patched = self.patchable and not self.probes
        if patched:
            self._patch()
            panic = False
        else:
            panic = self._rebuild(policy)
        service = Service.model_construct(
            _SERVICE_FIELDS,
            name=name,
            instances=tuple(self.in_order),
            settings=dict(sorted(self.settings.items())),
            panic=panic,
        )
        self._seed_views(service, previous if patched else None)
        self.changed = set()
        return service

    def _seed_views(self, service: Service, previous: Service | None) -> None:
        """Fill ``service``'s views by state (its cached ``up``, ``draining``, ``down``,
        ``up_ids``) from what this state knows, where that is cheaper than the pass per
        instance they would otherwise take: ~22 ms a change for one service of 100,000,
        paid by the guard's ``up_ids`` and the render's ``up``.

        The views are cut from the instance tuple at the few positions of the instances
        not up (none: ``up`` is that tuple); ``up_ids`` is the previous build's, patched
        with the ids changed since, when that build's had been computed (``previous``:
        a patched build, so its ids are those of the last build). Many instances not up:
        left to the properties."""
        instances = service.instances
        if len(self.off) * 8 > len(instances):
            return
        at = sorted(bisect_left(self.order, iid) for iid in self.off)
        others = [instances[index] for index in at]
        views = service.__dict__
        views["up"] = _without(instances, at)
        views["draining"] = tuple([i for i in others if i.state is State.DRAIN])
        views["down"] = tuple([i for i in others if i.state is State.DOWN])
        before = None if previous is None else previous.__dict__.get("up_ids")
        if before is not None:
            views["up_ids"] = self._patched_up_ids(before)

    def _patched_up_ids(self, before: frozenset[str]) -> frozenset[str]:
        """``before`` (the last build's ids up) with the ids changed since brought up to date:
        the very same set when none of them came or went."""
        now_up = {iid for iid in self.changed if iid in self.instances and iid not in self.off}
        added = now_up - before
        removed = (self.changed - now_up) & before
        if not added and not removed:
            return before
        return (before - removed) | added

    def _rebuild(self, policy: ProbePolicy) -> bool:
        """Every instance, reusing those whose inputs are the same objects; the panic."""
        ids = sorted(self.registrations)
        probed, panic = self._probed(ids, policy)
        built: dict[str, _Built] = {}
        registrations, health_marks, probes = self.registrations, self.health, self.probes
        last_built = self.instances
        for index, iid in enumerate(ids):
            reg, health = registrations[iid], health_marks.get(iid)
            verdicts = probes.get(iid)
            probed_down = probed is not None and probed[index]
            applied = probed_down and not panic
            last = last_built.get(iid)
            if last is not None and _same_inputs(last, reg, health, verdicts, applied):
                built[iid] = last  # parsed objects are replaced on every put: same = unchanged
            else:
                instance = _instance(
                    iid,
                    reg,
                    health,
                    verdicts or _NO_VERDICTS,
                    probed_down=probed_down,
                    applied=applied,
                )
                built[iid] = (reg, health, verdicts, applied, instance)
        self.instances = built
        self.order = ids
        self.in_order = [entry[4] for entry in built.values()]
        self.off = {iid for iid, entry in built.items() if entry[4].state is not State.UP}
        self.patchable = probed is None
        return panic

    def _patch(self) -> None:
        """``_rebuild``'s result for a service without verdicts, from the changed ids only."""
        for iid in self.changed:
            at = bisect_left(self.order, iid)
            present = at < len(self.order) and self.order[at] == iid
            reg = self.registrations.get(iid)
            self.off.discard(iid)
            if reg is None:
                self.instances.pop(iid, None)
                if present:
                    del self.order[at], self.in_order[at]
                continue
            health, last = self.health.get(iid), self.instances.get(iid)
            if last is not None and _same_inputs(last, reg, health, None, False):
                instance = last[4]
            else:
                instance = _instance(
                    iid, reg, health, _NO_VERDICTS, probed_down=False, applied=False
                )
                self.instances[iid] = (reg, health, None, False, instance)
            if instance.state is not State.UP:
                self.off.add(iid)
            if present:
                self.in_order[at] = instance
            else:
                self.order.insert(at, iid)
                self.in_order.insert(at, instance)

    def _probed(self, ids: list[str], policy: ProbePolicy) -> tuple[list[bool] | None, bool]:
        """Which of ``ids`` a quorum of probers says down (None: no verdicts at all, so
        none), and whether the service is in panic."""
        if not self.probes:
            return None, False
        probed = [quorum_down(self.probes.get(iid), policy.quorum) for iid in ids]
        bases = [self._base_state(iid) for iid in ids]
        return probed, in_panic(bases, probed, policy.panic_threshold)

    def _base_state(self, iid: str) -> State:
        health = self.health.get(iid)
        return self.registrations[iid].state.worse(health.status if health else None)


def _without(items: tuple[Instance, ...], at: list[int]) -> tuple[Instance, ...]:
    """``items`` but those at the sorted positions ``at`` (none: ``items`` itself)."""
    if not at:
        return items
    bounds = pairwise([-1, *at, len(items)])
    return tuple(chain.from_iterable(items[start + 1 : end] for start, end in bounds))


# Every field is set, and a frozen model never changes its fields-set: one shared set
# instead of one per object (a set of 8 names is ~730 bytes; 10,000 instances: ~7 MB).
_INSTANCE_FIELDS = set(Instance.model_fields)
_NO_VERDICTS: Mapping[str, ProbeVerdict] = {}  # shared, never mutated: 64 bytes an instance
_SERVICE_FIELDS = set(Service.model_fields)


def _same_inputs(
    last: _Built,
    reg: Registration,
    health: HealthMark | None,
    verdicts: Mapping[str, ProbeVerdict] | None,
    applied: bool,
) -> bool:
    return last[0] is reg and last[1] is health and last[2] is verdicts and last[3] == applied


def _instance(
    iid: str,
    reg: Registration,
    health: HealthMark | None,
    verdicts: Mapping[str, ProbeVerdict],
    *,
    probed_down: bool,
    applied: bool,
) -> Instance:
    """``applied``: the quorum's down verdict counts (it does not while the service panics)."""
    state = reg.state.worse(health.status if health else None)
    return construct(
        Instance,
        _INSTANCE_FIELDS,
        {
            "id": iid,
            "host": reg.host,
            "port": reg.port,
            "weight": reg.weight,
            "state": state.worse(State.DOWN if applied else None),
            "registered_state": reg.state,
            "health": health,
            "meta": reg.meta,
            "probes": verdicts,
            "probed_down": probed_down,
        },
    )


_Model = TypeVar("_Model", bound=BaseModel)


def construct(cls: type[_Model], fields_set: set[str], values: dict[str, Any]) -> _Model:
    """``cls.model_construct(fields_set, **values)`` given every field, at a tenth of the cost.

    ``model_construct`` looks up aliases and defaults field by field (~9 µs an Instance,
    a third of a full load); with all fields given, what it does comes down to these
    four attributes (``test_catalog`` holds the two equal)."""
    model = cls.__new__(cls)
    _set(model, "__dict__", values)
    _set(model, "__pydantic_fields_set__", fields_set)
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


_set = object.__setattr__
