"""HAProxy server state: the config's ``server`` lines, ``show servers state`` and the
state file lbsync keeps consistent with the config (see the package docstring)."""

from __future__ import annotations

import ipaddress
import itertools
import operator
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import structlog

from lbsync.config import HaproxyTarget
from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.slots import AdminState, Want
from lbsync.errors import DriverError, ReloadFailed, ValidationFailed
from lbsync.fileio import atomic_write, opened_dir

log = structlog.get_logger("lbsync.drivers.haproxy")

ID_MARKER = "lbsync-id="
EMPTY_STATE = "1\n"  # a server-state file with no servers (version 1)

# srv_admin_state bits (include/haproxy/server-t.h)
FMAINT = 0x01
IMAINT = 0x02
FDRAIN = 0x08
_SLOT_NAME = re.compile(r"s[1-9]\d*")
_STATE_FILE_LINE = re.compile(r'[ \t]*(server-state-file[ \t]+)("[^"]*"|\S+)')
_SECTIONS = frozenset(
    {
        "global", "defaults", "frontend", "backend", "listen", "peers", "resolvers",
        "userlist", "mailers", "program", "http-errors", "ring", "cache", "fcgi-app",
    }
)  # fmt: skip


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
            and host_matches(self, want.host)
            and self.admin == want.admin
            and (want.admin == "drain" or self.uweight == want.weight)
        )


def host_matches(server: RuntimeServer, host: str) -> bool:
    if server.addr == host:  # the usual case; parse only to compare spellings (IPv6)
        return True
    ip = parse_ip(host)
    if ip is None:
        return server.fqdn.lower() == host.lower()
    return parse_ip(server.addr) == ip


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


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
    pick = operator.itemgetter(*(header.index(c) for c in STATE_COLUMNS))
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
STATE_COLUMNS = (
    "be_name", "srv_name", "srv_addr", "srv_fqdn", "srv_port", "srv_admin_state", "srv_uweight",
)  # fmt: skip


def state_columns(answer: bytes) -> tuple[bytes, ...] | None:
    """The header and the ``STATE_COLUMNS`` of ``show servers state``, each column its
    values in row order joined by newlines (no value holds whitespace); None unless every
    row has the header's width.

    Everything ``RuntimeServer.matches`` looks at, with ``bytes.split`` and strided
    slices over ~64 KB of whole lines at a time (~7 ms at 20,000 servers; the answer in
    one split, ~15 ms, and as ``str``, twice that), kept as eight byte strings rather
    than 140,000: the reconcile tick compares this with the columns of the last answer
    found in step.
    """
    at = answer.find(b"# be_id")
    end = answer.find(b"\n", at)
    if at < 0 or end < 0:
        return None
    header = answer[at + 1 : end].split()
    try:
        picked = [header.index(c.encode()) for c in STATE_COLUMNS]
    except ValueError:
        return None
    width = len(header)
    columns: list[list[bytes]] = [[] for _ in picked]
    while end < len(answer):
        start, end = end, answer.find(b"\n", end + _CHUNK)
        end = len(answer) if end < 0 else end
        fields = answer[start:end].split()
        if len(fields) % width:
            return None
        if fields:
            for column, at in zip(columns, picked, strict=True):
                column.append(b"\n".join(fields[at::width]))
    if not columns[0]:
        return None
    return (b" ".join(header), *(b"\n".join(column) for column in columns))


_CHUNK = 1 << 16  # bytes split at a time: 500,000 small objects at once thrash the caches


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


def state_row(header: list[str], line: str) -> RuntimeServer | None:
    fields = line.split()
    if len(fields) != len(header):
        return None
    try:
        be, srv, addr, fqdn, port, admin, weight = (fields[header.index(c)] for c in STATE_COLUMNS)
    except ValueError:
        return None
    if not (port.isdigit() and admin.isdigit() and weight.isdigit()):
        return None
    row = (be, srv, addr, fqdn, int(port), int(admin), int(weight), line)
    return _new_server(RuntimeServer, row)


def slot_indexes(servers: Mapping[str, ConfigServer]) -> dict[str, int] | None:
    """Server name -> slot index, if every server of the backend is a slot (``s<N>``)."""
    if not servers or not all(_SLOT_NAME.fullmatch(name) for name in servers):
        return None
    return {name: int(name[1:]) - 1 for name in servers}


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


class checkable_copy:
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


def save_server_state(target: HaproxyTarget, admin: Cli | None) -> dict[str, int] | None:
    """Dump ``show servers state``, keep what agrees with the live config, write it
    atomically. Without an answer from the socket, the old file is re-checked instead
    (a stale file must not bring freed slots back)."""
    path = target.state_file
    if path is None:
        return None
    dump = None
    if admin is not None:
        try:
            dump = admin.query("show servers state")
        except DriverError as err:
            log.warning("haproxy.state_dump_failed", target=target.name, error=str(err))
    try:
        if dump is None:
            dump = path.read_text(encoding="utf-8") if path.exists() else ""
        config = target.config.read_text(encoding="utf-8", errors="replace")
        text, kept, dropped = sanitize_state(dump, config)
        write_atomically(path, text)
    except OSError as exc:
        raise ReloadFailed(
            f"cannot write the server state file {path}: {exc.strerror or exc}",
            target=target.name,
        ) from exc
    return {"kept": kept, "dropped": dropped}


def forget_server_state(target: HaproxyTarget) -> None:
    """After a runtime change the state file disagrees with the config on disk, and a
    reload that lbsync does not make (``systemctl reload haproxy``) would let it bring
    freed slots back. Empty it; lbsync's own reloads dump a fresh one first."""
    path = target.state_file
    if path is None:
        return
    try:
        if path.stat().st_size <= len(EMPTY_STATE):
            return
        write_atomically(path, EMPTY_STATE)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("haproxy.state_file_stale", target=target.name, path=str(path), error=str(exc))


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename over ``path``; never through a
    symlink (``fileio.atomic_write``)."""
    with opened_dir(path.parent) as dir_fd:
        atomic_write(dir_fd, path.name, text.encode("utf-8"), mode=0o644, sync_dir=False)
