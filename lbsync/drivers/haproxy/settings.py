"""Per-service HAProxy settings from etcd (``balance``, ``listen``, ``slots``): each value
checked against what HAProxy accepts, a bad one ignored (or capped) and warned about once."""

from __future__ import annotations

import re
from collections.abc import Iterable

import structlog

from lbsync.drivers.haproxy.slots import slots_cap
from lbsync.model import Service
from lbsync.service_settings import MAX_SLOTS

log = structlog.get_logger("lbsync.drivers.haproxy")

_SAFE_BALANCE = re.compile(r"[a-z][a-z_-]*(\([A-Za-z0-9_.-]+\))?")
_BALANCE_ALIASES = {"least_conn": "leastconn", "round_robin": "roundrobin", "ip_hash": "source"}
_LISTEN = re.compile(r"(?:(?P<host>\*|[0-9.]+|\[[0-9A-Fa-f:.]+\]):)?(?P<port>[0-9]{1,5})")


class ServiceSettings:
    """The settings of each service, derived once per ``Service`` object."""

    def __init__(self, target: str) -> None:
        self.name = target
        self._memo: dict[str, tuple[Service, str, str | None]] = {}
        self._warned: set[tuple[str, str, str, str]] = set()

    def forget_except(self, services: Iterable[str]) -> None:
        keep = set(services)
        for name in [n for n in self._memo if n not in keep]:
            del self._memo[name]

    def balance_and_bind(self, service: Service) -> tuple[str, str | None]:
        """(balance, bind) of a service, derived once per ``Service`` object."""
        memo = self._memo.get(service.name)
        if memo is None or memo[0] is not service:
            memo = self._memo[service.name] = (
                service,
                self._balance(service),
                self._bind(service),
            )
        return memo[1], memo[2]

    def slots(self, service: Service) -> int | None:
        value = service.settings.get("slots")
        if value is None:
            return None
        if isinstance(value, int | str) and not isinstance(value, bool):
            number = int(value) if str(value).isascii() and str(value).isdigit() else 0
            if 1 <= number <= MAX_SLOTS:
                cap = slots_cap(len(service.instances))
                if number > cap:
                    self._warn_setting(service.name, "slots", value, f"capped at {cap}")
                return min(number, cap)
        self._warn_setting(service.name, "slots", value)
        return None

    def _balance(self, service: Service) -> str:
        value = str(service.settings.get("balance", "roundrobin"))
        value = _BALANCE_ALIASES.get(value, value)
        if _SAFE_BALANCE.fullmatch(value):
            return value
        self._warn_setting(service.name, "balance", value)
        return "roundrobin"

    def _bind(self, service: Service) -> str | None:
        value = service.settings.get("listen")
        if value is None:
            return None
        match = _LISTEN.fullmatch(str(value)) if not isinstance(value, bool | float) else None
        if match and 1 <= int(match["port"]) <= 65535:
            host = match["host"] or ""
            return f"{'' if host == '*' else host}:{int(match['port'])}"
        self._warn_setting(service.name, "listen", value)
        return None

    def _warn_setting(
        self, service: str, key: str, value: object, outcome: str = "ignored"
    ) -> None:
        if (service, key, repr(value), outcome) not in self._warned:
            self._warned.add((service, key, repr(value), outcome))
            log.warning(
                "haproxy.setting_ignored",
                target=self.name,
                service=service,
                setting=key,
                value=repr(value),
                outcome=outcome,
            )
