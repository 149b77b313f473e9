"""HAProxy: validated master-worker reloads, and membership changes with no reload at all.

Reload path: ``haproxy -c -dW`` on the staged config plus the listen-address pre-check,
SIGUSR2 to the master (``-W``; the master CLI's ``reload`` when the master is not a local
process, as from a sidecar), then ``show proc`` on the master socket until a new worker
generation is up.

Runtime path: every service is a backend with a fixed pool of server *slots*
(``s1``..``sN``). An instance keeps its slot while it exists; free slots are parked on
``127.0.0.1:1`` and disabled. A change that only moves instances in and out of slots, or
changes their address, weight or state, is applied over the admin socket (``set server``,
``set weight``) and the rendered file (which says the same) is written without a reload.
A change costs what it touches: the slot table updates only the slots whose instance
changed (the rest stay the same objects, in blocks the template caches), the commands
come from the slots that differ between what the runtime holds and the new render, and
only those slots are read back from ``show servers state`` to confirm.

Four HAProxy 2.6 facts shape the code (see ``lb-mechanics.md``, ``server_state.c`` and
docs/haproxy.md):

- ``haproxy -c`` reads the ``server-state-file`` too, and every state it restores that
  differs from the config is a warning, which ``-dW`` makes fatal. ``validate`` therefore
  checks a copy of the staged main config whose ``server-state-file`` is a neutral one.
- Loading a state file does not simply "keep runtime changes": the port is always taken
  from the file, the address only for hostnames, and a server that the config
  ``disabled`` comes back *ready* if it was set ready at runtime after being loaded
  disabled. So a raw dump would resurrect a freed slot, or give it the config's address
  with the old port. Before each reload the dump is therefore checked against the config
  about to be loaded, and every line that disagrees with it (address, port, maint/drain,
  weight) is dropped: the config wins, and only agreeing lines (health-check state) carry
  over. That is safe because the rendered file always holds the runtime membership.
  A reload lbsync does not make (``systemctl reload haproxy``) dumps nothing first, so
  after a runtime change the state file is emptied: it would disagree with the config.
- Servers without an ``id`` are numbered in quadratic time per backend: ``haproxy -c`` on
  one 20,000-slot backend takes ~3.5 s, ~0.4 s with explicit ids (the template sets them).
- ``show proc``'s ``failed`` counter resets to 0 after a successful reload; a reload is
  confirmed by a worker with 0 reloads that was not there before.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
import operator
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import psutil
import structlog

from lbsync.commands import run_command
from lbsync.config import HaproxyTarget
from lbsync.drivers import admin_commands as cmd
from lbsync.drivers.base import Driver, ReloadTicket, StagedConfig, register_driver
from lbsync.drivers.listen import check_listen, haproxy_listens
from lbsync.errors import DriverError, ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.fileio import atomic_write, opened_dir
from lbsync.model import Instance, Service, Snapshot
from lbsync.stage import EXTERNAL_DIR
from lbsync.structure import haproxy_line_shape
from lbsync.values import MAX_SLOTS

log = structlog.get_logger("lbsync.drivers.haproxy")

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
SOCKET_TIMEOUT = 5.0
POLL_INTERVAL = 0.02
MAX_CLI_LINE = 8000  # bytes of ";"-joined commands sent in one admin-socket session
ID_MARKER = "lbsync-id="
EMPTY_STATE = "1\n"  # a server-state file with no servers (version 1)
_RECENT = 4  # snapshots whose slots are remembered for runtime diffs

# srv_admin_state bits (include/haproxy/server-t.h)
FMAINT = 0x01
IMAINT = 0x02
FDRAIN = 0x08

AdminState = Literal["ready", "drain", "maint"]
_PRIORITY: dict[AdminState, int] = {"ready": 0, "drain": 1, "maint": 2}
_SLOT_NAME = re.compile(r"s[1-9]\d*")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]*$")
_SAFE_BALANCE = re.compile(r"[a-z][a-z_-]*(\([A-Za-z0-9_.-]+\))?")
_BALANCE_ALIASES = {"least_conn": "leastconn", "round_robin": "roundrobin", "ip_hash": "source"}
_LISTEN = re.compile(r"(?:(?P<host>\*|[0-9.]+|\[[0-9A-Fa-f:.]+\]):)?(?P<port>[0-9]{1,5})")
_STATE_FILE_LINE = re.compile(r'[ \t]*(server-state-file[ \t]+)("[^"]*"|\S+)')
_SECTIONS = frozenset(
    {
        "global", "defaults", "frontend", "backend", "listen", "peers", "resolvers",
        "userlist", "mailers", "program", "http-errors", "ring", "cache", "fcgi-app",
    }
)  # fmt: skip


# --- what the template renders, and what the runtime should hold ----------------------


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


class RuntimeServer(NamedTuple):
    """One line of ``show servers state``."""

    backend: str
    name: str
    addr: str
    fqdn: str
    port: int
    admin_bits: int
    uweight: int
    line: str = ""

    @property
    def admin(self) -> AdminState:
        if self.admin_bits & (FMAINT | IMAINT):
            return "maint"
        if self.admin_bits & FDRAIN or self.uweight == 0:
            return "drain"
        return "ready"

    def matches(self, want: Want) -> bool:
        """Same address, port and admin state; same weight unless draining."""
        return (
            self.port == want.port
            and _host_matches(self, want.host)
            and self.admin == want.admin
            and (want.admin == "drain" or self.uweight == want.weight)
        )


def _host_matches(server: RuntimeServer, host: str) -> bool:
    if server.addr == host:  # the usual case; parse only to compare spellings (IPv6)
        return True
    ip = _ip(host)
    if ip is None:
        return server.fqdn.lower() == host.lower()
    return _ip(server.addr) == ip


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# --- slot assignment -------------------------------------------------------------------


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


# --- parsing HAProxy's config and CLI output ------------------------------------------


@dataclass(frozen=True)
class ConfigServer:
    want: Want
    instance_id: str | None


def config_servers(text: str) -> dict[str, dict[str, ConfigServer]]:
    """``server`` lines per backend/listen section: what each server is configured to be.

    Tolerant on purpose: it only needs to be right for lines the stock template writes;
    anything it misreads makes a state line look stale, and a stale line is just dropped.
    """
    backends: dict[str, dict[str, ConfigServer]] = {}
    current: dict[str, ConfigServer] | None = None
    for raw in text.splitlines():
        line, _, comment = raw.partition("#")
        words = line.split()
        if not words:
            continue
        if words[0] in _SECTIONS:
            is_proxy = words[0] in ("backend", "listen") and len(words) > 1
            current = backends.setdefault(words[1], {}) if is_proxy else None
        elif current is not None and words[0] == "server" and len(words) >= 3:
            current[words[1]] = _config_server(words[2], words[3:], comment)
    return backends


def _config_server(address: str, params: Sequence[str], comment: str) -> ConfigServer:
    host, port = _split_address(address)
    weight = 1
    for key, value in itertools.pairwise(params):
        if key == "weight" and value.isdigit():
            weight = int(value)
    admin: AdminState = "maint" if "disabled" in params else "drain" if weight == 0 else "ready"
    marker = re.search(re.escape(ID_MARKER) + r"(\S+)", comment)
    return ConfigServer(Want(host, port, weight, admin), marker.group(1) if marker else None)


def _split_address(address: str) -> tuple[str, int]:
    for prefix in ("ipv4@", "ipv6@"):
        address = address.removeprefix(prefix)
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, ""
    return host, int(port) if port.isdigit() else 0


def servers_state(text: str) -> list[RuntimeServer]:
    """Parse ``show servers state`` (format version 1; columns found by header name)."""
    lines = text.split("\n")
    header = next((ln[1:].split() for ln in lines if ln.startswith("# be_id")), None)
    if header is None:
        return []
    width = len(header)
    pick = operator.itemgetter(*(header.index(c) for c in _STATE_COLUMNS))
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) != width or line.startswith("#"):
            continue
        be, srv, addr, fqdn, port, admin, weight = pick(fields)
        if port.isdigit() and admin.isdigit() and weight.isdigit():
            row = (be, srv, addr, fqdn, int(port), int(admin), int(weight), line)
            servers.append(_new_server(RuntimeServer, row))
    return servers


_new_server = tuple.__new__  # as _new_slot: ~20k of these per big backend
_STATE_COLUMNS = (
    "be_name", "srv_name", "srv_addr", "srv_fqdn", "srv_port", "srv_admin_state", "srv_uweight",
)  # fmt: skip


def sanitize_state(dump: str, config_text: str) -> tuple[str, int, int]:
    """Keep the state lines that agree with the config about to be loaded; drop the rest.

    Returns (file text, kept, dropped). See the module docstring for why: HAProxy would
    otherwise resurrect freed slots or mix the config's address with a stale port.
    """
    configured = config_servers(config_text)
    kept: list[str] = []
    dropped = 0
    for server in servers_state(dump):
        conf = configured.get(server.backend, {}).get(server.name)
        if conf is not None and server.matches(conf.want):
            kept.append(server.line)
        else:
            dropped += 1
    header = next((ln for ln in dump.splitlines() if ln.startswith("# be_id")), None)
    text = "1\n" + (header + "\n" if header else "") + "".join(f"{ln}\n" for ln in kept)
    return text, len(kept), dropped


@dataclass(frozen=True)
class Processes:
    """``show proc`` on the master socket."""

    master_pid: int
    reloads: int
    failed: int
    workers: tuple[tuple[int, int], ...]  # (pid, reloads survived); 0 = current generation

    @property
    def current(self) -> tuple[int, ...]:
        """Workers of the latest generation (after a *failed* reload there are none)."""
        return tuple(pid for pid, reloads in self.workers if reloads == 0)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(pid for pid, _ in self.workers)


_PROC_MASTER = re.compile(r"^(\d+)\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", re.MULTILINE)
_PROC_WORKER = re.compile(r"^(\d+)\s+worker\s+(\d+)\s", re.MULTILINE)


def parse_show_proc(text: str) -> Processes:
    master = _PROC_MASTER.search(text)
    if master is None:
        raise ValueError(f"no master line in `show proc` output: {text[:200]!r}")
    workers = tuple((int(m[1]), int(m[2])) for m in _PROC_WORKER.finditer(text))
    return Processes(int(master[1]), int(master[2]), int(master[3]), workers)


# --- the sockets -----------------------------------------------------------------------


class Cli:
    """A one-shot client for HAProxy's stats (admin) socket and master socket.

    Each call is one connection: send, shut down the write side (the master CLI answers
    only after EOF), read to EOF. Every step is bounded by ``timeout``.
    """

    def __init__(self, path: Path, *, target: str, timeout: float = SOCKET_TIMEOUT) -> None:
        self.path = path
        self.target = target
        self.timeout = timeout

    def query(self, command: str) -> str:
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(command.encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
                return _read_all(sock, deadline).decode(errors="replace")
        except OSError as exc:
            what = " ".join(command.split()[:3])
            raise DriverError(
                f"{self.path}: `{what}` failed: {exc.strerror or exc}", target=self.target
            ) from exc


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# --- the driver ------------------------------------------------------------------------


class _Decline(Exception):
    """runtime_update cannot apply this change; the reason goes into the log event."""


@register_driver("haproxy")
class HaproxyDriver(Driver):
    """Drives one master-worker HAProxy (``haproxy -W -S <master.sock> -p <pid>``)."""

    target: HaproxyTarget

    def __init__(self, target: HaproxyTarget) -> None:
        super().__init__(target)
        self._slots = SlotTable()
        self._seeded = False
        self._warned: set[tuple[str, str, str, str]] = set()
        # Slots per backend for the last few snapshots rendered (identity-keyed): the base
        # a runtime update diffs against is the one rendered for the applied snapshot.
        self._recent: list[tuple[Snapshot, dict[str, Assigned]]] = []
        # Backends this driver changed over the admin socket since the last reload.
        self._runtime: dict[str, Assigned] = {}
        self._settings: dict[str, tuple[Service, str, str | None]] = {}

    # -- template context ---------------------------------------------------------------

    def line_shape(self) -> Callable[[str], list[str]]:
        return haproxy_line_shape

    def template_context(self, snapshot: Snapshot) -> Mapping[str, Any]:
        """Slots, balance and bind per service, and the socket/state paths of the target.

        Idempotent for the same snapshot; the slot memory it updates is what
        ``runtime_update`` applies next. ``slot_blocks[name]`` holds the same slots in
        blocks that stay the same objects while unchanged (for ``{% cache %}``).
        """
        assigned = self._assign(snapshot)
        settings = {n: self._service_settings(s) for n, s in snapshot.services.items()}
        return {
            "slots": {n: a.slots for n, a in assigned.items()},
            "slot_blocks": {n: a.blocks for n, a in assigned.items()},
            "balance": {n: balance for n, (balance, _) in settings.items()},
            "bind": {n: bind for n, (_, bind) in settings.items() if bind is not None},
            "admin_socket": _str_or_none(self.target.admin_socket),
            "state_file": _str_or_none(self.target.state_file),
        }

    def _assign(self, snapshot: Snapshot) -> dict[str, Assigned]:
        if self._recent and self._recent[-1][0] is snapshot:
            return self._recent[-1][1]
        if not self._seeded:
            self._seed_from(self.target.config)
            self._seeded = True
        if not self._recent or self._recent[-1][0].services.keys() != snapshot.services.keys():
            self._slots.forget_except(snapshot.services)
            for name in [n for n in self._settings if n not in snapshot.services]:
                del self._settings[name]
        assigned = {
            name: self._slots.assigned(service, self._configured_slots(service))
            for name, service in snapshot.services.items()
        }
        self._recent = [*self._recent[-(_RECENT - 1) :], (snapshot, assigned)]
        return assigned

    def _assigned_for(self, snapshot: Snapshot) -> dict[str, Assigned] | None:
        """The slots rendered for ``snapshot``, if it is one of the last few rendered."""
        return next((a for s, a in reversed(self._recent) if s is snapshot), None)

    def _service_settings(self, service: Service) -> tuple[str, str | None]:
        """(balance, bind) of a service, derived once per ``Service`` object."""
        memo = self._settings.get(service.name)
        if memo is None or memo[0] is not service:
            memo = self._settings[service.name] = (
                service,
                self._balance(service),
                self._bind(service),
            )
        return memo[1], memo[2]

    def _seed_from(self, config: Path) -> None:
        """Take slot assignments from the live config, so a restarted lbsync renders the
        same bytes (no write, no reload) instead of re-packing every backend."""
        try:
            text = config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        for backend, servers in config_servers(text).items():
            indexes = _slot_indexes(servers)
            if indexes is None:
                continue  # not a slot backend (hand-written, or a custom template)
            held = {c.instance_id: indexes[n] for n, c in servers.items() if c.instance_id}
            self._slots.seed(backend, max(indexes.values()) + 1, held)

    def _configured_slots(self, service: Service) -> int | None:
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

    # -- validate -----------------------------------------------------------------------

    def validate(self, staged: StagedConfig) -> None:
        """``haproxy -c -dW`` on the staged main config, then the listen pre-check.

        No ``-q``: in 2.6 it also swallows the ``[ALERT]`` lines that say what is wrong
        (only the ``[NOTICE]`` banner is dropped from the report). The check never reads
        the live state file: a stale one turns into warnings, and ``-dW`` makes warnings
        fatal.
        """
        if staged.main is None:
            raise ValidationFailed("no main config was staged", command=[self.target.binary])
        with _checkable_copy(staged.main) as checked:
            argv = [self.target.binary, "-c", "-dW", "-f", str(checked)]
            try:
                run_command(
                    argv,
                    timeout=self.target.command_timeout,
                    error=ValidationFailed,
                    what="haproxy -c refused the new config",
                )
            except ValidationFailed as err:
                if err.returncode is None:  # did not run or timed out: nothing to translate
                    raise
                raise ValidationFailed(
                    f"haproxy -c refused the new config (exit {err.returncode})",
                    command=[*argv[:-1], str(self.target.config)],
                    returncode=err.returncode,
                    stderr=self._live_paths(_without_notices(err.stderr), checked, staged),
                ) from err
        self._check_new_listens(staged.main)

    def _live_paths(self, text: str, checked: Path, staged: StagedConfig) -> str:
        """Name files as the operator knows them (``/etc/haproxy/…``), not the staging dir."""
        text = text.replace(str(checked), str(staged.main))
        root = str(staged.root)
        text = text.replace(f"{root}/{EXTERNAL_DIR}/", "/")
        return text.replace(root, os.path.dirname(os.path.abspath(self.target.config)))

    def _check_new_listens(self, staged_main: Path) -> None:
        """Refuse a new ``bind`` address that another process holds (``haproxy -c`` can't
        see it, and a reload would then drop traffic for seconds)."""
        live = set(haproxy_listens(self.target.config))
        new = [a for a in dict.fromkeys(haproxy_listens(staged_main)) if a not in live]
        if new:
            log.info("haproxy.new_listens", target=self.name, addresses=[str(a) for a in new])
            check_listen(new, own_pids=self._own_pids(), target=self.name, reuseport=True)

    def _own_pids(self) -> list[int]:
        """The master and its workers, when they are local processes we can see."""
        try:
            found = self._processes(DriverError)
            if found["master_started"] is None:
                return []  # another PID namespace: its pids mean nothing here
            master = psutil.Process(found["master_pid"])
            return [master.pid, *(c.pid for c in master.children(recursive=True))]
        except (DriverError, psutil.Error):
            return []  # HAProxy not running: nothing of ours holds anything

    # -- reload + verify ----------------------------------------------------------------

    def reload(self) -> ReloadTicket:
        """Save the server state (sanitized), then SIGUSR2 to the master.

        A master that answers on its socket but is not a local ``haproxy`` process (a
        sidecar without a shared PID namespace) gets the master CLI's ``reload`` instead:
        its pid means nothing here, and signalling it could hit an unrelated process.
        """
        started = time.monotonic()
        self._runtime.clear()  # from now on HAProxy holds what the config on disk says
        before = self._processes(ReloadFailed)
        saved = self._save_server_state()
        how = "signal" if before["master_started"] is not None else "master_cli"
        try:
            if how == "signal":
                os.kill(before["master_pid"], signal.SIGUSR2)
            else:
                self._master_cli().query("reload")  # 2.6 answers nothing, then closes
        except (OSError, DriverError) as exc:
            raise ReloadFailed(
                f"cannot reload the HAProxy master (pid {before['master_pid']}, by {how}): "
                f"{getattr(exc, 'strerror', None) or exc}",
                target=self.name,
            ) from exc
        log.info("haproxy.reload", target=self.name, by=how, **before, state_file=saved)
        return ReloadTicket(started_at=started, details=before)

    def verify(self, ticket: ReloadTicket) -> None:
        """Poll until a new worker generation serves, bounded by ``verify_timeout``.

        Fails at once if the master died or was replaced, or if ``show proc`` counts a
        failed load; otherwise at the deadline.
        """
        before = ticket.details
        deadline = time.monotonic() + self.target.verify_timeout
        last = "no answer yet"
        while True:
            self._check_master(before)
            try:
                new = self._new_workers(before)
            except VerifyFailed:
                raise
            except DriverError as err:  # the master re-executes itself: retry
                new, last = None, str(err)
            if new:
                log.info(
                    "haproxy.verify",
                    target=self.name,
                    master_pid=before["master_pid"],
                    workers=list(new),
                    ms=round((time.monotonic() - ticket.started_at) * 1000, 1),
                )
                return
            if time.monotonic() >= deadline:
                raise VerifyFailed(
                    f"no new HAProxy worker within {self.target.verify_timeout:g}s ({last})",
                    target=self.name,
                )
            time.sleep(POLL_INTERVAL)

    def _processes(self, error: type[DriverError]) -> dict[str, Any]:
        """Master pid (+ start time, against pid reuse) and all current workers.

        From ``show proc`` when there is a master socket, else from the pid file (then
        the master must be a local ``haproxy`` process, so a stale pid file never gets
        an unrelated process signalled).
        """
        problems = []
        if self.target.master_socket is not None:
            try:
                proc = self._show_proc()
                return {
                    "master_pid": proc.master_pid,
                    "master_started": self._local_master(proc.master_pid),
                    "workers": proc.pids,
                    "reloads": proc.reloads,
                    "failed": proc.failed,
                }
            except DriverError as err:
                problems.append(str(err))
        try:
            pid = int(self.target.pid_file.read_text(encoding="ascii").split()[0])
            started = self._local_master(pid)
            if started is None:
                raise ProcessLookupError(f"pid {pid} is not a running HAProxy")
            children = psutil.Process(pid).children()
        except (OSError, ValueError, IndexError, psutil.Error) as exc:
            problems.append(f"pid file {self.target.pid_file}: {exc}")
            raise error(
                "cannot find the HAProxy master: " + "; ".join(problems), target=self.name
            ) from exc
        return {
            "master_pid": pid,
            "master_started": started,
            "workers": tuple(sorted(c.pid for c in children)),
            "reloads": None,
            "failed": None,
        }

    def _local_master(self, pid: int) -> float | None:
        """The start time of ``pid`` if it is a local HAProxy process, else None."""
        names = {"haproxy", Path(self.target.binary).name}
        try:
            proc = psutil.Process(pid)
            if proc.name() not in names or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc.create_time()
        except psutil.Error:
            return None

    def _master_cli(self) -> Cli:
        assert self.target.master_socket is not None
        return Cli(self.target.master_socket, target=self.name)

    def _show_proc(self) -> Processes:
        text = self._master_cli().query("show proc")
        try:
            return parse_show_proc(text)
        except ValueError as exc:
            raise DriverError(str(exc), target=self.name) from exc

    def _check_master(self, before: Mapping[str, Any]) -> None:
        """Same master process as before the reload (pid and start time, so a reused pid
        does not pass). A master seen only through its socket is checked by ``show proc``."""
        pid = before["master_pid"]
        if before["master_started"] is not None and _start_time(pid) != before["master_started"]:
            raise VerifyFailed(f"the HAProxy master (pid {pid}) is gone", target=self.name)

    def _new_workers(self, before: Mapping[str, Any]) -> tuple[int, ...]:
        old = set(before["workers"])
        if before["reloads"] is None:  # no master socket: the master's children
            try:
                children = psutil.Process(before["master_pid"]).children()
            except psutil.Error as exc:
                raise VerifyFailed(
                    f"the HAProxy master (pid {before['master_pid']}) is gone", target=self.name
                ) from exc
            return tuple(sorted(c.pid for c in children if c.pid not in old))
        proc = self._show_proc()
        if proc.master_pid != before["master_pid"]:
            raise VerifyFailed(
                f"the HAProxy master changed (pid {before['master_pid']} → {proc.master_pid})",
                target=self.name,
            )
        new = tuple(pid for pid in proc.current if pid not in old)
        if not new and proc.reloads > before["reloads"] and proc.failed > before["failed"]:
            raise VerifyFailed(
                "HAProxy refused the new config (Loading failure, "
                f"failed: {proc.failed}); the old workers keep serving",
                target=self.name,
            )
        return new

    def _save_server_state(self) -> dict[str, int] | None:
        """Dump ``show servers state``, keep what agrees with the live config, write it
        atomically. Without an answer from the socket, the old file is re-checked instead
        (a stale file must not bring freed slots back)."""
        path = self.target.state_file
        if path is None:
            return None
        dump = None
        if self.target.admin_socket is not None:
            try:
                dump = self._admin().query("show servers state")
            except DriverError as err:
                log.warning("haproxy.state_dump_failed", target=self.name, error=str(err))
        try:
            if dump is None:
                dump = path.read_text(encoding="utf-8") if path.exists() else ""
            config = self.target.config.read_text(encoding="utf-8", errors="replace")
            text, kept, dropped = sanitize_state(dump, config)
            _write_atomically(path, text)
        except OSError as exc:
            raise ReloadFailed(
                f"cannot write the server state file {path}: {exc.strerror or exc}",
                target=self.name,
            ) from exc
        return {"kept": kept, "dropped": dropped}

    # -- runtime ------------------------------------------------------------------------

    def runtime_update(self, old: Snapshot | None, new: Snapshot) -> bool:
        """Apply a membership-only change over the admin socket; False = reload instead.

        What to send comes from the slots that changed between what the runtime holds
        (the slots rendered for ``old``, or what this driver last sent, since the last
        reload) and the slots for ``new``: a change costs the slots it touches, not the
        backend. Every touched slot is then read back from ``show servers state``; one
        that did not converge is corrected from what HAProxy actually reports, once, and
        the update is declined (→ reload, where the config wins) if it still disagrees.
        Without the slots for ``old`` (a restarted lbsync), whole backends are compared.
        """
        started = time.monotonic()
        try:
            plans = self._runtime_plans(old, new)
            sent = self._apply(plans)
        except _Decline as why:
            log.info("haproxy.runtime_update", target=self.name, applied=False, reason=str(why))
            return False
        for plan in plans:
            self._runtime[plan.backend] = plan.after
        self._forget_server_state()
        log.info(
            "haproxy.runtime_update",
            target=self.name,
            applied=True,
            backends=[p.backend for p in plans],
            slots=sum(len(p.touched or ()) for p in plans),
            commands=sent,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        return True

    def _runtime_plans(self, old: Snapshot | None, new: Snapshot) -> list[_Plan]:
        """The backends to change and their touched slots; _Decline if anything else did."""
        if not self.target.runtime or self.target.admin_socket is None:
            raise _Decline("runtime mode is off")
        if old is None:
            raise _Decline("no applied snapshot to compare with")
        if old.services.keys() != new.services.keys():
            raise _Decline("a backend appeared or disappeared")
        if _other_keys_changed(old, new):
            raise _Decline("keys outside the instance schema changed")
        now = self._assign(new)
        names = [n for n, s in new.services.items() if not _same(old.services[n], s)]
        names += [
            n
            for n, held in self._runtime.items()
            if now.get(n, held) is not held and n not in names
        ]
        if not names:
            raise _Decline("no membership change (the template or something else changed)")
        rendered = self._assigned_for(old) or {}
        plans = []
        for name in names:
            before, after = old.services[name], new.services[name]
            if before.settings != after.settings:
                raise _Decline(f"{name}: settings changed")
            base = self._runtime.get(name) or rendered.get(name)
            plans.append(self._backend_plan(name, base, now[name], before, after))
        return plans

    def _backend_plan(
        self, name: str, base: Assigned | None, after: Assigned, old: Service, new: Service
    ) -> _Plan:
        if base is None:  # compare the whole backend with HAProxy's state
            why = _meta_changed(old, new)
            if why:
                raise _Decline(f"{name}: {why}")
            return _Plan(name, after, None, None, self.name)
        touched = changed_slots(base, after)
        if touched is None:
            grown = len(after.slots) > len(base.slots)
            why = "slots exhausted" if grown else "the slot pool differs"
            raise _Decline(
                f"{name}: {why} (runtime {len(base.slots)}, rendered {len(after.slots)})"
            )
        moved = []
        for idx in touched:
            was, now = base.slots[idx].instance, after.slots[idx].instance
            if was is not None and now is not None and was.id == now.id and was.meta != now.meta:
                raise _Decline(f"{name}: instance {now.id}: meta changed")
            if Want.of(base.slots[idx]) != Want.of(after.slots[idx]):
                moved.append(idx)
        return _Plan(name, after, base, moved, self.name)

    def _apply(self, plans: list[_Plan]) -> int:
        """Send the commands, read the touched slots back; one correction, then give up."""
        batch: list[tuple[int, str]] = []
        try:
            for plan in plans:
                if plan.base is None:
                    state = self._server_state(plan)
                    plan.touched = [
                        idx
                        for idx, slot in enumerate(plan.after.slots)
                        if not state.server(idx, slot.name).matches(Want.of(slot))
                    ]
                    batch += _corrections(plan, state, plan.touched)
                else:
                    assert plan.touched is not None
                    batch += [_transition(plan, idx) for idx in plan.touched]
            sent = 0
            for _attempt in range(2):
                for line in _batches(cmd for _, cmd in sorted(batch, key=lambda c: c[0])):
                    self._admin().query(line)
                sent += len(batch)
                batch = []
                for plan in plans:
                    if plan.touched:
                        state = self._server_state(plan)
                        wrong = [
                            idx
                            for idx in plan.touched
                            if not state.server(idx, plan.after.slots[idx].name).matches(
                                Want.of(plan.after.slots[idx])
                            )
                        ]
                        batch += _corrections(plan, state, wrong)
                if not batch:
                    return sent
        except DriverError as err:
            raise _Decline(f"admin socket: {err}") from err
        raise _Decline("the runtime state did not converge")

    def _server_state(self, plan: _Plan) -> _BackendState:
        """``show servers state <backend>``; _Decline unless it has exactly our slots."""
        answer = self._admin().query(cmd.show_servers_state(plan.backend, target=self.name))
        state = _BackendState(plan.backend, answer)
        if state.count != len(plan.after.slots):
            if not state.count:
                raise _Decline(f"{plan.backend}: not in the running HAProxy")
            grown = len(plan.after.slots) > state.count
            why = "slots exhausted" if grown else "the slot pool differs"
            raise _Decline(
                f"{plan.backend}: {why} (runtime {state.count}, rendered {len(plan.after.slots)})"
            )
        return state

    def _forget_server_state(self) -> None:
        """After a runtime change the state file disagrees with the config on disk, and a
        reload that lbsync does not make (``systemctl reload haproxy``) would let it bring
        freed slots back. Empty it; lbsync's own reloads dump a fresh one first."""
        path = self.target.state_file
        if path is None:
            return
        try:
            if path.stat().st_size <= len(EMPTY_STATE):
                return
            _write_atomically(path, EMPTY_STATE)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(
                "haproxy.state_file_stale", target=self.name, path=str(path), error=str(exc)
            )

    def _admin(self) -> Cli:
        assert self.target.admin_socket is not None
        return Cli(
            self.target.admin_socket,
            target=self.name,
            timeout=min(self.target.command_timeout, SOCKET_TIMEOUT),
        )


