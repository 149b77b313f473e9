"""/metrics, /healthz, /readyz and /status scraped over HTTP from a real daemon."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.config import EtcdSettings, Settings
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import instance, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def with_http(settings: Settings) -> Settings:
    http = settings.http.model_copy(update={"listen": "127.0.0.1:0", "max_staleness": 3600.0})
    return settings.model_copy(update={"http": http})


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def running(etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path) -> Iterator[RunningDaemon]:
    daemon = RunningDaemon(with_http(settings_for(etcd, nginx_server, tmp_path / "state")))
    yield daemon
    daemon.stop()


def test_endpoints_report_the_daemon_state(
    running: RunningDaemon, etcd: EtcdServer, nginx_server: NginxServer, backends: list[Backend]
) -> None:
    with EtcdWriter(EtcdSettings(endpoints=[etcd.endpoint], prefix=P)) as writer:
        # the rejected value first, so that the last round is b1's reload
        writer.put(key("app", "instances", "bad"), "10.0.0.1:80; include /etc/passwd")
        writer.put(key("app", "instances", "b1"), instance(backends[0]))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")
    wait_for(lambda: running.daemon.http_server is not None, what="http server")
    assert running.daemon.http_server is not None
    base = running.daemon.http_server.url

    assert get(f"{base}/healthz") == (200, "ok\n")
    wait_for(lambda: get(f"{base}/readyz")[0] == 200, what="ready")

    status, text = get(f"{base}/metrics")
    assert status == 200
    assert metric(text, 'lbsync_rounds_total{action="reloaded",target="nginx-test"}') >= 1
    assert metric(text, 'lbsync_instances{service="app",state="up"}') == 1
    assert metric(text, "lbsync_etcd_connected") == 1
    # counters are process-wide: other tests in this pytest process may have added to them
    assert metric(text, "lbsync_rejected_values_total") >= 1
    assert 'lbsync_event_to_apply_seconds_bucket{le="0.001",target="nginx-test"}' in text

    status, body = get(f"{base}/status")
    document = json.loads(body)
    assert status == 200
    assert document["etcd"]["connected"] is True
    assert document["targets"]["nginx-test"]["action"] == "reloaded"
    assert f"{P}/services/app/instances/bad" in document["rejected"]


def test_readyz_fails_before_the_first_sync(
    etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path
) -> None:
    etcd.kill()
    daemon = RunningDaemon(with_http(settings_for(etcd, nginx_server, tmp_path / "state")))
    try:
        wait_for(lambda: daemon.daemon.http_server is not None, what="http server")
        assert daemon.daemon.http_server is not None
        base = daemon.daemon.http_server.url
        wait_for(lambda: get(f"{base}/healthz")[0] == 200, what="alive")
        status, reason = get(f"{base}/readyz")
        assert status == 503
        assert "first read of etcd" in reason
    finally:
        daemon.stop()
