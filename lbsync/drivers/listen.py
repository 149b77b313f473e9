"""Listen-address pre-check: the one failure neither ``nginx -t`` nor ``haproxy -c`` sees.

A listen address held by another process passes both checkers; on reload nginx retries
``bind()`` for ~2.5 s and keeps the old workers, HAProxy pauses its frontend and drops
requests. So before a reload, every *new* listen address of the staged config is probed:

- held with exactly that address by this LB's own processes → fine (the LB inherits it);
- can be bound now (with ``SO_REUSEADDR``, as the LB does) → fine;
- otherwise → ``ListenConflict`` naming the address and, when visible, the holder.

Measured with nginx 1.22: an address this nginx already holds under an *overlapping*
address (``*:80`` held, ``127.0.0.1:80`` wanted, or the reverse) also fails on reload
(``bind() … (98: Address already in use)``, old workers kept), so that is a conflict too,
unless the caller says the LB binds with ``SO_REUSEPORT`` (HAProxy).

The parsers are deliberately small: they read what a checker already accepted (nginx's
config tokenizer is ``drivers/nginx/config.py``; HAProxy's ``bind`` lines are read here).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from lbsync.errors import ListenConflict

log = structlog.get_logger("lbsync.drivers.listen")

Proto = Literal["tcp", "udp"]
_MAX_PORT_RANGE = 1024
_WILDCARDS = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True)
class ListenAddress:
    """One address an LB config listens on. ``host`` is a literal or a name to resolve."""

    host: str
    port: int
    proto: Proto = "tcp"
    # None: the system default (dual-stack on Linux); nginx's own default is True.
    v6only: bool | None = None
    raw: str = field(default="", compare=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = "/udp" if self.proto == "udp" else ""
        return f"{host}:{self.port}{suffix}"


# --- HAProxy -----------------------------------------------------------------------------

_HAPROXY_SKIP = ("unix@", "abns@", "fd@", "sockpair@", "uxst@", "uxdg@", "/")
_HAPROXY_FAMILY = {"ipv4@": "4", "tcp4@": "4", "udp4@": "4", "quic4@": "4"}
_HAPROXY_FAMILY |= {"ipv6@": "6", "tcp6@": "6", "udp6@": "6", "quic6@": "6"}
_HAPROXY_FAMILY |= {"tcp@": "", "udp@": ""}


def haproxy_listens(config: Path) -> list[ListenAddress]:
    """Every ``bind`` address in a HAProxy config (unix sockets and fds skipped)."""
    try:
        text = Path(config).read_text(errors="replace")
    except OSError as exc:
        log.debug("listen.unreadable", path=str(config), error=exc.strerror)
        return []
    found: list[ListenAddress] = []
    for line in _lines_containing(text, "bind"):
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "bind":
            for spec in words[1].split(","):
                found.extend(parse_haproxy_bind(spec, words[2:]))
    return found


def _lines_containing(text: str, word: str) -> Iterator[str]:
    """The lines of ``text`` that contain ``word``, found with ``str.find``: a config of
    20,000 ``server`` lines and a few ``bind`` lines costs ~1 ms, not ~20 ms of splitting."""
    at = text.find(word)
    while at >= 0:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        yield text[start:end]
        at = text.find(word, end)


def parse_haproxy_bind(spec: str, params: list[str]) -> list[ListenAddress]:
    """One ``bind`` address (``:80``, ``ipv6@:::443``, ``*:8000-8010``, ``quic4@:443``)."""
    if spec.startswith(_HAPROXY_SKIP) or "$" in spec:
        if "$" in spec:
            log.warning("listen.unparsed", bind=spec, reason="environment variable")
        return []
    prefix = next((p for p in _HAPROXY_FAMILY if spec.startswith(p)), "")
    proto: Proto = "udp" if prefix.startswith(("udp", "quic")) else "tcp"
    rest = spec[len(prefix) :]
    host, _, ports = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host in ("", "*"):
        host = "::" if _HAPROXY_FAMILY.get(prefix) == "6" else "0.0.0.0"
    v6only = True if "v6only" in params else False if "v4v6" in params else None
    try:
        low, _, high = ports.partition("-")
        first, last = int(low), int(high or low)
    except ValueError:
        log.warning("listen.unparsed", bind=spec)
        return []
    if not 0 < first <= last <= 65535 or last - first >= _MAX_PORT_RANGE:
        log.warning("listen.unparsed", bind=spec, reason="port range")
        return []
    return [ListenAddress(host, p, proto, v6only, raw=spec) for p in range(first, last + 1)]


def split_host_port(spec: str, *, default_port: int, bare_is_port: bool) -> tuple[str, int]:
    if spec.startswith("["):
        end = spec.index("]")
        host, rest = spec[1:end], spec[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if spec.isdigit() and bare_is_port:
        return "", int(spec)
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, default_port
    return host, int(port)


# --- the check ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Socket:
    family: int
    ip: str
    port: int
    proto: Proto


def check_listen(
    addresses: Iterable[ListenAddress],
    *,
    own_pids: Iterable[int],
    target: str,
    reuseport: bool = False,
) -> None:
    """Raise ``ListenConflict`` for the first address the LB could not bind on reload.

    ``own_pids`` are the LB's master and children: an address they hold *exactly* is
    fine. ``reuseport``: the LB binds with ``SO_REUSEPORT`` (HAProxy), so a port it holds
    under an overlapping address is fine too.
    """
    pids = set(own_pids)
    own = _listening(_own_connections(pids))
    for address in addresses:
        for sock in _resolve(address, target):
            if sock in own or (reuseport and _overlaps_any(sock, own)):
                continue
            reason = _probe(sock, address.v6only)
            if reason is None:
                continue
            raise ListenConflict(_conflict_message(address, sock, reason, pids), target=target)
        log.debug("listen.free", target=target, address=str(address))


def _resolve(address: ListenAddress, target: str) -> list[_Socket]:
    kind = socket.SOCK_DGRAM if address.proto == "udp" else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=kind, flags=socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise ListenConflict(
            f"listen address {address} does not resolve: {exc.strerror}", target=target
        ) from exc
    return sorted(
        {_Socket(int(fam), str(sa[0]), address.port, address.proto) for fam, *_, sa in infos},
        key=lambda s: (s.family, s.ip),
    )


def _probe(sock: _Socket, v6only: bool | None) -> OSError | None:
    """Bind (no listen) as the LB would; the error if that fails."""
    kind = socket.SOCK_DGRAM if sock.proto == "udp" else socket.SOCK_STREAM
    try:
        with socket.socket(sock.family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6 and v6only is not None:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            probe.bind((sock.ip, sock.port))
    except OSError as exc:
        return exc
    return None


def _conflict_message(address: ListenAddress, sock: _Socket, reason: OSError, own: set[int]) -> str:
    where = f"listen address {address}" + (f" ({sock.ip})" if sock.ip != address.host else "")
    if reason.errno == errno.EACCES:
        holders = _holders(sock)
        if not holders:
            return f"{where}: lbsync may not bind it to check ({reason.strerror}); run as root"
    elif reason.errno != errno.EADDRINUSE:
        return f"{where} cannot be bound: {reason.strerror}"
    else:
        holders = _holders(sock)
    mine = [h for h in holders if h[0] in own]
    if mine and len(mine) == len(holders):
        return (
            f"{where} overlaps an address this LB already listens on "
            f"({', '.join(h[2] for h in mine)}); it cannot rebind that port on reload "
            "(restart it, or remove the old address in a separate change)"
        )
    shown = ", ".join(f"pid {pid} ({name}) on {addr}" for pid, name, addr in holders if pid)
    if not shown:
        return f"{where} is already in use by another process (holder not visible)"
    return f"{where} is already in use: {shown}"


def _holders(sock: _Socket) -> list[tuple[int | None, str, str]]:
    """(pid, process name, bound address) of sockets overlapping ``sock``, where visible."""
    import psutil  # here, not at the top: a round with no new listen address needs none

    try:
        conns = psutil.net_connections(kind=sock.proto)
    except (psutil.Error, OSError):
        return []
    found = []
    for conn in conns:
        bound = _as_socket(conn, sock.proto)
        if bound is None or not _overlaps(bound, sock):
            continue
        found.append((conn.pid, _process_name(conn.pid), f"{bound.ip}:{bound.port}"))
    return found


def _process_name(pid: int | None) -> str:
    if not pid:
        return "?"
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).name()
    return "?"


def _own_connections(pids: set[int]) -> list[object]:
    import psutil

    conns: list[object] = []
    for pid in pids:
        try:
            conns.extend(psutil.Process(pid).net_connections(kind="inet"))
        except psutil.Error as exc:
            log.debug("listen.own_unreadable", pid=pid, error=str(exc))
    return conns


def _listening(conns: Iterable[object]) -> set[_Socket]:
    out: set[_Socket] = set()
    for conn in conns:
        kind: Proto = "udp" if getattr(conn, "type", None) == socket.SOCK_DGRAM else "tcp"
        bound = _as_socket(conn, kind)
        if bound is not None:
            out.add(bound)
    return out


def _as_socket(conn: object, proto: Proto) -> _Socket | None:
    """A listening TCP or bound UDP socket as a ``_Socket``; None for anything else."""
    import psutil

    laddr = getattr(conn, "laddr", None)
    status = getattr(conn, "status", None)
    if not laddr or (proto == "tcp" and status != psutil.CONN_LISTEN):
        return None
    if proto == "udp" and getattr(conn, "raddr", None):
        return None
    family = int(getattr(conn, "family", socket.AF_INET))
    return _Socket(family, str(laddr.ip), int(laddr.port), proto)


def _overlaps(a: _Socket, b: _Socket) -> bool:
    if a.port != b.port or a.proto != b.proto:
        return False
    if a.ip == b.ip:
        return True
    # A dual-stack "::" covers IPv4 too; psutil can't tell us whether it is v6only.
    return (a.ip in _WILDCARDS and (a.family == b.family or a.ip == "::")) or (
        b.ip in _WILDCARDS and (a.family == b.family or b.ip == "::")
    )


def _overlaps_any(sock: _Socket, held: set[_Socket]) -> bool:
    return any(_overlaps(sock, other) for other in held)