@dataclass
class _Plan:
    """One backend of a runtime update: its new slots, the slots the runtime holds (None:
    unknown, compare with HAProxy's state), the indexes of the slots to change and the
    target they belong to (named by the errors of refused commands)."""

    backend: str
    after: Assigned
    base: Assigned | None
    touched: list[int] | None
    target: str


class _BackendState:
    """``show servers state <backend>``, read lazily: HAProxy lists a backend's servers in
    config order, so slot ``s<N>`` is normally line N and only that line is parsed."""

    def __init__(self, backend: str, answer: str) -> None:
        self.backend = backend
        lines = answer.split("\n")
        start = next((n for n, ln in enumerate(lines) if ln.startswith("# be_id")), None)
        self.header = lines[start][1:].split() if start is not None else []
        self.rows = lines[start + 1 :] if start is not None else []
        while self.rows and not self.rows[-1]:
            self.rows.pop()
        self._by_name: dict[str, RuntimeServer] | None = None

    @property
    def count(self) -> int:
        return len(self.rows)

    def server(self, idx: int, name: str) -> RuntimeServer:
        if idx < len(self.rows):
            found = _state_row(self.header, self.rows[idx])
            if found is not None and found.name == name and found.backend == self.backend:
                return found
        if self._by_name is None:
            text = "\n".join(["# " + " ".join(self.header), *self.rows])
            self._by_name = {s.name: s for s in servers_state(text)}
        found = self._by_name.get(name)
        if found is None:
            raise _Decline(f"{self.backend}/{name}: not in the running HAProxy")
        return found


