"""HAProxy server slots: which slot each instance holds, and what each slot should be."""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import lbsync.drivers.haproxy.admin_commands as cmd
from lbsync.model import Instance, Service

FREE_HOST = "127.0.0.1"
FREE_PORT = 1
MIN_POOL = 16
POOL_STEP = 16
# A ``slots`` setting is honoured up to a power of two >= SLOTS_PER_INSTANCE x instances (at
# least SLOTS_HEADROOM): one etcd writer cannot make a 4-instance service render 4,096
# slots, and the cap moves only when the instance count doubles or halves (a resize is a
# reload).
SLOTS_PER_INSTANCE = 4
SLOTS_HEADROOM = 256
MAX_WEIGHT = cmd.MAX_WEIGHT  # HAProxy's limit for a server weight
AdminState = Literal["ready", "drain", "maint"]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]*$")


class Slot(NamedTuple):
    """One ``server`` line of a backend: a slot name and the instance holding it, if any.

    A tuple, so ``{% for name, instance in slots[svc] %}`` works in templates too.
    """

    name: str
    instance: Instance | None = None

    @property
    def free(self) -> bool:
        return self.instance is None

    @property
    def address(self) -> str:
        return f"{FREE_HOST}:{FREE_PORT}" if self.instance is None else self.instance.address

    @property
    def weight(self) -> int:
        """The ``weight`` to render: 0 while draining (HAProxy has no ``drain`` keyword)."""
        want = Want.of(self)
        return 0 if want.admin == "drain" else want.weight

    @property
    def disabled(self) -> bool:
        return Want.of(self).admin == "maint"

    @property
    def number(self) -> int:
        """The slot's number, ``N`` of ``sN``: rendered as the server's ``id``."""
        return int(self.name[1:])

    @property
    def id(self) -> str | None:
        """The instance id for the ``lbsync-id`` marker, if it is safe in a comment."""
        if self.instance is None or not _SAFE_ID.match(self.instance.id):
            return None
        return self.instance.id


class Want(NamedTuple):
    """What one server should be: address, weight and admin state."""

    host: str
    port: int
    weight: int
    admin: AdminState

    @classmethod
    def of(cls, slot: Slot) -> Want:
        inst = slot.instance
        if inst is None:
            return cls(FREE_HOST, FREE_PORT, 1, "maint")
        weight = max(0, min(inst.weight, MAX_WEIGHT))
        admin: AdminState = (
            "maint" if inst.down else "drain" if inst.draining or not weight else "ready"
        )
        return cls(inst.host, inst.port, weight, admin)


def slots_cap(instances: int) -> int:
    """The largest pool a ``slots`` setting may ask for, given the service's instances."""
    wanted = SLOTS_PER_INSTANCE * instances
    return max(SLOTS_HEADROOM, 1 << (wanted - 1).bit_length()) if wanted else SLOTS_HEADROOM


def pool_size(instances: int, configured: int | None) -> int:
    """Slots for a service: ``configured`` if it fits, else 2x instances rounded up to 16."""
    if configured is not None and instances <= configured:
        return configured
    doubled = POOL_STEP * math.ceil(2 * instances / POOL_STEP)
    return max(MIN_POOL, configured or 0, doubled)


@dataclass
class _Pool:
    size: int
    configured: int | None
    held: dict[str, int]  # instance id -> slot index (0-based)
    seeded: bool = False  # read back from the live config: adopt the setting as it is
    service: Service | None = None  # what ``assigned`` was computed for
    assigned: Assigned | None = None
    free: list[int] = field(default_factory=list)  # heap of free slot indexes


class Assigned(NamedTuple):
    """A backend's slots, and the same slots in blocks of ``BLOCK`` for cached rendering.

    A slot or block that did not change since the previous assignment is the very same
    object, so "what changed" is an identity comparison, block by block.
    """

    slots: tuple[Slot, ...]
    blocks: tuple[tuple[Slot, ...], ...]


class SlotTable:
    """Remembers which slot each instance holds, per service.

    Deterministic: the same memory and snapshot give the same slots, and assigning the same
    snapshot twice changes nothing. An instance keeps its slot while it exists; new
    instances (in id order) take the lowest free slots. A pool only grows, when its
    instances no longer fit, or follows a changed ``slots`` setting. An unchanged
    ``Service`` object (snapshots share them) gets its previous slots back at no cost; a
    changed one costs a pass over its instances, and only the slots whose instance changed
    are new objects (same size) — the rest, and every untouched block, are reused.
    """

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}

    def seed(self, service: str, size: int, held: Mapping[str, int]) -> None:
        """Adopt what a previous lbsync rendered (read back from the live config)."""
        self._pools[service] = _Pool(size, None, dict(held), seeded=True)

    def assign(self, service: Service, configured: int | None) -> tuple[Slot, ...]:
        return self.assigned(service, configured).slots

    def assigned(self, service: Service, configured: int | None) -> Assigned:
        pool = self._pools.get(service.name)
        if (
            pool is not None
            and pool.service is service
            and pool.configured == configured
            and pool.assigned is not None
        ):
            return pool.assigned
        previous = pool.assigned if pool is not None else None
        pool = self._resize(service, configured)
        if previous is not None and len(previous.slots) == pool.size:
            pool.assigned = _update(pool, service, previous)
        else:
            pool.assigned = _rebuild(pool, service)
        pool.service = service
        return pool.assigned

    def forget_except(self, services: Iterable[str]) -> None:
        keep = set(services)
        for name in [n for n in self._pools if n not in keep]:
            del self._pools[name]

    def _resize(self, service: Service, configured: int | None) -> _Pool:
        count = len(service.instances)
        pool = self._pools.get(service.name)
        if pool is None:
            pool = self._pools[service.name] = _Pool(pool_size(count, configured), configured, {})
        else:
            new_setting = configured not in (None, pool.configured) and not pool.seeded
            if new_setting or count > pool.size:
                pool.size = pool_size(count, configured)
        pool.configured, pool.seeded = configured, False
        return pool


