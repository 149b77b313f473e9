"""The key layout under the prefix: build and parse the keys of a service.

    <prefix>/services/<service>/instances/<id>   an instance's registration
    <prefix>/services/<service>/health/<id>      a health mark on that instance
    <prefix>/services/<service>/settings         the service's settings
    <prefix>/services/<service>/probes/<id>/<prober>  a prober's verdict on that instance

The catalog parses keys with ``place``; ``lbsync register``/``mark`` build them with
``instance_key``/``health_key``, ``lbsync probe`` with ``probe_key``. Service names,
instance ids and prober names are safe names (``values.SERVICE_NAME``/``INSTANCE_ID``/
``PROBER_NAME``, full matches): a key with any other name is off-schema, kept as a raw
key only, and ``register`` refuses to write one.
"""

from __future__ import annotations

from typing import Literal

from lbsync.errors import ConfigError
from lbsync.values import INSTANCE_ID, PROBER_NAME, SERVICE_NAME

Kind = Literal["instances", "health", "settings", "probes"]

SERVICES = "services"


def instance_key(prefix: str, service: str, instance: str) -> str:
    return _instance_scoped(prefix, service, "instances", instance)


def health_key(prefix: str, service: str, instance: str) -> str:
    return _instance_scoped(prefix, service, "health", instance)


def probe_key(prefix: str, service: str, instance: str, prober: str) -> str:
    if not PROBER_NAME.fullmatch(prober):
        raise ConfigError(f"prober name {prober!r} must match {PROBER_NAME.pattern}")
    return f"{_instance_scoped(prefix, service, 'probes', instance)}/{prober}"


def _instance_scoped(prefix: str, service: str, kind: Kind, instance: str) -> str:
    if not SERVICE_NAME.fullmatch(service):
        raise ConfigError(f"service name {service!r} must match {SERVICE_NAME.pattern}")
    if not INSTANCE_ID.fullmatch(instance):
        raise ConfigError(f"instance id {instance!r} must match {INSTANCE_ID.pattern}")
    return f"{prefix}/{SERVICES}/{service}/{kind}/{instance}"


def place(relative: str) -> tuple[str, Kind, str] | None:
    """``/services/web/instances/a`` → ``("web", "instances", "a")``; None if off-schema.

    ``relative`` is the key with the prefix taken off (it starts with ``/``); settings
    have ``""`` as their id. A probe verdict ``/services/web/probes/a/p1`` →
    ``("web", "probes", "a/p1")``: instance id and prober name, both safe names (so the
    ``/`` splits them unambiguously). A service or id that is not a safe name is off-schema: it is
    kept as a raw key only and never becomes an upstream or server name.
    """
    parts = relative.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != SERVICES:
        return None
    service = parts[2]
    if not SERVICE_NAME.fullmatch(service):
        return None
    if len(parts) == 4 and parts[3] == "settings":
        return service, "settings", ""
    if len(parts) == 6 and parts[3] == "probes":
        return _probe_place(service, parts[4], parts[5])
    if len(parts) != 5 or not INSTANCE_ID.fullmatch(parts[4]):
        return None
    if parts[3] == "instances":
        return service, "instances", parts[4]
    if parts[3] == "health":
        return service, "health", parts[4]
    return None


def _probe_place(service: str, instance: str, prober: str) -> tuple[str, Kind, str] | None:
    if INSTANCE_ID.fullmatch(instance) and PROBER_NAME.fullmatch(prober):
        return service, "probes", f"{instance}/{prober}"
    return None
