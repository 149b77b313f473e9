"""The writing side of the key schema: ``lbsync register`` and ``lbsync mark``.

``register`` is what an instance (or its sidecar) runs: it writes its instance key under a
lease and keeps the lease alive, so the key vanishes within the TTL when the process dies
and at once when it is stopped. ``mark`` is what a monitoring system or an operator runs:
it writes the health key that takes a sick instance out of rotation.

Values are checked with the catalog's own parsers (``lbsync.values``) before they are
written: what ``register`` accepts, every lbsync will accept.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError, InvalidValue, SourceError
from lbsync.keys import health_key, instance_key
from lbsync.model import State
from lbsync.source.writer import EtcdWriter, Lease
from lbsync.values import (
    parse_health,
    parse_registration,
)

log = structlog.get_logger("lbsync.registrar")


@dataclass(frozen=True)
class InstanceSpec:
    service: str
    id: str
    host: str
    port: int
    weight: int = 1
    state: State = State.UP
    meta: Mapping[str, str] = field(default_factory=dict)

    def value(self) -> str:
        """The JSON value, checked by the same parser the catalog uses."""
        data: dict[str, object] = {"host": self.host, "port": self.port, "weight": self.weight}
        if self.state is not State.UP:
            data["state"] = self.state.value
        if self.meta:
            data["meta"] = dict(self.meta)
        text = json.dumps(data, sort_keys=True)
        try:
            parse_registration(f"{self.service}/{self.id}", text.encode())
        except InvalidValue as err:
            raise ConfigError(err.reason + f" (got {err.value!r})") from err
        return text


def mark(
    settings: EtcdSettings,
    service: str,
    instance: str,
    state: State,
    *,
    reason: str = "",
    by: str = "lbsync mark",
) -> int:
    """Write a health mark; ``up`` clears it. Returns the etcd revision of the write."""
    key = health_key(settings.prefix, service, instance)
    with EtcdWriter(settings) as writer:
        if state is State.UP and not reason:
            writer.delete(key)
            return writer.revision(key)  # a monitor's role may cover its health keys only
        value = json.dumps({"status": state.value, "reason": reason, "by": by})
        try:
            parse_health(key, value.encode())
        except InvalidValue as err:
            raise ConfigError(f"{err.reason} (got {err.value!r})") from err
        return writer.put(key, value)


class Registrar:
    """Keeps one instance key alive under a lease until ``stop`` is set, then removes it."""

    def __init__(self, settings: EtcdSettings, spec: InstanceSpec, ttl: float) -> None:
        self.settings = settings
        self.spec = spec
        self.ttl = ttl
        self.key = instance_key(settings.prefix, spec.service, spec.id)
        self.value = spec.value()

    def run(self, stop: threading.Event) -> None:
        writer = EtcdWriter(self.settings)
        lease: Lease | None = None
        try:
            while not stop.is_set():
                lease = self._keep_alive(writer, lease)
                stop.wait(self.ttl / 3 if lease else min(1.0, self.ttl / 3))
        finally:
            self._deregister(writer, lease)
            writer.close()

    def _keep_alive(self, writer: EtcdWriter, lease: Lease | None) -> Lease | None:
        """Refresh the lease, or (first time, or after it expired) register afresh."""
        try:
            if lease is not None:
                lease.refresh()
                return lease
            lease = writer.lease(self.ttl)
            revision = writer.put(self.key, self.value, lease=lease)
            log.info("register.put", key=self.key, ttl=lease.ttl, revision=revision)
            return lease
        except SourceError as err:
            log.warning("register.retry", key=self.key, error=str(err))
            return None

    def _deregister(self, writer: EtcdWriter, lease: Lease | None) -> None:
        if lease is None:
            return
        try:
            lease.revoke()
            log.info("register.removed", key=self.key)
        except SourceError as err:
            log.warning("register.remove_failed", key=self.key, error=str(err))
