"""``[http] listen``: /metrics, /healthz, /readyz and /status on a small threaded HTTP server.

The server runs in its own thread and only calls what it is given: ``status`` (a JSON-able
dict), ``healthy`` and ``ready`` (each ``(ok, reason)``). They are called from the server's
threads, so they must only read state. A callable that raises gives that request a 500 and
a log event; the server keeps serving.

=========== ===================================================================
``/metrics`` Prometheus text (or OpenMetrics when asked) from ``metrics.REGISTRY``
``/healthz`` 200 ``ok`` / 503 reason — the process is alive and its loop turns
``/readyz``  200 ``ok`` / 503 reason — synced once and etcd reachable or fresh
``/status``  JSON: targets, last apply, held updates, staleness
=========== ===================================================================
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from lbsync import metrics
from lbsync.errors import ConfigError

log = structlog.get_logger("lbsync.http")

Probe = Callable[[], tuple[bool, str]]
StatusSource = Callable[[], dict[str, Any]]

_INDEX = b"lbsync: /metrics /healthz /readyz /status\n"


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
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: StatusServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can hang for
        # seconds on a host with slow DNS; none of it is needed here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("http.connection_error", client=str(client_address[0]), exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that stalls mid-request does not hold a thread for ever
    server_version = "lbsync"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
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
        registry: CollectorRegistry = metrics.REGISTRY,
    ) -> None:
        self.listen = listen
        self.status = status
        self.healthy = healthy
        self.ready = ready
        self.registry = registry
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
            self._server = _Server(self._address, self)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on {self.listen!r}: {reason}", field="http.listen"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},  # how late stop() returns; a wake-up each
            name="lbsync-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