def _state_row(header: list[str], line: str) -> RuntimeServer | None:
    fields = line.split()
    if len(fields) != len(header):
        return None
    try:
        be, srv, addr, fqdn, port, admin, weight = (fields[header.index(c)] for c in _STATE_COLUMNS)
    except ValueError:
        return None
    if not (port.isdigit() and admin.isdigit() and weight.isdigit()):
        return None
    row = (be, srv, addr, fqdn, int(port), int(admin), int(weight), line)
    return _new_server(RuntimeServer, row)


def _corrections(plan: _Plan, state: _BackendState, indexes: list[int]) -> list[tuple[int, str]]:
    """Commands taking each of these slots from what HAProxy reports to what it should be."""
    out = []
    for idx in indexes:
        slot = plan.after.slots[idx]
        want = Want.of(slot)
        server = _Server(plan.backend, slot.name, plan.target)
        commands = _commands(server, state.server(idx, slot.name), want)
        out.append((_PRIORITY[want.admin], "; ".join(commands)))
    return out


def _transition(plan: _Plan, idx: int) -> tuple[int, str]:
    """Commands taking slot ``idx`` from what the runtime was set to hold to the new want.

    Conservative where HAProxy's representation depends on history (a draining server is
    weight 0 after a reload but ``state drain`` after a runtime change): leaving drain
    always sets the weight. The read-back catches anything else.
    """
    assert plan.base is not None
    slot = plan.after.slots[idx]
    server = _Server(plan.backend, slot.name, plan.target)
    was, want = Want.of(plan.base.slots[idx]), Want.of(slot)
    commands = []
    if want.admin == "maint" and was.admin != "maint":
        commands.append(server.state("maint"))
    if (was.host, was.port) != (want.host, want.port):
        commands.append(server.addr(want.host, want.port))
    if want.admin != "drain" and (was.admin == "drain" or was.weight != want.weight):
        commands.append(server.weight(want.weight))
    if want.admin == "ready" and was.admin != "ready":
        commands.append(server.state("ready"))
    if want.admin == "drain" and was.admin != "drain":
        commands.append(server.state("drain"))
    return _PRIORITY[want.admin], "; ".join(commands)


