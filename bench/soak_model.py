"""The soak's ground truth and its churn, both computed without lbsync's code.

``expected_servers`` applies the documented key schema (README "Key schema") to etcd's
keys with this file's own small validator: the worse of registration state and health
mark, a value that fails the schema dropped (a bad health mark counts as no mark).
``rendered_servers`` reads the ``server`` lines of the generated upstream file.
``Churn`` draws random changes: registrations, health marks, deletes and hostile values.

The validator is stricter than lbsync's (IPv4 literals only, no meta): the churn writes
only values that are clearly inside the schema or clearly outside it, so both agree.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import env

SERVICES = ("app", "api", "web")
ANCHOR = ("app", "anchor")  # never touched: the catalog is never empty (the guard's rule)
IDS_PER_SERVICE = 12
BAD = {"up": 0, "drain": 1, "down": 2}
MAX_DEPTH = 4

HOSTILE_INSTANCES = (
    '{"host": "127.0.0.1;include /etc/passwd", "port": 80}',
    '{"host": "127.0.0.1\\nserver 6.6.6.6:80", "port": 80}',
    '{"host": "127.0.0.1 }", "port": 80}',
    '{"host": "\\uff11\\uff12\\uff17.0.0.1", "port": 80}',  # fullwidth digits
    '{"host": "127.0.0.1", "port": 1e400}',
    '{"host": "127.0.0.1", "port": 0}',
    '{"host": "127.0.0.1", "port": 70000}',
    '{"host": "127.0.0.1", "port": true}',
    '{"host": "127.0.0.1", "port": 80, "weight": 999}',
    '{"host": "127.0.0.1", "port": 80, "state": "sideways"}',
    '{"host": "127.0.0.1", "port": "80\\u0000"}',
    '{"host": "127.0.0.1", "port": 80, "meta": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}}',
    '"127.0.0.1:80; include /etc/passwd"',
    "not json {",
    "[1, 2, 3]",
)
HOSTILE_MARKS = (
    '{"status": "down; x"}',
    '"sideways"',
    '{"status": "down", "reason": "a\\nb"}',
    "[1, 2]",
    '{"status": "drain", "by": "x\\u0007"}',
)

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")
_BARE = re.compile(r"(?P<host>[0-9.]+):(?P<port>[0-9]{1,5})")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_REASON = re.compile(r"[A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]{0,200}")

Server = tuple[str, str, int, bool]  # (service, address, weight, drain)


# --- the schema, independently -----------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _int_in(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    if isinstance(value, str):
        if not _PORT_TEXT.fullmatch(value):
            return None
        value = int(value)
    return value if low <= value <= high else None


def registration(raw: str) -> tuple[str, int, int, str] | None:
    """(host, port, weight, state) of a valid instance value, else None."""
    if bare := _BARE.fullmatch(raw):
        port = _int_in(bare["port"], 1, 65535)
        ok = _IPV4.fullmatch(bare["host"]) and port
        return (bare["host"], port, 1, "up") if ok and port else None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or _depth(value) > MAX_DEPTH:
        return None
    host = value.get("host")
    port = _int_in(value.get("port"), 1, 65535)
    weight = _int_in(value.get("weight", 1), 1, 256)
    state = value.get("state", "up")
    if not (isinstance(host, str) and _IPV4.fullmatch(host)) or port is None or weight is None:
        return None
    return (host, port, weight, state) if state in BAD else None


def health_status(raw: str) -> str | None:
    """The status of a valid health mark, else None (no mark)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, str):
        return value if value in BAD else None
    if not isinstance(value, dict) or _depth(value) > MAX_DEPTH:
        return None
    texts = [value.get(k, "") for k in ("reason", "by")]
    if not all(isinstance(t, str) and _REASON.fullmatch(t) for t in texts):
        return None
    status = value.get("status")
    return status if status in BAD else None


def expected_servers(keys: dict[str, bytes]) -> set[Server]:
    """Every server line etcd's keys call for in the stock nginx template."""
    regs: dict[tuple[str, str], tuple[str, int, int, str]] = {}
    marks: dict[tuple[str, str], str] = {}
    for key, raw in keys.items():
        parts = key[len(env.PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "services":
            continue
        text = raw.decode("utf-8", errors="replace")
        where = (parts[2], parts[4])
        if parts[3] == "instances" and (reg := registration(text)) is not None:
            regs[where] = reg
        elif parts[3] == "health" and (status := health_status(text)) is not None:
            marks[where] = status
    servers = set()
    for (svc, iid), (host, port, weight, state) in regs.items():
        worst = max(state, marks.get((svc, iid), "up"), key=BAD.__getitem__)
        if worst != "down":
            servers.add((svc, f"{host}:{port}", weight, worst == "drain"))
    return servers


_UPSTREAM = re.compile(r"upstream (\S+) \{")
_SERVER = re.compile(r"\s+server (\S+) weight=(\d+)( down)?;.*")


def rendered_servers(path: Path) -> set[Server]:
    """The ``server`` lines of the generated file (placeholders have no weight: skipped)."""
    servers, service = set(), ""
    for line in path.read_text().splitlines():
        if m := _UPSTREAM.fullmatch(line):
            service = m.group(1)
        elif m := _SERVER.fullmatch(line):
            servers.add((service, m.group(1), int(m.group(2)), bool(m.group(3))))
    return servers


# --- churn -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    kind: str  # register, mark, unmark, delete, hostile
    key: str
    value: str | None  # None: delete


class Churn:
    """Random changes over a small, fixed key space, so that changes hit existing keys."""

    def __init__(self, rng: random.Random, backend_ports: list[int]) -> None:
        self.rng = rng
        self.ports = backend_ports

    def anchor(self) -> Change:
        svc, iid = ANCHOR
        return Change("register", env.instance_key(svc, iid), self._instance(0, 0))

    def _instance(self, s: int, i: int) -> str:
        # One loopback address per instance (the backend nginx listens on every address).
        host = f"127.0.{1 + s}.{1 + i}"
        weight = self.rng.choice((1, 1, 2, 5))
        state = self.rng.choice(("up", "up", "up", "drain", "down"))
        return json.dumps(
            {"host": host, "port": self.rng.choice(self.ports), "weight": weight, "state": state}
        )

    def next(self) -> Change:
        s = self.rng.randrange(len(SERVICES))
        i = self.rng.randrange(IDS_PER_SERVICE)
        svc, iid = SERVICES[s], f"i{i:02d}"
        roll = self.rng.random()
        if roll < 0.35:
            return Change("register", env.instance_key(svc, iid), self._instance(s, 1 + i))
        if roll < 0.55:
            mark = self.rng.choice(
                ('"down"', '"drain"', '"up"', '{"status": "down", "reason": "soak", "by": "bench"}')
            )
            return Change("mark", env.health_key(svc, iid), mark)
        if roll < 0.65:
            return Change("unmark", env.health_key(svc, iid), None)
        if roll < 0.85:
            return Change("delete", env.instance_key(svc, iid), None)
        if self.rng.random() < 0.7:
            value = self.rng.choice(HOSTILE_INSTANCES)
            return Change("hostile", env.instance_key(svc, iid), value)
        return Change("hostile", env.health_key(svc, iid), self.rng.choice(HOSTILE_MARKS))