BLOCK = 256  # slots per render block: a change re-renders its block, not the backend


def _rebuild(pool: _Pool, service: Service) -> Assigned:
    """Assign from the pool's memory alone (first time, or the pool changed size)."""
    present = {inst.id: inst for inst in service.instances}
    held = {i: idx for i, idx in pool.held.items() if i in present and idx < pool.size}
    taken = set(held.values())
    pool.free = [idx for idx in range(pool.size) if idx not in taken]  # sorted: a heap
    for inst in service.instances:
        if inst.id not in held:
            held[inst.id] = heapq.heappop(pool.free)
    pool.held = held
    slots = _free_slots(pool.size)
    for iid, idx in held.items():
        slots[idx] = _new_slot(Slot, (slots[idx].name, present[iid]))
    blocks = tuple(tuple(slots[k : k + BLOCK]) for k in range(0, len(slots), BLOCK))
    return Assigned(tuple(slots), blocks)


def _update(pool: _Pool, service: Service, previous: Assigned) -> Assigned:
    """The same result as ``_rebuild``, touching only the slots whose instance changed."""
    held, free = pool.held, pool.free
    gone, arrived = _instance_changes(pool.service, service)
    slots = list(previous.slots)
    changed: set[int] = set()
    for iid in gone:
        idx = held.pop(iid)
        slots[idx] = _free_slot(idx)
        heapq.heappush(free, idx)
        changed.add(idx)
    for inst in arrived:  # in id order: newcomers take the lowest free slots
        idx = held.get(inst.id, -1)
        if idx < 0:
            idx = held[inst.id] = heapq.heappop(free)
        slots[idx] = _new_slot(Slot, (slots[idx].name, inst))
        changed.add(idx)
    blocks = list(previous.blocks)
    for b in {idx // BLOCK for idx in changed}:
        blocks[b] = tuple(slots[b * BLOCK : (b + 1) * BLOCK])
    return Assigned(tuple(slots), tuple(blocks))


def _instance_changes(before: Service | None, after: Service) -> tuple[list[str], list[Instance]]:
    """(ids gone, instances new or changed, in id order) from ``before`` to ``after``.

    Both are sorted by id; with the same ids in the same places (the usual case: a
    weight, state or address changed) this is one pass of pairwise comparisons.
    """
    old = before.instances if before is not None else ()
    new = after.instances
    if len(old) == len(new):
        arrived = []
        for a, b in zip(old, new, strict=True):
            if a is b or _same_instance(a, b):
                continue
            if a.id != b.id:
                break  # ids moved: an add and a remove; take the general way
            arrived.append(b)
        else:
            return [], arrived
    present = {i.id: i for i in old}
    ids = {i.id for i in new}
    gone = [i.id for i in old if i.id not in ids]
    arrived = []
    for inst in new:
        prev = present.get(inst.id)
        if prev is None or not (prev is inst or _same_instance(prev, inst)):
            arrived.append(inst)
    return gone, arrived


def _same_instance(a: Instance, b: Instance) -> bool:
    """``a == b`` for these frozen models, ~4x faster than pydantic's ``__eq__``."""
    return type(a) is type(b) and a.__dict__ == b.__dict__


def changed_slots(before: Assigned, after: Assigned) -> list[int] | None:
    """Indexes of the slots that are not the same object in both; None if the sizes differ."""
    if len(before.slots) != len(after.slots):
        return None
    found: list[int] = []
    for b, (old, new) in enumerate(zip(before.blocks, after.blocks, strict=True)):
        if old is not new:
            base = b * BLOCK
            found.extend(
                base + i for i, (x, y) in enumerate(zip(old, new, strict=True)) if x is not y
            )
    return found


_FREE: list[Slot] = []
_new_slot = tuple.__new__  # Slot(...) without NamedTuple's keyword-handling wrapper: 2x faster


def _free_slots(size: int) -> list[Slot]:
    """A fresh list of ``size`` free slots (the free Slot tuples are built once, shared)."""
    while len(_FREE) < size:
        _FREE.append(Slot(f"s{len(_FREE) + 1}"))
    return _FREE[:size]


def _free_slot(idx: int) -> Slot:
    if idx >= len(_FREE):
        _free_slots(idx + 1)
    return _FREE[idx]
