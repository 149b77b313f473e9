"""The frozen data every stage hands to the next: source events, instances, services, snapshots.

Snapshots share unchanged ``Service`` objects with the snapshot before them, so building
one after a single event costs one service, not the whole catalog.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from functools import cache, cached_property
from itertools import compress
from operator import is_not
from typing import Any, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict

from lbsync.keymap import with_groups_from


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the values cached from this object's fields (``cached_property``):
        a copy with ``update`` would otherwise keep the original's, e.g. a service's ``up``."""
        copied = super().model_copy(update=update, deep=deep)
        for name in _cached_names(type(self)):
            copied.__dict__.pop(name, None)
        return copied


@cache
def _cached_names(cls: type) -> tuple[str, ...]:
    """The names of ``cls``'s cached properties (what ``Frozen.model_copy`` drops)."""
    return tuple(
        name
        for klass in cls.__mro__
        for name, attr in vars(klass).items()
        if isinstance(attr, cached_property)
    )


class State(enum.StrEnum):
    """An instance's state; the effective state is the worst of registration, health mark and
    probe verdict."""

    UP = "up"
    DRAIN = "drain"
    DOWN = "down"

    @property
    def badness(self) -> int:
        return _BADNESS[self]

    def worse(self, other: State | None) -> State:
        if other is None:
            return self
        return self if self.badness >= other.badness else other


_BADNESS = {State.UP: 0, State.DRAIN: 1, State.DOWN: 2}


# --- what the source hands the catalog -------------------------------------------------


class KeyValue(NamedTuple):
    """One key as read from etcd. ``key`` is the full key, prefix included.

    A named tuple, not a model: a full read holds one per key (10,000 to 100,000 at
    start-up), and nothing in it needs validating here: the source decodes the key and
    the catalog validates key and value by schema (``lbsync.values``)."""

    key: str
    value: bytes
    mod_revision: int


class KeyEvent(Frozen):
    """One change seen on the watch."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes = b""
    mod_revision: int


class SourceReset(Frozen):
    """A full, consistent read of the prefix at ``revision``: replaces the whole catalog.

    ``cluster_id`` is etcd's (the read's response header); 0 when unknown (a fake source,
    a saved catalog of the older format).
    """

    revision: int
    kvs: tuple[KeyValue, ...]
    cluster_id: int = 0


def source_reset(
    revision: int, kvs: Iterable[tuple[str, bytes, int]], cluster_id: int = 0
) -> SourceReset:
    """A full read as the source hands it over: ``(key, value, mod_revision)`` per key, the
    key decoded, in etcd's order.

    Built without a pydantic pass over the keys (a dict per key validated by
    ``SourceReset.model_validate`` cost ~12 ms of CPU at 10,000 keys, ~200 ms at 100,000;
    this, ~3 ms at 10,000): the types are the caller's contract (mypy's to check), and
    what matters for safety, the key's and the value's content, the catalog validates by
    schema.
    """
    return SourceReset.model_construct(
        revision=revision, kvs=tuple(map(KeyValue._make, kvs)), cluster_id=cluster_id
    )


class SourceEvents(Frozen):
    """Events from one watch response, in order; ``revision`` is the last event's."""

    revision: int
    events: tuple[KeyEvent, ...]


class SourceStatus(Frozen):
    """The source's connection changed: connected, or lost with the reason."""

    connected: bool
    endpoint: str | None = None
    error: str | None = None
    revision: int = 0
    cluster_id: int = 0


SourceMessage = SourceReset | SourceEvents | SourceStatus


# --- what the catalog hands the renderer ----------------------------------------------


class HealthMark(Frozen):
    """A monitoring system's (or operator's) verdict on one instance."""

    status: State
    reason: str = ""
    by: str = ""


class ProbeVerdict(Frozen):
    """One prober's verdict on one instance, as ``lbsync probe`` writes it (under its lease)."""

    status: State
    reason: str = ""
    since: int = 0  # Unix time (seconds) of the transition to ``status``


