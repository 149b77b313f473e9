"""Source events → an in-memory catalog → frozen snapshots.

The catalog never re-reads the prefix: each event touches one key, marks one service
dirty, and the next snapshot rebuilds only the dirty services (the rest are shared with
the previous snapshot). Values are untrusted: everything that may reach a config file is
parsed by ``lbsync.values`` (the schema), and a bad value is dropped with one rejection
naming its key — the rest of the catalog still renders. *Any* exception while decoding or
checking a value counts as a rejection of that key, never as an error of the catalog.

Values by key (the layout is ``lbsync.keys``'s; keys relative to the prefix)::

    /services/<service>/instances/<id>   {"host", "port", "weight", "state", "meta"} | "host:port"
    /services/<service>/health/<id>      {"status", "reason", "by"} | "down" | "drain" | "up"
    /services/<service>/settings         {"balance": "least_conn", ...}
    /services/<service>/probes/<id>/<prober>  {"status": "down", "reason", "since"}  (leased)

Every other key under the prefix is kept only as a raw key for ``getv``/``ls``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import cast

from lbsync import keymap, keys, memory
from lbsync.errors import InvalidValue
from lbsync.keymap import Buckets, KeyMap, bucket_of, group_of
from lbsync.model import KeyEvent, KeyValue, Service, Snapshot, SourceEvents, SourceReset
from lbsync.probes import DEFAULT_POLICY, ProbePolicy
from lbsync.service_settings import parse_settings
from lbsync.service_state import ServiceState
from lbsync.values import parse_health, parse_probe, parse_registration

Reject = Callable[[InvalidValue], None]


class Catalog:
    """The current state of the prefix, updated one event at a time."""

    def __init__(
        self, prefix: str, on_reject: Reject | None = None, probes: ProbePolicy = DEFAULT_POLICY
    ) -> None:
        self.prefix = prefix.rstrip("/")
        self._probe_policy = probes
        self.revision = 0
        self._on_reject = on_reject or (lambda _err: None)
        # Raw keys by group (``lbsync.keymap``); a group handed to a snapshot is shared
        # with it, and copied before the catalog changes it (copy on write); of a big
        # group (Buckets), the list of buckets, then each bucket written (``_owned``).
        self._keys: dict[str, dict[str, str] | Buckets] = {}
        self._shared_groups: set[str] = set()
        self._owned: dict[str, set[int]] = {}
        self._bucketing = True
        self._services: dict[str, ServiceState] = {}
        self._built: dict[str, Service] = {}
        self._dirty: set[str] = set()
        self._rejected: dict[str, InvalidValue] = {}
        self.synced = False

    @property
    def rejected(self) -> Mapping[str, InvalidValue]:
        """Keys whose current value was refused, with why."""
        return self._rejected

    def set_probe_policy(self, policy: ProbePolicy) -> None:
        """A new quorum or panic threshold (SIGHUP): every service is rebuilt with it."""
        if policy != self._probe_policy:
            self._probe_policy = policy
            self._dirty.update(self._services)

    def reset(self, reset: SourceReset) -> None:
        """Replace everything with a full read (start-up or after compaction)."""
        self._keys.clear()
        self._shared_groups.clear()
        self._owned.clear()
        self._services.clear()
        self._built.clear()
        self._rejected.clear()
        self._dirty.clear()
        self._bucketing = False  # a big group is made Buckets once, after the load
        try:
            with memory.no_cyclic_gc():
                for kv in reset.kvs:
                    self._put(kv.key, kv.value)
        finally:
            self._bucketing = True
        for name in [name for name, group in self._keys.items() if len(group) > keymap.BIG_GROUP]:
            self._to_buckets(name)
        self.revision = reset.revision
        self.synced = True

    def apply(self, batch: SourceEvents) -> set[str]:
        """Apply watch events in order; returns the names of services they touched."""
        touched: set[str] = set()
        for event in batch.events:
            service = self._apply_one(event)
            if service:
                touched.add(service)
        self.revision = max(self.revision, batch.revision)
        return touched

    def load(self, kvs: Iterable[KeyValue], revision: int) -> None:
        """Convenience for tests and fakes: a reset from plain key-values."""
        self.reset(SourceReset(revision=revision, kvs=tuple(kvs)))

    def snapshot(self) -> Snapshot:
        with memory.no_cyclic_gc():
            for name in self._dirty:
                state = self._services.get(name)
                if state is None or state.empty():
                    self._services.pop(name, None)
                    self._built.pop(name, None)
                else:
                    previous = self._built.get(name)
                    self._built[name] = state.build(name, self._probe_policy, previous)
        self._dirty.clear()
        services = {name: self._built[name] for name in sorted(self._built)}
        return Snapshot.model_construct(
            revision=self.revision, services=services, keys=self._publish_keys()
        )

    def _publish_keys(self) -> KeyMap:
        """The raw keys for a snapshot: O(groups), every group shared until written."""
        self._shared_groups = set(self._keys)
        self._owned.clear()
        return KeyMap(dict(self._keys))

    def _write_key(self, relative: str, value: str | None) -> None:
        """Set one raw key (``value`` None: delete it), copying first what a snapshot
        holds: the group, or of a big group the list of buckets and the bucket written."""
        name = group_of(relative)
        group = self._keys.get(name)
        if group is None:
            group = self._keys[name] = {}
        elif name in self._shared_groups:
            group = self._keys[name] = (
                dict(group) if isinstance(group, dict) else Buckets(list(group.buckets))
            )
            self._shared_groups.discard(name)
            self._owned[name] = set()
        # ``type`` first: ``isinstance`` of a Mapping subclass costs an ABC check per key.
        part = (
            group if type(group) is dict else self._own_bucket(name, cast(Buckets, group), relative)
        )
        if value is not None:
            part[relative] = value
            if part is group and self._bucketing and len(group) > keymap.BIG_GROUP:
                self._to_buckets(name)
        else:
            part.pop(relative, None)
            if not group:
                del self._keys[name]

    def _to_buckets(self, name: str) -> None:
        group = self._keys[name]
        self._keys[name] = Buckets.of(group)  # new buckets: no snapshot holds them
        self._owned[name] = set(range(keymap.BUCKETS))

    def _own_bucket(self, name: str, group: Buckets, relative: str) -> dict[str, str]:
        """The bucket of ``group`` for ``relative``, copied if a snapshot may hold it."""
        index = bucket_of(relative)
        owned = self._owned.setdefault(name, set())
        if index not in owned:
            group.buckets[index] = dict(group.buckets[index])
            owned.add(index)
        return group.buckets[index]

    def _forget_key(self, relative: str) -> None:
        if relative in self._keys.get(group_of(relative), ()):
            self._write_key(relative, None)

    def _apply_one(self, event: KeyEvent) -> str | None:
        if event.kind == "put":
            return self._put(event.key, event.value)
        return self._delete(event.key)

    def _put(self, key: str, value: bytes) -> str | None:
        relative = self._relative(key)
        if relative is None:
            return None
        self._write_key(relative, value.decode("utf-8", errors="replace"))
        self._rejected.pop(key, None)
        where = keys.place(relative)
        if where is None:
            return None
        service, kind, iid = where
        state = self._services.get(service)
        if state is None:  # not setdefault: that builds a state (five dicts) per key
            state = self._services[service] = ServiceState()
        self._dirty.add(service)
        state.touch(kind, iid)
        try:
            self._store(state, kind, iid, key, value)
        except Exception as exc:  # hostile input: recursion, overflow, unicode, type...
            self._forget(state, kind, iid)
            self._reject(key, value, exc)
        return service

    def _store(self, state: ServiceState, kind: str, iid: str, key: str, value: bytes) -> None:
        if kind == "instances":
            state.registrations[iid] = parse_registration(key, value)
        elif kind == "health":
            state.health[iid] = parse_health(key, value)
        elif kind == "probes":
            iid, prober = iid.split("/")
            verdict = parse_probe(key, value)
            state.probes[iid] = {**state.probes.get(iid, {}), prober: verdict}
        else:
            state.settings, refused = parse_settings(key, value)
            if refused is not None:  # the good settings stay: one rejection for the rest
                self._reject(key, value, refused)

    def _reject(self, key: str, value: bytes, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, InvalidValue) else _unexpected(exc)
        whole = InvalidValue(key, value.decode("utf-8", errors="replace")[:256], reason)
        self._rejected[key] = whole
        self._on_reject(whole)

    def _delete(self, key: str) -> str | None:
        relative = self._relative(key)
        if relative is None:
            return None
        self._forget_key(relative)
        self._rejected.pop(key, None)
        where = keys.place(relative)
        if where is None or where[0] not in self._services:
            return None
        service, kind, iid = where
        state = self._services[service]
        state.touch(kind, iid)
        self._forget(state, kind, iid)
        self._dirty.add(service)
        return service

    @staticmethod
    def _forget(state: ServiceState, kind: str, iid: str) -> None:
        if kind == "instances":
            state.registrations.pop(iid, None)
        elif kind == "health":
            state.health.pop(iid, None)
        elif kind == "probes":
            iid, prober = iid.split("/")
            remaining = {p: v for p, v in state.probes.get(iid, {}).items() if p != prober}
            if remaining:
                state.probes[iid] = remaining
            else:
                state.probes.pop(iid, None)
        else:
            state.settings = {}

    def _relative(self, key: str) -> str | None:
        if self.prefix == "":
            return key
        if key == self.prefix or not key.startswith(self.prefix + "/"):
            return None
        return key[len(self.prefix) :]


def _unexpected(exc: Exception) -> str:
    """The reason recorded for an exception the schema did not raise on purpose."""
    return f"value could not be read ({type(exc).__name__}: {str(exc)[:120]!r})"
