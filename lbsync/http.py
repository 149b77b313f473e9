"""``[http] listen``: /metrics, /healthz, /readyz and /status on a small threaded HTTP server.

The server runs in its own thread and only calls what it is given: ``status`` (a JSON-able
dict), ``healthy`` and ``ready`` (each ``(ok, reason)``). They are called from the server's
threads, so they must only read state. A callable that raises gives that request a 500 and
a log event; the server keeps serving.

The endpoint is reachable by anyone on the host (or the network it listens on), so it is
bounded: at most ``max_connections`` connections are served at once (one thread each; one
more is answered 503 and closed by the accepting thread), each request must arrive and be
answered within ``request_timeout`` seconds counted from when the connection is ready for
it (a slowloris client that drips one byte at a time is cut off all the same), and a
request's line and headers together may not exceed ``MAX_REQUEST_HEAD`` bytes.

=========== ===================================================================
``/metrics`` Prometheus text (or OpenMetrics when asked) from ``metrics.enable()``
``/healthz`` 200 ``ok`` / 503 reason — the process is alive and its loop turns
``/readyz``  200 ``ok`` / 503 reason — synced once and etcd reachable or fresh
``/status``  JSON: targets, last apply, held updates, staleness
=========== ===================================================================
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog

from lbsync.errors import ConfigError

if TYPE_CHECKING:  # prometheus_client is loaded by the daemon, not by `lbsync status`
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("lbsync.http")

Probe = Callable[[], tuple[bool, str]]
StatusSource = Callable[[], dict[str, Any]]

_INDEX = b"lbsync: /metrics /healthz /readyz /status\n"

MAX_CONNECTIONS = 8
"""Connections served at once: a scraper, a health checker and a human, with room to spare."""
REQUEST_TIMEOUT = 10.0
"""Seconds a connection may take to send one request and read the answer (idle included)."""
MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of request line plus headers; a scraper sends a few hundred."""

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n"
)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9274"``, ``"[::1]:9274"``, ``":9274"`` (all IPv4) or ``"host:0"``."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{listen!r} is not an address like '127.0.0.1:9274' or '[::1]:9274'",
            field="http.listen",
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{listen!r}: bracket IPv6 addresses: '[::1]:9274'", field="http.listen")
    return host or "0.0.0.0", int(port_text)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them, each under a deadline.

    Deadlines are enforced by ``service_actions``, which ``serve`` calls whenever it wakes:
    a connection past its deadline is shut down, which wakes its thread from any read or
    write. No extra thread is needed for it. ``serve`` sleeps until a connection comes,
    the earliest deadline or ``stop_serving``: an idle server never wakes (socketserver's
    ``serve_forever`` polls every ``poll_interval``).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        app: StatusServer,
        *,
        max_connections: int,
        request_timeout: float,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._close_wake_pipe()
            raise

    def serve(self) -> None:
        """Accept and time out connections until ``stop_serving``."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                ready = {key.fileobj for key, _ in selector.select(self._next_deadline_in())}
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                if self._stopping:
                    break
                if self in ready:
                    self._accept_one()
                self.service_actions()

    def _accept_one(self) -> None:
        """One ready connection, handed to ``process_request`` (socketserver's own steps)."""
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def stop_serving(self) -> None:
        self._stopping = True
        self._poke()

    def server_close(self) -> None:
        super().server_close()
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _poke(self) -> None:
        """Wake ``serve`` (a byte already waiting in the pipe does as well)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _next_deadline_in(self) -> float | None:
        with self._deadlines_lock:
            if not self._deadlines:
                return None
            return max(0.0, min(self._deadlines.values()) - time.monotonic())

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can hang for
        # seconds on a host with slow DNS; none of it is needed here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nobody else will give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """503 without blocking the accepting thread: a fresh socket's buffer takes it."""
        log.info("http.busy", client=str(client_address[0]))
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(_BUSY)
        self.shutdown_request(request)

    def arm(self, connection: socket.socket) -> None:
        """Start (or restart, for the next request) ``connection``'s deadline."""
        with self._deadlines_lock:
            first = not self._deadlines
            self._deadlines[connection] = time.monotonic() + self.request_timeout
        if first:  # ``serve`` may be asleep with no deadline at all: it must see this one
            self._poke()

    def disarm(self, connection: socket.socket) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(connection, None)

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._deadlines_lock:  # held while shutting down, so the socket is still open
            for connection, deadline in list(self._deadlines.items()):
                if now >= deadline:
                    del self._deadlines[connection]
                    self._cut_off(connection)

    @staticmethod
    def _cut_off(connection: socket.socket) -> None:
        try:
            peer = str(connection.getpeername()[0])
        except OSError:  # the peer is gone already; its thread sees that by itself
            peer = "gone"
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        log.info("http.request_timeout", client=peer)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("http.connection_error", client=str(client_address[0]), exc_info=True)


class _HeadReader:
    """``rfile`` for the handler: every request's line and headers share one byte budget.

    The standard library bounds each line (64 KiB) and the header count (100), which still
    lets one request hold megabytes; this bounds the whole head. Past the budget it raises
    ``http.client.LineTooLong``, which the handler answers with 414 or 431.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._left = MAX_REQUEST_HEAD

    def reset(self) -> None:
        self._left = MAX_REQUEST_HEAD

    def readline(self, limit: int = -1) -> bytes:
        if self._left <= 0:
            raise http.client.LineTooLong(f"request head over {MAX_REQUEST_HEAD} bytes")
        cap = self._left + 1 if limit < 0 else min(limit, self._left + 1)
        line: bytes = self._raw.readline(cap)
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong(f"request head over {MAX_REQUEST_HEAD} bytes")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "lbsync"
    rfile: Any  # a _HeadReader once set up

    def setup(self) -> None:
        super().setup()
        # Each read or write; the server's deadline bounds the request as a whole.
        self.connection.settimeout(self.server.request_timeout)
        self.rfile = _HeadReader(self.rfile)

    def handle_one_request(self) -> None:
        self.server.arm(self.connection)
        self.rfile.reset()
        try:
            super().handle_one_request()
        except http.client.LineTooLong:  # the request line alone used up the budget
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            self.close_connection = True

    def finish(self) -> None:
        self.server.disarm(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                from prometheus_client.exposition import choose_encoder

                encode, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(HTTPStatus.OK, encode(app.registry), content_type, body)
            elif path in ("/healthz", "/readyz"):
                ok, reason = (app.healthy if path == "/healthz" else app.ready)()
                text = ("ok" + (f": {reason}" if reason else "")) if ok else (reason or "not ok")
                code = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._reply(code, f"{text}\n".encode(), "text/plain; charset=utf-8", body)
            elif path == "/status":
                document = json.dumps(app.status(), indent=2, sort_keys=True, default=str)
                self._reply(HTTPStatus.OK, f"{document}\n".encode(), "application/json", body)
            elif path == "/":
                self._reply(HTTPStatus.OK, _INDEX, "text/plain; charset=utf-8", body)
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body)
        except Exception as exc:  # a broken callable must not take the endpoint down
            log.error("http.handler_failed", path=path, error=repr(exc), exc_info=True)
            message = f"internal error: {type(exc).__name__}: {exc}\n".encode()
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, message, "text/plain", body)

    def _reply(self, code: HTTPStatus, data: bytes, content_type: str, body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http.request", client=self.client_address[0], line=format % args)


class StatusServer:
    """Serves the four endpoints on ``listen`` from a background thread."""

    def __init__(
        self,
        listen: str,
        *,
        status: StatusSource,
        healthy: Probe,
        ready: Probe,
        registry: CollectorRegistry | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.listen = listen
        self.status = status
        self.healthy = healthy
        self.ready = ready
        if registry is None:
            from lbsync import metrics

            registry = metrics.enable().registry
        self.registry = registry
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._address = parse_listen(listen)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the status server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._address[0]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread; ``ConfigError`` naming ``listen`` if bind fails."""
        if self._server is not None:
            return
        try:
            self._server = _Server(
                self._address,
                self,
                max_connections=self.max_connections,
                request_timeout=self.request_timeout,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on {self.listen!r}: {reason}", field="http.listen"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve, name="lbsync-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.stop_serving()
        if thread is not None:
            thread.join(timeout=5)
        server.server_close()
