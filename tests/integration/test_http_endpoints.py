"""The status server over real HTTP on loopback: /metrics, /healthz, /readyz, /status.

The daemon's own wiring is tested where the daemon is; here the server runs with the
metric functions called directly and fake status/health callables.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbsync import metrics
from lbsync.errors import ConfigError, ValidationFailed
from lbsync.http import MAX_REQUEST_HEAD, StatusServer
from lbsync.outcome import Outcome
from lbsync.testing import snapshot_from
from tests.harness.net import wait_for

pytestmark = pytest.mark.integration


@dataclass
class FakeDaemon:
    healthy: tuple[bool, str] = (True, "")
    ready: tuple[bool, str] = (False, "first sync not done")
    status: dict[str, Any] = field(default_factory=dict)
    broken: bool = False

    def get_status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("status exploded")
        return self.status


@pytest.fixture
def fake() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def server(fake: FakeDaemon) -> Iterator[StatusServer]:
    srv = StatusServer(
        "127.0.0.1:0",
        status=fake.get_status,
        healthy=lambda: fake.healthy,
        ready=lambda: fake.ready,
    )
    srv.start()
    yield srv
    srv.stop()


def get(
    server: StatusServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_are_scraped_in_prometheus_text_format(server: StatusServer) -> None:
    metrics.init_targets(["scrape"])
    metrics.record_outcome(
        Outcome("scrape", 10, "reloaded", ("/x",), None, {"render": 2.0, "reload": 1.0})
    )
    error = ValidationFailed("refused", command=["nginx", "-t"], returncode=1)
    metrics.record_outcome(Outcome("scrape", 11, "failed", error=error))
    metrics.observe_event_to_apply(0.004, "scrape")
    metrics.set_catalog(
        snapshot_from(
            {"services": {"scraped": {"instances": {"a": "10.0.0.1:80", "b": "10.0.0.2:80"}}}}
        )
    )
    metrics.set_etcd(True, 4242, 1_700_000_000.0)

    status, headers, body = get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(body)

    def value(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    assert value("lbsync_rounds_total", target="scrape", action="reloaded") == 1
    assert value("lbsync_rounds_total", target="scrape", action="rolled_back") == 0
    assert value("lbsync_reloads_total", target="scrape", result="ok") == 1
    assert value("lbsync_validation_failures_total", target="scrape") == 1
    assert value("lbsync_stage_seconds_sum", target="scrape", stage="render") == 0.002
    assert value("lbsync_event_to_apply_seconds_count", target="scrape") == 1
    assert value("lbsync_instances", service="scraped", state="up") == 2
    assert value("lbsync_etcd_connected") == 1
    assert value("lbsync_last_sync_revision") == 4242
    assert value("lbsync_last_round_success", target="scrape") == 0
    assert ("process_resident_memory_bytes", frozenset()) in found


def test_openmetrics_when_the_scraper_asks_for_it(server: StatusServer) -> None:
    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = get(server, "/metrics", {"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_health_and_readiness_follow_the_callables(server: StatusServer, fake: FakeDaemon) -> None:
    assert get(server, "/healthz")[::2] == (200, "ok\n")
    assert get(server, "/readyz")[::2] == (503, "first sync not done\n")
    fake.ready = (True, "etcd lost 3s ago, snapshot fresh enough")
    assert get(server, "/readyz")[::2] == (200, "ok: etcd lost 3s ago, snapshot fresh enough\n")
    fake.healthy = (False, "main loop stuck for 45s")
    status, headers, body = get(server, "/healthz")
    assert (status, body) == (503, "main loop stuck for 45s\n")
    assert headers["Cache-Control"] == "no-store"


def test_status_is_json(server: StatusServer, fake: FakeDaemon) -> None:
    fake.status = {"ready": True, "targets": {"nginx": {"action": "reloaded"}}, "dir": Path("/x")}
    status, headers, body = get(server, "/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "ready": True,
        "targets": {"nginx": {"action": "reloaded"}},
        "dir": "/x",  # non-JSON values are shown as strings, not a 500
    }


def test_a_failing_callable_gives_500_and_the_server_keeps_serving(
    server: StatusServer, fake: FakeDaemon
) -> None:
    fake.broken = True
    status, _, body = get(server, "/status")
    assert status == 500
    assert "RuntimeError: status exploded" in body
    assert get(server, "/healthz")[0] == 200
    fake.broken = False
    assert get(server, "/status")[0] == 200


def test_head_index_and_unknown_paths(server: StatusServer) -> None:
    status, headers, body = get(server, "/metrics", method="HEAD")
    assert (status, body) == (200, "")
    assert int(headers["Content-Length"]) > 0
    assert get(server, "/")[::2] == (200, "lbsync: /metrics /healthz /readyz /status\n")
    assert get(server, "/nope")[0] == 404
    assert get(server, "/healthz?verbose=1")[0] == 200


def test_a_stalled_client_does_not_block_others(server: StatusServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes
        assert get(server, "/healthz")[0] == 200


def test_concurrent_scrapes_while_metrics_change(server: StatusServer) -> None:
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            metrics.record_outcome(Outcome("churn", n, "unchanged", durations={"render": 0.1}))

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    labels = {"target": "churn", "action": "unchanged"}
    wait_for(
        lambda: metrics.enable().registry.get_sample_value("lbsync_rounds_total", labels),
        what="churn to start",
    )
    try:
        seen = [samples(get(server, "/metrics")[2]) for _ in range(5)]
    finally:
        stop.set()
        worker.join(5)
    series = ("lbsync_rounds_total", frozenset({("target", "churn"), ("action", "unchanged")}))
    counts = [s.get(series, 0.0) for s in seen]
    assert counts == sorted(counts)  # counters only go up between scrapes
    assert counts[0] > 0


def test_bind_failure_is_a_config_error_naming_the_address(server: StatusServer) -> None:
    taken = f"127.0.0.1:{server.port}"
    other = StatusServer(taken, status=dict, healthy=lambda: (True, ""), ready=lambda: (True, ""))
    with pytest.raises(ConfigError) as info:
        other.start()
    assert taken in str(info.value)
    assert "http.listen" in str(info.value)


def test_stop_releases_the_port_and_ipv6_works() -> None:
    srv = StatusServer("[::1]:0", status=dict, healthy=lambda: (True, ""), ready=lambda: (True, ""))
    try:
        srv.start()
    except ConfigError as err:  # a host without IPv6 loopback
        pytest.skip(str(err))
    port = srv.port
    assert srv.url == f"http://[::1]:{port}"
    conn = http.client.HTTPConnection("::1", port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    srv.stop()
    again = StatusServer(
        f"[::1]:{port}", status=dict, healthy=lambda: (True, ""), ready=lambda: (True, "")
    )
    wait_for(lambda: _starts(again), what="the port to be free again")
    again.stop()


def _starts(server: StatusServer) -> bool:
    try:
        server.start()
    except ConfigError:
        return False
    return True


# --- limits: connections, deadlines, request size ----------------------------------------


def _bounded_server(**limits: Any) -> StatusServer:
    srv = StatusServer(
        "127.0.0.1:0", status=dict, healthy=lambda: (True, ""), ready=lambda: (True, ""), **limits
    )
    srv.start()
    return srv


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def _healthz_status(srv: StatusServer) -> int | None:
    """The status of a fresh /healthz, or None when the connection was closed or reset."""
    try:
        return get(srv, "/healthz")[0]
    except (ConnectionError, http.client.RemoteDisconnected):
        return None


def _answer(sock: socket.socket) -> bytes | None:
    """What the server sent so far on ``sock`` (b"" once closed), None while it says nothing."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    try:
        return sock.recv(4096)
    except ConnectionError:
        return b""


