"""Real HTTP backends on 127.0.0.1 that answer with their own name, for traffic assertions."""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lbsync.model import Instance, State
from tests.harness.net import wait_for


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real upstreams
    # Headers and body go out in two sends; with Nagle on, each keep-alive response then
    # waits ~40 ms for a delayed ACK (24 requests/s per connection instead of ~2,500).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = self.server.backend_name.encode()  # type: ignore[attr-defined]
        self.server.hits += 1  # type: ignore[attr-defined]
        failure = self.server.failure  # type: ignore[attr-defined]
        if failure == "reset":  # RST instead of an answer: SO_LINGER 0, then close
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if failure == "hang":  # answer nothing until the failure is cleared (bounded)
            self.server.healed.wait(HANG_LIMIT)  # type: ignore[attr-defined]
        self.send_response(500 if failure == "error" else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


HANG_LIMIT = 60.0  # seconds a "hang" backend holds a request at most


@dataclass
class Backend:
    name: str
    server: ThreadingHTTPServer
    thread: threading.Thread = field(repr=False)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def hits(self) -> int:
        return int(self.server.hits)  # type: ignore[attr-defined]

    def fail(self, how: str | None) -> None:
        """``"error"``: answer 500; ``"reset"``: reset the connection; ``"hang"``: answer
        nothing (for up to ``HANG_LIMIT``); None: answer 200 again."""
        if how not in (None, "error", "reset", "hang"):
            raise ValueError(f"unknown failure {how!r}")
        healed: threading.Event = self.server.healed  # type: ignore[attr-defined]
        if how == "hang":
            healed.clear()
        self.server.failure = how  # type: ignore[attr-defined]
        if how is None:
            healed.set()

    def stop(self) -> None:
        self.fail(None)  # release any hanging request
        self.server.shutdown()
        self.server.server_close()


def start_backend(name: str) -> Backend:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.backend_name = name  # type: ignore[attr-defined]
    server.hits = 0  # type: ignore[attr-defined]
    server.failure = None  # type: ignore[attr-defined]
    server.healed = threading.Event()  # type: ignore[attr-defined]
    server.healed.set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name=f"backend-{name}", daemon=True)
    thread.start()
    return Backend(name, server, thread)


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """One request on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def served_names(port: int, requests: int = 12) -> set[str]:
    """Names of the backends answering ``requests`` successive requests (non-200s skipped)."""
    names = set()
    for _ in range(requests):
        try:
            status, body = http_get(port)
        except OSError:
            continue
        if status == 200:
            names.add(body)
    return names


def only_served_by(port: int, expected: set[str], requests: int = 12) -> bool:
    """Every one of ``requests`` fresh requests got a 200, from exactly the ``expected`` set.

    Stricter than ``served_names``: right after a reload nginx's old workers may still take
    a few connections with the old config, so a state counts only once it is the only one.
    """
    names = set()
    for _ in range(requests):
        try:
            status, body = http_get(port)
        except OSError:
            return False
        if status != 200:
            return False
        names.add(body)
    return names == expected


@dataclass
class KeepAliveLoad:
    """One keep-alive HTTP client, bounded in time and in requests.

    Records (start, end, body) of every successful request, so a test can tell which
    backend set answered after a given moment, and every failure (errors and non-200s).
    """

    port: int
    max_seconds: float = 10.0
    max_requests: int = 200_000
    done: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def ok(self) -> int:
        return len(self.done)

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = self._connect()
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if self.ok + len(self.failures) >= self.max_requests:
                    return
                conn = self._one(conn)
        finally:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def _one(self, conn: http.client.HTTPConnection) -> http.client.HTTPConnection:
        began = time.monotonic()
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            self.failures.append(repr(exc))
            conn.close()
            return self._connect()
        if response.status == 200:
            self.done.append((began, time.monotonic(), body))
        else:
            self.failures.append(f"{response.status} {body[:80]!r}")
        return conn

    def progressed(self, since: int, by: int = 5) -> bool:
        return self.ok >= since + by or bool(self.failures)


@contextlib.contextmanager
def keep_alive_load(port: int, max_seconds: float) -> Iterator[KeepAliveLoad]:
    """A ``KeepAliveLoad`` running in a thread for the ``with`` block (at most max_seconds)."""
    load = KeepAliveLoad(port, max_seconds=max_seconds)
    thread = threading.Thread(target=load.run, name="keep-alive-load", daemon=True)
    thread.start()
    try:
        wait_for(lambda: load.ok > 0 or load.failures, what="the load to start")
        yield load
    finally:
        load.stop.set()
        thread.join(timeout=30)


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    """Three live backends named b1, b2, b3."""
    started = [start_backend(f"b{i}") for i in (1, 2, 3)]
    yield started
    for backend in started:
        backend.stop()


# --- instances on these backends ------------------------------------------------------------


def inst(backend: Backend, state: str = "up", weight: int = 1) -> Instance:
    """An instance named after ``backend`` and pointing at it."""
    return Instance(
        id=backend.name, host="127.0.0.1", port=backend.port, weight=weight, state=State(state)
    )


# b1 stays up; b2 and b3 cycle with coprime periods, so every step changes b3 at least and
# the combinations vary (b2 goes through weight 3, drain and down).
_B2 = ["absent", "up", "up:3", "drain", "down"]
_B3 = ["absent", "up", "drain"]


def membership(step: int, backends: list[Backend]) -> tuple[Instance, ...]:
    """Step ``step`` of a membership cycle over three backends (the runtime-mode tests)."""
    b1, b2, b3 = backends
    members = [inst(b1)]
    for backend, cycle in ((b2, _B2), (b3, _B3)):
        state, _, weight = cycle[step % len(cycle)].partition(":")
        if state != "absent":
            members.append(inst(backend, state, int(weight or 1)))
    return tuple(members)