def _commands(server: _Server, have: RuntimeServer, want: Want) -> list[str]:
    """CLI commands taking one server from ``have`` to ``want``."""
    commands = []
    if want.admin == "maint" and have.admin != "maint":
        commands.append(server.state("maint"))
    if have.port != want.port or not _host_matches(have, want.host):
        commands.append(server.addr(want.host, want.port))
    if want.admin != "drain" and have.uweight != want.weight:
        commands.append(server.weight(want.weight))
    forced = have.admin_bits & (FMAINT | FDRAIN)
    if want.admin == "ready" and (forced or have.uweight == 0):
        commands.append(server.state("ready"))
    if want.admin == "drain" and have.admin != "drain":
        commands.append(server.state("drain"))
    return commands


class _Server(NamedTuple):
    """One server's admin-socket commands, each built by ``admin_commands`` (which refuses
    any argument outside its grammar with DriverError, so nothing is sent)."""

    backend: str
    name: str
    target: str

    def state(self, state: AdminState) -> str:
        return cmd.set_server_state(self.backend, self.name, state, target=self.target)

    def addr(self, host: str, port: int) -> str:
        if _ip(host) is None:
            key = f"{self.backend}/{self.name}"
            raise _Decline(f"{key}: {host!r} is a hostname; the runtime API needs an IP")
        return cmd.set_server_addr(self.backend, self.name, host, port, target=self.target)

    def weight(self, weight: int) -> str:
        return cmd.set_weight(self.backend, self.name, weight, target=self.target)