def test_connections_beyond_the_limit_get_503_and_threads_stay_bounded() -> None:
    limit, opened = 3, 10
    srv = _bounded_server(max_connections=limit, request_timeout=120.0)
    try:
        before = _handler_threads()
        _hold_every_slot(srv, limit=limit, opened=opened, handler_threads_before=before)
        wait_for(lambda: _healthz_status(srv) == 200, what="/healthz once the idle clients left")
        wait_for(lambda: _handler_threads() <= before, what="the handler threads to end")
    finally:
        srv.stop()


def _hold_every_slot(
    srv: StatusServer, *, limit: int, opened: int, handler_threads_before: int
) -> None:
    """Open ``opened`` idle connections: ``limit`` are served (and idle), the rest get 503."""
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(opened)]
    try:
        refused: set[int] = set()

        def all_extra_refused() -> bool:
            for n, sock in enumerate(idle):
                answer = _answer(sock)
                if answer is not None:
                    assert answer.startswith(b"HTTP/1.1 503 ") or answer == b""
                    refused.add(n)
            return len(refused) >= opened - limit

        wait_for(all_extra_refused, what=f"{opened - limit} connections refused")
        assert len(refused) == opened - limit
        assert _handler_threads() - handler_threads_before <= limit
        assert _healthz_status(srv) in (503, None)  # every slot is held by an idle client
    finally:
        for sock in idle:
            sock.close()


