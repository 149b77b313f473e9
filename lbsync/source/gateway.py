"""etcd's JSON gateway (grpc-gateway, ``/v3/...`` on the client URLs) over HTTP/1.1 with
the standard library: an idle daemon has one blocked socket and no gRPC threads.

``GatewaySession`` reads (``/v3/kv/range``, paged as on gRPC) and opens a ``GatewayWatch``
(``POST /v3/watch``, answered by a chunked stream of ``{"result": ...}`` lines). Errors
come back as an HTTP status with a gRPC ``code`` in a JSON body and become the same
``SourceError`` subclasses as on the gRPC path. The gateway cannot carry a progress
request once its answer has started (a chunked request body left open is never
answered), so liveness is TCP keepalive on the watch socket (a dead peer) plus a cheap
read on a second connection while the watch is quiet (a stalled server, a watch that
missed events): see ``GatewayWatch.check``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError, SourceError, SourceUnavailable
from lbsync.model import SourceReset
from lbsync.source.endpoints import (
    Address,
    GatewayNotServed,
    TokenRejected,
    addresses,
    compacted,
    password,
)
from lbsync.source.responses import WatchResponse, parse_document, range_page, watch_response
from lbsync.source.stream import RangePage, page_through
from lbsync.source.watchbody import ChunkedLines

_T = TypeVar("_T")

# gRPC status codes as the gateway's error bodies carry them (google.rpc.Code)
_CODE_NAMES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}
_UNAVAILABLE_CODES = frozenset({1, 4, 14})
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")  # what may go into the Authorization header
# TCP keepalive on the watch socket: a dead peer or a partition is noticed within
# ~IDLE + INTERVAL * COUNT = 8 s (as gRPC's keepalive 5 s + 3 s did); the kernel sends
# the probes, the process does not wake for them.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 1, 3
_MAX_HEAD = 64 * 1024


def error_from(status: int, body: bytes, endpoint: str, what: str) -> SourceError:
    """The SourceError for a gateway answer that is not a 200."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        # Not the gateway's JSON: a 404 (an etcd gRPC proxy serves no /v3/...), or a 400
        # from etcd itself (a client certificate's CN with auth on: "CommonName of client
        # sending a request against gateway will be ignored"): no JSON gateway for us.
        text = body[:120].decode("utf-8", "replace").strip()
        if 400 <= status < 500:
            message = f"{what}: HTTP {status} ({text}): no JSON gateway"
            return GatewayNotServed(message, endpoint=endpoint)
        return SourceUnavailable(f"{what}: HTTP {status}: {text}", endpoint=endpoint)
    code = doc.get("code")
    message = str(doc.get("message") or doc.get("error") or "")[:300]
    name = _CODE_NAMES.get(code, f"code {code!r}") if isinstance(code, int) else "no code"
    text = f"{name}: {message}"
    if code == 11 and "compacted" in message:
        return compacted(0, 0, endpoint)
    if code in _UNAVAILABLE_CODES or status == 503:
        return SourceUnavailable(text, endpoint=endpoint)
    if code == 16 or "auth store is old" in message:
        return TokenRejected(text, endpoint=endpoint)
    return SourceError(text, endpoint=endpoint)