def _batches(commands: Iterable[str]) -> Iterator[str]:
    """Join commands with ";" into lines of at most MAX_CLI_LINE bytes (one session each)."""
    line = ""
    for command in commands:
        if line and len(line) + len(command) + 2 > MAX_CLI_LINE:
            yield line
            line = ""
        line = f"{line}; {command}" if line else command
    if line:
        yield line


def _same(a: Service, b: Service) -> bool:
    return a is b or a == b


def _meta_changed(old: Service, new: Service) -> str | None:
    """An instance present on both sides whose meta changed (a template may render it)."""
    before = {i.id: i for i in old.instances}
    for inst in new.instances:
        prev = before.get(inst.id)
        if prev is not None and prev.meta != inst.meta:
            return f"instance {inst.id}: meta changed"
    return None


def _other_keys_changed(old: Snapshot, new: Snapshot) -> bool:
    """A raw key a template might read, other than registrations and health marks, differs
    (a set difference of the two key maps: C speed, ~1 ms at 10,000 keys)."""
    if old.keys is new.keys:
        return False
    return any(not _is_membership_key(key) for key, _ in old.keys.items() ^ new.keys.items())


def _is_membership_key(key: str) -> bool:
    """``/services/<svc>/instances/<id>`` or ``/services/<svc>/health/<id>``."""
    return (
        key.startswith("/services/")
        and key.count("/") == 4
        and ("/instances/" in key or "/health/" in key)
    )