def test_a_dripping_client_is_cut_off_at_the_deadline_and_frees_its_slot() -> None:
    srv = _bounded_server(max_connections=1, request_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            wait_for(lambda: _healthz_status(srv) != 200, what="the slow client to hold the slot")
            cut_off = False
            for _ in range(600):  # one byte per 0.1 s, well inside each read's own timeout
                if select.select([slow], [], [], 0.1)[0]:
                    cut_off = _answer(slow) == b""
                    break
                try:
                    slow.send(b"x")
                except ConnectionError:
                    cut_off = True
                    break
            assert cut_off, "a client sending a byte every 0.1 s held its slot for a minute"
        wait_for(lambda: _healthz_status(srv) == 200, what="/healthz after the cut-off")
    finally:
        srv.stop()


def test_an_idle_server_sleeps_without_a_timeout_until_a_connection_arms_one() -> None:
    srv = _bounded_server(max_connections=2, request_timeout=60.0)
    try:
        server = srv._server
        assert server is not None
        assert server._next_deadline_in() is None  # select() without a timeout: no wake-ups
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10):
            wait_for(lambda: server._next_deadline_in() is not None, what="a deadline armed")
            left = server._next_deadline_in()
            assert left is not None
            assert 0 < left <= 60
        wait_for(lambda: server._next_deadline_in() is None, what="the deadline disarmed")
    finally:
        srv.stop()


def _raw_request(srv: StatusServer, head: bytes) -> bytes:
    """Send ``head`` as is and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("where", "status"), [("request line", b"414"), ("headers", b"431")], ids=["line", "headers"]
)
def test_a_request_head_over_the_budget_is_refused(
    server: StatusServer, where: str, status: bytes
) -> None:
    # Exactly one byte over the budget, so the server has read all of it when it answers.
    size = MAX_REQUEST_HEAD + 1
    if where == "request line":
        head = b"GET /" + b"a" * (size - 5)
    else:
        start = b"GET /healthz HTTP/1.1\r\n"
        line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
        count = (size - len(start)) // len(line)
        head = start + line * count
        head += b"X-Last: " + b"q" * (size - len(head) - 8)
    assert len(head) == size
    answer = _raw_request(server, head)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert get(server, "/healthz")[0] == 200


def test_a_request_head_just_under_the_budget_is_served(server: StatusServer) -> None:
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    pad = MAX_REQUEST_HEAD - len(start) - len(b"X-Pad: \r\n\r\n")
    answer = _raw_request(server, start + b"X-Pad: " + b"p" * pad + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
