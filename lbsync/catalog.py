"""Source events → an in-memory catalog → frozen snapshots.

The catalog never re-reads the prefix: each event touches one key, marks one service
dirty, and the next snapshot rebuilds only the dirty services (the rest are shared with
the previous snapshot). Values are untrusted: everything that may reach a config file is
checked here, and a bad value is dropped with a warning naming its key — the rest of the
catalog still renders.

Keys (relative to the prefix)::

    /services/<service>/instances/<id>   {"host", "port", "weight", "state", "meta"} | "host:port"
    /services/<service>/health/<id>      {"status", "reason", "by"} | "down" | "drain" | "up"
    /services/<service>/settings         {"balance": "least_conn", ...}

Every other key under the prefix is kept only as a raw key for ``getv``/``ls``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from lbsync.errors import InvalidValue
from lbsync.model import (
    HealthMark,
    Instance,
    KeyEvent,
    KeyValue,
    Service,
    SettingValue,
    Snapshot,
    SourceEvents,
    SourceReset,
    State,
)

MAX_WEIGHT = 256  # HAProxy's ceiling; nginx accepts it too
MAX_META_ITEMS = 32
MAX_VALUE_BYTES = 64 * 1024

SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
SETTING_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
# Safe to place unquoted inside an nginx or HAProxy directive: no whitespace, no ; { } #,
# no quotes or backslashes, nothing outside printable ASCII.
SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.:/@=+,%~-]{1,256}$")
# Free text (health reasons) may have spaces but nothing that ends a line or a directive.
SAFE_TEXT = re.compile(r"^[A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]{0,200}$")
DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

Reject = Callable[[InvalidValue], None]


def parse_host(key: str, raw: object) -> str:
    """An IP literal or a DNS name, nothing else (no ports, brackets, spaces or unicode)."""
    if not isinstance(raw, str) or not raw:
        raise InvalidValue(key, raw, "host must be a non-empty string")
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    name = raw.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(DNS_LABEL.match(label) for label in labels):
        raise InvalidValue(key, raw, "host must be an IP address or a DNS name")
    if labels[-1].isdigit():
        raise InvalidValue(key, raw, "host looks like a malformed IP address")
    return name.lower()


def parse_port(key: str, raw: object) -> int:
    if isinstance(raw, str) and raw.isascii() and raw.isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise InvalidValue(key, raw, "port must be an integer from 1 to 65535")
    return raw


def parse_weight(key: str, raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_WEIGHT:
        raise InvalidValue(key, raw, f"weight must be an integer from 1 to {MAX_WEIGHT}")
    return raw


def parse_state(key: str, raw: object) -> State:
    if isinstance(raw, str) and raw in State.__members__.values():
        return State(raw)
    raise InvalidValue(key, raw, "state must be one of up, drain, down")


def parse_meta(key: str, raw: object) -> dict[str, str]:
    if not isinstance(raw, dict) or len(raw) > MAX_META_ITEMS:
        raise InvalidValue(key, raw, f"meta must be an object of at most {MAX_META_ITEMS} items")
    meta = {}
    for name, value in raw.items():
        text = str(value).lower() if isinstance(value, bool) else value
        if isinstance(text, int | float) and not isinstance(text, bool):
            text = str(text)
        if not SETTING_NAME.match(name) or not isinstance(text, str) or not SAFE_TOKEN.match(text):
            raise InvalidValue(key, {name: value}, "meta values must be short plain tokens")
        meta[name] = text
    return meta


def decode_json_or_text(key: str, value: bytes) -> object:
    """JSON if it looks like JSON, else the stripped text; either way UTF-8 and bounded."""
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidValue(key, value[:64], f"value is larger than {MAX_VALUE_BYTES} bytes")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidValue(key, value[:64], "value is not UTF-8") from exc
    stripped = text.strip()
    if stripped[:1] in ("{", '"'):  # not "[": a bare "[::1]:80" is an address
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InvalidValue(key, text, f"invalid JSON: {exc.msg}") from exc
    return stripped


@dataclass(frozen=True, slots=True)
class Registration:
    """A parsed instance key, before its health mark is merged in."""

    host: str
    port: int
    weight: int
    state: State
    meta: Mapping[str, str]


def parse_registration(key: str, value: bytes) -> Registration:
    data = decode_json_or_text(key, value)
    if isinstance(data, str):
        return _registration_from_text(key, data)
    if not isinstance(data, dict):
        raise InvalidValue(key, data, 'expected {"host": ..., "port": ...} or "host:port"')
    unknown = set(data) - {"host", "port", "weight", "state", "meta"}
    if unknown:
        raise InvalidValue(key, data, f"unknown fields {sorted(unknown)}")
    return Registration(
        host=parse_host(key, data.get("host")),
        port=parse_port(key, data.get("port")),
        weight=parse_weight(key, data.get("weight", 1)),
        state=parse_state(key, data.get("state", "up")),
        meta=parse_meta(key, data.get("meta", {})),
    )


def _registration_from_text(key: str, text: str) -> Registration:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise InvalidValue(key, text, 'a bare value must be "host:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidValue(key, text, 'IPv6 hosts must be bracketed: "[::1]:80"')
    return Registration(parse_host(key, host), parse_port(key, port), 1, State.UP, {})


def parse_health(key: str, value: bytes) -> HealthMark:
    data = decode_json_or_text(key, value)
    if isinstance(data, str):
        return HealthMark(status=parse_state(key, data))
    if not isinstance(data, dict) or "status" not in data:
        raise InvalidValue(key, data, 'expected {"status": "down", ...} or "down"/"drain"/"up"')
    reason, by = data.get("reason", ""), data.get("by", "")
    for text in (reason, by):
        if not isinstance(text, str) or not SAFE_TEXT.match(text):
            raise InvalidValue(key, text, "reason/by must be short single-line text")
    return HealthMark(status=parse_state(key, data["status"]), reason=reason, by=by)


def parse_settings(key: str, value: bytes) -> dict[str, SettingValue]:
    data = decode_json_or_text(key, value)
    if not isinstance(data, dict):
        raise InvalidValue(key, data, "settings must be a JSON object")
    settings: dict[str, SettingValue] = {}
    for name, item in data.items():
        if not SETTING_NAME.match(name):
            raise InvalidValue(key, name, "setting names are letters, digits and _")
        if isinstance(item, str) and not SAFE_TOKEN.match(item):
            raise InvalidValue(key, {name: item}, "setting values must be plain tokens")
        if not isinstance(item, str | int | float | bool):
            raise InvalidValue(key, {name: item}, "setting values must be scalars")
        settings[name] = item
    return settings


@dataclass
class _ServiceState:
    registrations: dict[str, Registration] = field(default_factory=dict)
    health: dict[str, HealthMark] = field(default_factory=dict)
    settings: dict[str, SettingValue] = field(default_factory=dict)
    # The Instance last built for each id, with the registration and health mark it was
    # built from: a rebuild after one event makes one new Instance, not one per instance.
    instances: dict[str, tuple[Registration, HealthMark | None, Instance]] = field(
        default_factory=dict
    )

    def empty(self) -> bool:
        return not (self.registrations or self.health or self.settings)

    def build(self, name: str) -> Service:
        built: dict[str, tuple[Registration, HealthMark | None, Instance]] = {}
        for iid, reg in sorted(self.registrations.items()):
            health = self.health.get(iid)
            last = self.instances.get(iid)
            if last is not None and last[0] is reg and last[1] is health:
                built[iid] = last  # parsed objects are replaced on every put: same = unchanged
            else:
                built[iid] = (reg, health, _instance(iid, reg, health))
        self.instances = built
        return Service.model_construct(
            _SERVICE_FIELDS,
            name=name,
            instances=tuple(entry[2] for entry in built.values()),
            settings=dict(sorted(self.settings.items())),
        )


# Every field is set, and a frozen model never changes its fields-set: one shared set
# instead of one per object (a set of 8 names is ~730 bytes; 10,000 instances: ~7 MB).
_INSTANCE_FIELDS = set(Instance.model_fields)
_SERVICE_FIELDS = set(Service.model_fields)


def _instance(iid: str, reg: Registration, health: HealthMark | None) -> Instance:
    return Instance.model_construct(
        _INSTANCE_FIELDS,
        id=iid,
        host=reg.host,
        port=reg.port,
        weight=reg.weight,
        state=reg.state.worse(health.status if health else None),
        registered_state=reg.state,
        health=health,
        meta=reg.meta,
    )


class Catalog:
    """The current state of the prefix, updated one event at a time."""

    def __init__(self, prefix: str, on_reject: Reject | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.revision = 0
        self._on_reject = on_reject or (lambda _err: None)
        self._keys: dict[str, str] = {}
        self._services: dict[str, _ServiceState] = {}
        self._built: dict[str, Service] = {}
        self._dirty: set[str] = set()
        self._rejected: dict[str, InvalidValue] = {}
        self.synced = False

    @property
    def rejected(self) -> Mapping[str, InvalidValue]:
        """Keys whose current value was refused, with why."""
        return self._rejected

    def reset(self, reset: SourceReset) -> None:
        """Replace everything with a full read (start-up or after compaction)."""
        self._keys.clear()
        self._services.clear()
        self._built.clear()
        self._rejected.clear()
        self._dirty.clear()
        for kv in reset.kvs:
            self._put(kv.key, kv.value)
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
        for name in self._dirty:
            state = self._services.get(name)
            if state is None or state.empty():
                self._services.pop(name, None)
                self._built.pop(name, None)
            else:
                self._built[name] = state.build(name)
        self._dirty.clear()
        services = {name: self._built[name] for name in sorted(self._built)}
        return Snapshot.model_construct(
            revision=self.revision, services=services, keys=dict(self._keys)
        )

    def _apply_one(self, event: KeyEvent) -> str | None:
        if event.kind == "put":
            return self._put(event.key, event.value)
        return self._delete(event.key)

    def _put(self, key: str, value: bytes) -> str | None:
        relative = self._relative(key)
        if relative is None:
            return None
        self._keys[relative] = value.decode("utf-8", errors="replace")
        self._rejected.pop(key, None)
        where = _schema_place(relative)
        if where is None:
            return None
        service, kind, iid = where
        state = self._services.setdefault(service, _ServiceState())
        self._dirty.add(service)
        try:
            self._store(state, kind, iid, key, value)
        except InvalidValue as err:
            whole = InvalidValue(key, value.decode("utf-8", errors="replace")[:256], err.reason)
            self._forget(state, kind, iid)
            self._rejected[key] = whole
            self._on_reject(whole)
        return service

    def _store(self, state: _ServiceState, kind: str, iid: str, key: str, value: bytes) -> None:
        if kind == "instances":
            state.registrations[iid] = parse_registration(key, value)
        elif kind == "health":
            state.health[iid] = parse_health(key, value)
        else:
            state.settings = parse_settings(key, value)

    def _delete(self, key: str) -> str | None:
        relative = self._relative(key)
        if relative is None:
            return None
        self._keys.pop(relative, None)
        self._rejected.pop(key, None)
        where = _schema_place(relative)
        if where is None or where[0] not in self._services:
            return None
        service, kind, iid = where
        self._forget(self._services[service], kind, iid)
        self._dirty.add(service)
        return service

    @staticmethod
    def _forget(state: _ServiceState, kind: str, iid: str) -> None:
        if kind == "instances":
            state.registrations.pop(iid, None)
        elif kind == "health":
            state.health.pop(iid, None)
        else:
            state.settings = {}

    def _relative(self, key: str) -> str | None:
        if self.prefix == "":
            return key
        if key == self.prefix or not key.startswith(self.prefix + "/"):
            return None
        return key[len(self.prefix) :]


def _schema_place(relative: str) -> tuple[str, str, str] | None:
    """``/services/web/instances/a`` → ``("web", "instances", "a")``; None if off-schema.

    A service or id that is not a safe name is off-schema: it is kept as a raw key only and
    never becomes an upstream or server name.
    """
    parts = relative.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != "services":
        return None
    service = parts[2]
    if not SERVICE_NAME.match(service):
        return None
    if len(parts) == 4 and parts[3] == "settings":
        return service, "settings", ""
    if len(parts) == 5 and parts[3] in ("instances", "health") and INSTANCE_ID.match(parts[4]):
        return service, parts[3], parts[4]
    return None