def _slot_indexes(servers: Mapping[str, ConfigServer]) -> dict[str, int] | None:
    """Server name -> slot index, if every server of the backend is a slot (``s<N>``)."""
    if not servers or not all(_SLOT_NAME.fullmatch(name) for name in servers):
        return None
    return {name: int(name[1:]) - 1 for name in servers}


def _start_time(pid: int) -> float | None:
    """The process's start time, or None if it is gone (zombies count as gone)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


def _without_notices(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("[NOTICE]"))


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _state_file_directives(text: str) -> list[re.Match[str]]:
    """Every ``server-state-file`` directive, found with ``str.find`` first: the regex
    alone walks every line start of a 20,000-server config (~13 ms; this, ~1 ms)."""
    found = []
    at = text.find("server-state-file")
    while at >= 0:
        match = _STATE_FILE_LINE.match(text, text.rfind("\n", 0, at) + 1)
        if match is not None and match.start(2) > at:
            found.append(match)
        at = text.find("server-state-file", max(at + 1, match.end() if match else 0))
    return found


class _checkable_copy:
    """The staged main config, or a copy beside it whose ``server-state-file`` points at a
    neutral (empty, version-1) state file; both temporary files are removed on exit."""

    def __init__(self, main: Path) -> None:
        self.main = main
        self.temps: list[Path] = []

    def __enter__(self) -> Path:
        try:
            text = self.main.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise ValidationFailed(
                f"cannot read the staged config: {exc.strerror}", command=[str(self.main)]
            ) from exc
        directives = _state_file_directives(text)
        if not directives:
            return self.main
        neutral = self._temp(".state", EMPTY_STATE)
        parts, last = [], 0
        for value in directives:
            parts += [text[last : value.start(2)], str(neutral)]
            last = value.end(2)
        return self._temp(".cfg", "".join([*parts, text[last:]]))

    def _temp(self, suffix: str, text: str) -> Path:
        fd, name = tempfile.mkstemp(
            prefix=f".{self.main.name}.check-", suffix=suffix, dir=self.main.parent
        )
        self.temps.append(Path(name))
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
        return Path(name)

    def __exit__(self, *_exc: object) -> None:
        for path in self.temps:
            path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename over ``path``; never through a
    symlink (``fileio.atomic_write``)."""
    with opened_dir(path.parent) as dir_fd:
        atomic_write(dir_fd, path.name, text.encode("utf-8"), mode=0o644, sync_dir=False)
