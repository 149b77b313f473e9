"""One check against real loopback backends: HTTP status, body, method, Host; TCP connect."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import pytest

from lbsync.config import CheckSettings
from lbsync.model import Instance
from lbsync.probe.checks import MAX_BODY, CheckResult, run_check
from lbsync.probe.curl import CurlLoop
from tests.harness.backends import Backend
from tests.harness.net import free_port

pytestmark = pytest.mark.integration


def check(port: int, **settings: object) -> CheckResult:
    async def one() -> CheckResult:
        instance = Instance(id="i", host="127.0.0.1", port=port)
        curl = CurlLoop()
        try:
            return await run_check(curl, instance, CheckSettings.model_validate(settings))
        finally:
            curl.close()

    return asyncio.run(one())


def test_http_checks(backends: list[Backend]) -> None:
    b1 = backends[0]
    assert check(b1.port) == CheckResult(True)
    assert check(b1.port, body_contains="b1", host="web.example") == CheckResult(True)
    assert check(b1.port, body_contains="b2") == CheckResult(False, "HTTP 200 on /: body mismatch")
    assert check(b1.port, status_min=201, path="/x?y=1") == CheckResult(False, "HTTP 200 on /x?y=1")
    # The harness backend has no do_HEAD: a 501 proves the method went out as HEAD.
    assert check(b1.port, method="HEAD") == CheckResult(False, "HTTP 501 on /")
    assert check(b1.port, method="HEAD", status_max=599) == CheckResult(True)
    b1.fail("error")
    assert check(b1.port, path="/healthz") == CheckResult(False, "HTTP 500 on /healthz")
    b1.fail("hang")
    assert check(b1.port, timeout="0.2s") == CheckResult(False, "timeout after 0.2s")
    b1.fail("reset")
    result = check(b1.port)
    assert not result.ok
    assert result.reason
    refused = check(free_port())
    assert not refused.ok
    assert "refused" in refused.reason.lower()


def test_tcp_checks(backends: list[Backend]) -> None:
    assert check(backends[0].port, type="tcp") == CheckResult(True)
    closed = check(free_port(), type="tcp")
    assert not closed.ok
    assert "refused" in closed.reason.lower()


def _streaming_backend(body: bytes, endless: bool) -> tuple[socket.socket, threading.Thread]:
    """An HTTP server on loopback for one connection: 200 with ``body`` (then, if
    ``endless``, more bytes until the client goes away, bounded)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)  # bounded: a check that never connects does not hang the thread

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)
                length = b"Connection: close" if endless else b"Content-Length: %d" % len(body)
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + length + b"\r\n\r\n" + body)
                for _ in range(10_000 if endless else 0):  # ~640 MB at most
                    conn.sendall(b"x" * 65536)  # OSError once the client has gone

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize(
    ("body", "endless", "settings", "expected"),
    [
        # The text past the first 64 KiB is not looked at.
        (b"x" * MAX_BODY + b"NEEDLE", False, {"body_contains": "NEEDLE"}, False),
        (b"x" * (MAX_BODY - 10) + b"NEEDLE", False, {"body_contains": "NEEDLE"}, True),
        # A body that never ends: read up to 64 KiB, or not at all without body_contains.
        (b"NEEDLE", True, {"body_contains": "NEEDLE"}, True),
        (b"", True, {}, True),
    ],
)
def test_only_the_first_64_kib_of_a_body_are_read(
    body: bytes, endless: bool, settings: dict[str, object], expected: bool
) -> None:
    server, thread = _streaming_backend(body, endless)
    try:
        result = check(server.getsockname()[1], timeout="5s", **settings)
    finally:
        server.close()
        thread.join(15)
    assert result.ok is expected, result