def _tls_context(settings: EtcdSettings, endpoint: str) -> ssl.SSLContext:
    """Read on every new connection, so rotated certificates are picked up."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        if settings.cert_file and settings.key_file:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"cannot load the TLS files: {exc}", endpoint=endpoint) from exc
    return context


class GatewaySession:
    """One client of the JSON gateway: endpoints tried in order, a token with a user.

    Unary calls share one kept-alive connection to the endpoint in use; a call that
    finds the endpoint unavailable moves on to the next one (each endpoint once per call).
    """

    transport = "http"

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        try:
            self._addresses = addresses(settings)
        except ConfigError as exc:
            raise SourceError(str(exc), endpoint=", ".join(settings.endpoints)) from exc
        self._index = 0
        self._token: str | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._closed = False

    @property
    def address(self) -> Address:
        return self._addresses[self._index]

    @property
    def endpoint(self) -> str:
        return self.address.url

    # -- connections --

    def open_socket(self, timeout: float) -> socket.socket:
        """A new connection to the endpoint in use (TLS when its URL says https)."""
        address = self.address
        try:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        except OSError as exc:
            raise SourceUnavailable(f"cannot connect: {exc}", endpoint=self.endpoint) from exc
        # http.client sends a request's head and body in two writes: without NODELAY the
        # body waits for the head's delayed ACK (40 ms a request, measured)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not address.secure:
            return sock
        context = _tls_context(self.settings, self.endpoint)
        return wrap_tls(sock, context, address.host, self.endpoint)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            address = self.address
            conn = http.client.HTTPConnection(address.host, address.port, self.settings.timeout)
            conn.sock = self.open_socket(self.settings.timeout)
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = self._token
        return headers

    # -- calls --

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One POST on the kept-alive connection; a stale kept-alive connection is retried
        once on a fresh one (the server may have closed it while idle)."""
        payload = json.dumps(body).encode()
        for attempt in range(2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request("POST", path, payload, self.headers())
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                if reused and not attempt:
                    continue
                raise SourceUnavailable(f"POST {path}: {exc}", endpoint=self.endpoint) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise SourceUnavailable(f"POST {path}: {what}", endpoint=self.endpoint) from exc
            if response.status != 200:
                raise error_from(response.status, data, self.endpoint, f"POST {path}")
            return parse_document(data, f"POST {path}", self.endpoint)
        raise AssertionError("unreachable")  # pragma: no cover

    def failover(self, call: Callable[[], _T]) -> _T:
        """``call`` on the endpoint in use, then on each next one while it is unavailable."""
        last: SourceUnavailable | None = None
        for _ in self._addresses:
            if self._closed:
                raise SourceUnavailable("the source is stopping", endpoint=self.endpoint)
            try:
                return call()
            except GatewayNotServed:
                raise
            except SourceUnavailable as exc:
                self._drop()
                last = exc
                self._index = (self._index + 1) % len(self._addresses)
        assert last is not None
        raise last

    def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        limit = self.settings.timeout if timeout is None else timeout
        return self.failover(lambda: self._post(path, body, limit))

    def connect(self) -> None:
        """The first call: a login with a user, else a one-key count. Raises
        GatewayNotServed when the endpoint does not serve the gateway."""
        if self.settings.user is None:
            self.post("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True})
            return
        try:
            secret = password(self.settings)
        except ConfigError as exc:
            raise SourceError(str(exc), endpoint=", ".join(self.settings.endpoints)) from exc
        if secret is not None:
            self.failover(lambda: self._authenticate(self.settings.user or "", secret))

    def _authenticate(self, user: str, secret: str) -> None:
        try:
            doc = self._post(
                "/v3/auth/authenticate", {"name": user, "password": secret}, self.settings.timeout
            )
        except (SourceUnavailable, TokenRejected):
            raise
        except SourceError as exc:
            raise SourceError(
                f"authentication as {user!r} failed: {exc.message.partition(': ')[2]}",
                endpoint=self.endpoint,
            ) from exc
        token = doc.get("token")
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise SourceError(
                f"authentication as {user!r}: no usable token", endpoint=self.endpoint
            )
        self._token = token

    # -- reading --

    def read(self, start: bytes, end: bytes, page_size: int, page_bytes: int) -> SourceReset:
        """``page_through`` [start, end), as the gRPC path's ``read_pages``."""
        end_b64 = _b64(end)

        def fetch(first: bytes, limit: int, revision: int | None) -> RangePage:
            request: dict[str, Any] = {"key": _b64(first), "range_end": end_b64, "limit": limit}
            if revision is not None:
                request["revision"] = revision
            return range_page(self.post("/v3/kv/range", request), self.endpoint)

        return page_through(fetch, start, page_size, page_bytes)

    def changed_since(self, start: bytes, end: bytes, revision: int) -> bool:
        """Whether a key in [start, end) was put after ``revision``: one keys-only key
        (etcd 3.4's ``count`` ignores ``min_mod_revision``, so the keys are asked for)."""
        request = {
            "key": _b64(start),
            "range_end": _b64(end),
            "keys_only": True,
            "limit": 1,
            "min_mod_revision": revision + 1,
        }
        timeout = min(self.settings.timeout, max(self.settings.silence_deadline * 2 / 3, 0.05))
        doc = self._post("/v3/kv/range", request, timeout)  # no failover: this endpoint's watch
        return bool(doc.get("kvs"))

    def watch(self, start: bytes, end: bytes, start_revision: int) -> GatewayWatch:
        return self.failover(lambda: GatewayWatch(self, start, end, start_revision))

    def close(self) -> None:
        self._closed = True
        self._drop()


def wrap_tls(
    sock: socket.socket, context: ssl.SSLContext, host: str, endpoint: str
) -> ssl.SSLSocket:
    """``sock`` after a TLS handshake; on any failure no socket is left open.

    CPython's ``SSLSocket._create`` (3.11.7 here) leaves its new socket open when the peer
    resets the connection between connect and handshake: its pre-handshake ``recv(1)``
    raises, and the socket is only closed when a garbage collection finds it
    (python/cpython#113280). The same reset can also hand back a socket that never made
    a handshake. Both are closed here and reported as the endpoint being unavailable.
    """
    try:
        wrapped = context.wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        sock.close()
        close_half_made_sockets(exc)
        raise SourceUnavailable(f"TLS handshake: {exc}", endpoint=endpoint) from exc
    if wrapped.version() is None:
        wrapped.close()
        raise SourceUnavailable("TLS handshake: the connection closed before it", endpoint=endpoint)
    return wrapped


def close_half_made_sockets(exc: BaseException) -> None:
    """Close the SSL sockets that the frames ``exc`` was raised through were making."""
    trace = exc.__traceback__
    while trace is not None:
        made = trace.tb_frame.f_locals.get("self")
        if isinstance(made, ssl.SSLSocket):
            made.close()
        trace = trace.tb_next


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class GatewayWatch:
    """One ``POST /v3/watch`` on its own socket, read by the caller's thread.

    ``get`` waits on the socket for the next line up to a timeout; ``wake`` (from another
    thread, at stop) shuts the socket down so that a waiting ``get`` returns at once.
    """

    def __init__(self, session: GatewaySession, start: bytes, end: bytes, revision: int) -> None:
        self.session = session
        self.endpoint = session.endpoint
        self._start, self._end = start, end
        self._woken = False
        self.check_every = max(session.settings.silence_deadline / 3, 0.05)
        create = {"key": _b64(start), "range_end": _b64(end), "start_revision": revision}
        body = json.dumps({"create_request": create}).encode()
        address = session.address
        head = ["POST /v3/watch HTTP/1.1", f"Host: {address.host}:{address.port}"]
        head += [f"{name}: {value}" for name, value in session.headers().items()]
        head.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self._sock = session.open_socket(session.settings.timeout)
        try:
            _keepalive(self._sock)
            self._sock.sendall(request)
            self._lines = ChunkedLines(self._read_head())
        except OSError as exc:
            self._sock.close()
            raise SourceUnavailable(f"watch: {exc}", endpoint=self.endpoint) from exc
        except BaseException:
            self._sock.close()
            raise

    def _recv(self) -> bytes:
        data = self._sock.recv(256 * 1024)
        if self._woken:
            raise _Woken
        if not data:
            raise SourceUnavailable("the watch stream ended", endpoint=self.endpoint)
        return data

    def _read_head(self) -> bytes:
        """Read the response head; returns what came after it. A non-200 is raised."""
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > _MAX_HEAD:
                raise SourceError("watch: response head too long", endpoint=self.endpoint)
            buffer += self._recv()
        head, _, rest = buffer.partition(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", status_line)
        if match is None:
            raise SourceError(f"watch: not HTTP: {status_line[:80]!r}", endpoint=self.endpoint)
        chunked = any(re.fullmatch(r"(?i)transfer-encoding:\s*chunked\s*", line) for line in fields)
        status = int(match.group(1))
        if status != 200 or not chunked:
            body = rest if chunked is False else ChunkedLines.raw_body(rest)
            raise error_from(status, body, self.endpoint, "POST /v3/watch")
        return rest

    def get(self, timeout: float) -> WatchResponse | None:
        """The next response, or None after ``timeout`` or a ``wake``."""
        try:
            self._sock.settimeout(max(timeout, 0.001))
            while True:
                line = self._lines.next_line(self.endpoint)
                if line is not None:
                    if line.strip():
                        return watch_response(line, self.endpoint)
                    continue
                self._lines.feed(self._recv(), self.endpoint)
        except (TimeoutError, _Woken):
            return None
        except OSError as exc:
            if self._woken:
                return None
            raise SourceUnavailable(f"watch: {exc}", endpoint=self.endpoint) from exc

    def check(self, revision: int) -> None:
        """The watch has been quiet for ``check_every``: prove the server answers (a
        stalled one times out) and that no put after ``revision`` was missed."""
        try:
            missed = self.session.changed_since(self._start, self._end, revision)
        except SourceError as exc:
            quiet = f"{self.check_every:g}s"
            raise SourceUnavailable(
                f"watch silent for {quiet} and a check read failed: {exc.message}",
                endpoint=self.endpoint,
            ) from exc
        if missed:
            raise SourceUnavailable(
                f"the watch missed changes after revision {revision}", endpoint=self.endpoint
            )

    def wake(self) -> None:
        self._woken = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


class _Woken(Exception):
    """``wake`` shut the socket down under a ``get`` (internal)."""