class Instance(Frozen):
    """One usable registration, validated: host, port and meta are safe to put in a config."""

    id: str
    host: str
    port: int
    weight: int = 1
    state: State = State.UP
    registered_state: State = State.UP
    health: HealthMark | None = None
    meta: Mapping[str, str] = {}
    # Live probers' verdicts by prober name, and whether a quorum of them says down (even
    # when the service's panic threshold makes lbsync ignore it: then ``state`` is not down).
    probes: Mapping[str, ProbeVerdict] = {}
    probed_down: bool = False

    @property
    def address(self) -> str:
        """``host:port``, with IPv6 literals bracketed as both nginx and HAProxy want them.

        Not cached: an 11th key in the instance's ``__dict__`` doubles its size (+5.5 MB
        of RSS at 10,000 instances), and the loop memo reads it once per changed instance."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def up(self) -> bool:
        return self.state is State.UP

    @property
    def draining(self) -> bool:
        return self.state is State.DRAIN

    @property
    def down(self) -> bool:
        return self.state is State.DOWN


SettingValue = str | int | float | bool


class Service(Frozen):
    """A service and its instances, sorted by id so renders are deterministic."""

    name: str
    instances: tuple[Instance, ...] = ()
    settings: Mapping[str, SettingValue] = {}
    # Probes would have taken more than the panic threshold of the registered-up instances
    # out: their verdicts are ignored for this service (see ``lbsync.probes``).
    panic: bool = False

    # The views by state are computed once per (immutable) service: a template reads them
    # on every render, and an unchanged service hands the very same tuples to the next.

    @cached_property
    def up(self) -> tuple[Instance, ...]:
        return _in_state(self.instances, State.UP)

    @cached_property
    def draining(self) -> tuple[Instance, ...]:
        return _in_state(self.instances, State.DRAIN)

    @cached_property
    def down(self) -> tuple[Instance, ...]:
        return _in_state(self.instances, State.DOWN)

    @cached_property
    def up_ids(self) -> frozenset[str]:
        """Ids of the instances in rotation; computed once per (immutable) service, so
        comparing two snapshots costs the services that changed, not every instance."""
        return frozenset([i.id for i in self.up])


def _in_state(instances: tuple[Instance, ...], state: State) -> tuple[Instance, ...]:
    # ``state`` as a local: ``State.UP`` in the comprehension costs an enum attribute
    # lookup per instance (1.1 of 1.5 ms for 10,000).
    return tuple([i for i in instances if i.state is state])


class Snapshot(Frozen):
    """The whole catalog at one etcd revision: what every template renders from.

    ``keys`` holds every raw key under the prefix (prefix stripped, leading ``/`` kept) for
    confd-style ``getv``/``ls``; ``services`` is sorted by name.
    """

    revision: int
    services: Mapping[str, Service] = {}
    keys: Mapping[str, str] = {}

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.services.values())


def service_prefix(name: str) -> str:
    return f"/services/{name}/"


def changed_services(base: Snapshot, candidate: Snapshot) -> list[str]:
    """Services whose object differs between the two snapshots (added and removed too).

    With the same names on both sides (a round that changed instances), the objects are
    compared in C passes: 1,000 services, 0.13 → ~0.03 ms a round (guard, pipeline)."""
    old, new = base.services, candidate.services
    if old.keys() == new.keys():
        return sorted(compress(new, map(is_not, new.values(), map(old.__getitem__, new))))
    return sorted(n for n in old.keys() | new.keys() if old.get(n) is not new.get(n))


def compose(base: Snapshot, candidate: Snapshot, keep: Collection[str]) -> Snapshot:
    """``candidate`` with the services named in ``keep`` (and their raw keys) as in ``base``.

    Reuses the ``Service`` objects of both snapshots (the render cache keys on them);
    shared by the pipeline's failure isolation and the guard's per-service holds."""
    if not keep:
        return candidate
    services = dict(candidate.services)
    for name in keep:
        old = base.services.get(name)
        if old is None:
            services.pop(name, None)
        else:
            services[name] = old
    keys = with_groups_from(candidate.keys, base.keys, keep)  # the keys under their prefixes
    return Snapshot.model_construct(
        revision=candidate.revision, services=dict(sorted(services.items())), keys=keys
    )
