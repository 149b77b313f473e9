"""The status server over real HTTP on loopback: /metrics, /healthz, /readyz, /status.

The daemon's own wiring is tested where the daemon is; here the server runs with the
metric functions called directly and fake status/health callables.
"""

from __future__ import annotations

import http.client
import json
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
from lbsync.http import StatusServer
from lbsync.pipeline import Outcome
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
        lambda: metrics.REGISTRY.get_sample_value("lbsync_rounds_total", labels),
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
