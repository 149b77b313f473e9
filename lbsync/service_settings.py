"""A service's settings key (``/services/<name>/settings``): each known setting by its own
schema (``KNOWN_SETTINGS``), an unknown one passed to templates only as a plain token
(``SAFE_TOKEN``), a bool or a bounded integer. A bad setting is dropped alone (and
reported); the others of the key are kept. Built on ``lbsync.values``' scalars, under the
same rules; every function raises ``InvalidValue`` only."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from lbsync.errors import InvalidValue
from lbsync.model import SettingValue
from lbsync.values import (
    MAX_PLAIN_INT,
    SAFE_TOKEN,
    SETTING_NAME,
    bounded_int,
    decode_json_or_text,
    parse_host,
    parse_port,
    token,
)

MAX_KEEPALIVE = 10_000  # idle upstream connections per nginx worker
MAX_SLOTS = 4096  # HAProxy server slots per backend a setting may ask for
LISTEN = re.compile(r"(?:(?P<host>\*|[0-9.]{7,15}|\[[0-9A-Fa-f:.]{2,45}\]):)?(?P<port>[0-9]{1,5})")

# Load-balancing methods the stock templates understand. nginx: least_conn, ip_hash,
# random (anything else is round robin); HAProxy: its own names, with nginx's least_conn
# and ip_hash mapped to leastconn and source by the haproxy driver.
BALANCE = frozenset(
    {
        "roundrobin", "round_robin", "least_conn", "ip_hash", "random",
        "leastconn", "source", "static-rr", "first",
    }
)  # fmt: skip


def parse_balance(key: str, raw: object) -> str:
    if isinstance(raw, str) and raw in BALANCE:
        return raw
    raise InvalidValue(key, raw, f"balance must be one of {', '.join(sorted(BALANCE))}")


def parse_keepalive(key: str, raw: object) -> int:
    return bounded_int(key, raw, 0, MAX_KEEPALIVE, "keepalive")


def parse_slots(key: str, raw: object) -> int:
    return bounded_int(key, raw, 1, MAX_SLOTS, "slots")


def parse_listen(key: str, raw: object) -> str:
    """``port`` or ``ip:port`` (IPv6 bracketed), as text: ``"8080"``, ``"[::1]:8080"``.

    Only addresses: no ``unix:`` paths (nginx's master would create a world-writable socket
    wherever the value says), no host names (resolved at load time, by the LB), no
    parameters after the address. ``*:port`` means every address and becomes ``port``.
    """
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    match = LISTEN.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise InvalidValue(key, raw, 'listen must be a port or "ip:port"')
    port = str(parse_port(key, match["port"]))
    host = match["host"]
    if host is None or host == "*":
        return port
    address = parse_host(key, host.strip("[]"))
    if (":" in address) != host.startswith("["):
        raise InvalidValue(key, raw, 'listen must be a port or "ip:port"')
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_plain(key: str, raw: object) -> SettingValue:
    """An unknown setting: a plain token, a bool or a bounded integer; never a float."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        return bounded_int(key, raw, -MAX_PLAIN_INT, MAX_PLAIN_INT, "a setting")
    return token(key, raw, SAFE_TOKEN, "a setting")


KNOWN_SETTINGS: Mapping[str, Callable[[str, object], SettingValue]] = {
    "balance": parse_balance,
    "keepalive": parse_keepalive,
    "listen": parse_listen,
    "slots": parse_slots,
}


def parse_settings(key: str, value: bytes) -> tuple[dict[str, SettingValue], InvalidValue | None]:
    """The settings that pass, and one error naming those that did not (or None).

    A value that is not a JSON object raises. One bad setting drops that setting only: a
    typo in ``balance`` must not also take away the service's ``listen``.
    """
    data = decode_json_or_text(key, value)
    if not isinstance(data, dict):
        raise InvalidValue(key, data, "settings must be a JSON object")
    settings: dict[str, SettingValue] = {}
    refused: list[str] = []
    for name, item in data.items():
        try:
            token(key, name, SETTING_NAME, "setting names")
            settings[name] = KNOWN_SETTINGS.get(name, parse_plain)(key, item)
        except InvalidValue as err:
            refused.append(f"{name!r}: {err.reason}")
    if not refused:
        return settings, None
    return settings, InvalidValue(key, data, "settings dropped: " + "; ".join(refused))
