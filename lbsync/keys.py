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

import re
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


# One full match instead of a split and a match per part: the full load parses every key.
_PLACE = re.compile(
    rf"/{SERVICES}/(?P<service>{SERVICE_NAME.pattern})/(?:"
    rf"(?P<kind>instances|health)/(?P<id>{INSTANCE_ID.pattern})"
    r"|(?P<settings>settings)"
    rf"|probes/(?P<probed>{INSTANCE_ID.pattern})/(?P<prober>{PROBER_NAME.pattern}))"
)


def place(relative: str) -> tuple[str, Kind, str] | None:
    """``/services/web/instances/a`` → ``("web", "instances", "a")``; None if off-schema.

    ``relative`` is the key with the prefix taken off (it starts with ``/``); settings
    have ``""`` as their id. A probe verdict ``/services/web/probes/a/p1`` →
    ``("web", "probes", "a/p1")``: instance id and prober name, both safe names (so the
    ``/`` splits them unambiguously). A service or id that is not a safe name is off-schema: it is
    kept as a raw key only and never becomes an upstream or server name.
    """
    match = _PLACE.fullmatch(relative)
    if match is None:
        return None
    service, kind = match["service"], match["kind"]
    if kind == "instances":
        return service, "instances", match["id"]
    if kind == "health":
        return service, "health", match["id"]
    if match["settings"]:
        return service, "settings", ""
    return service, "probes", f"{match['probed']}/{match['prober']}"
