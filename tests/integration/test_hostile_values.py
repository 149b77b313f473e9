"""Issue 17 end to end: hostile etcd values under a running daemon, real etcd and real LBs.

Each value below once got past lbsync: an IPv6 zone ID that carried a root ``program``
section into haproxy.cfg, a nested value that crash-looped the daemon, settings that made
every round fail. Now each is one ``value.rejected`` and the rest keeps flowing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.haproxy import HaproxyServer
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_haproxy import bootstrap, listen, registration
from tests.integration.test_pipeline_haproxy import settings_for as haproxy_settings
from tests.integration.test_pipeline_nginx import settings_for as nginx_settings

pytestmark = pytest.mark.integration

P = "/lbsync"
DEEP = "{" + '"a": {' * 3000 + "}" * 3001  # ~18 KB: RecursionError in json before


def key(service: str, kind: str, iid: str = "") -> str:
    return f"{P}/services/{service}/{kind}" + (f"/{iid}" if iid else "")


def zone_injection(marker: Path) -> str:
    host = f"::1%lo\n\nprogram pwn\n    command /bin/touch {marker}\n\nbackend web2"
    return json.dumps({"host": host, "port": 80})


def hostile_batch(marker: Path) -> dict[str, str]:
    """One key per finding; every one of them must be rejected."""
    return {
        key("app", "instances", "zone"): zone_injection(marker),
        key("app", "instances", "deep"): DEEP,
        key("app", "instances", "digits"): '{"host": "10.0.0.1", "port": ' + "9" * 5000 + "}",
        key("app", "instances", "newline"): '{"host": "example.com\\n", "port": 80}',
        key("app", "instances", "meta"): '{"host": "10.0.0.1", "port": 80, "meta": {"a": "a\\n"}}',
        key("app", "health", "deep"): DEEP,
        key("inf", "settings"): '{"keepalive": 1e400}',
        key("big", "settings"): '{"keepalive": 1e30}',
        key("port", "settings"): '{"listen": 99999}',
        key("unix", "settings"): '{"listen": "unix:/tmp/lbsync-anywhere.sock"}',
        key("slots", "settings"): '{"slots": 100000}',
        key("bal", "settings"): '{"balance": "least_conn\\n"}',
    }


# --- nginx: the daemon survives and keeps applying ---------------------------------------


@pytest.fixture
def nginx_daemon(
    etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path
) -> Iterator[RunningDaemon]:
    running = RunningDaemon(nginx_settings(etcd, nginx_server, tmp_path / "state"))
    yield running
    running.stop()


def test_nginx_daemon_survives_a_batch_of_hostile_values(
    nginx_daemon: RunningDaemon,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    b1, b2, _ = backends
    writer.put(key("app", "instances", "b1"), f"127.0.0.1:{b1.port}")
    wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")

    batch = hostile_batch(tmp_path / "pwned")
    for name, value in batch.items():
        writer.put(name, value)
    # Names differing by a trailing newline are not services at all (raw keys only).
    writer.put(f"{P}/services/app\n/instances/b9", f"127.0.0.1:{b2.port}")
    wait_for(lambda: nginx_daemon.caught_up(writer), what="daemon caught up")
    wait_for(lambda: set(nginx_daemon.daemon.catalog.rejected) == set(batch), what="rejected")

    writer.put(key("app", "instances", "b2"), f"127.0.0.1:{b2.port}")  # a benign change
    wait_for(lambda: only_served_by(nginx_server.port, {"b1", "b2"}), what="b2 served")
    assert nginx_daemon.thread.is_alive()
    rendered = (nginx_server.conf_d / "upstreams.conf").read_text()
    # Services whose only key was rejected do not exist; no rejected setting was rendered.
    assert re.findall(r"^upstream (\S+) \{$", rendered, re.MULTILINE) == ["app"]
    assert "keepalive" not in rendered


# --- HAProxy: the zone-ID injection never reaches haproxy.cfg ------------------------------


@pytest.fixture
def haproxy_daemon(
    etcd: EtcdServer, haproxy: HaproxyServer, writer: EtcdWriter, tmp_path: Path
) -> Iterator[RunningDaemon]:
    writer.put(key("web", "settings"), listen(haproxy.port))
    bootstrap(haproxy, {"web": haproxy.port})
    running = RunningDaemon(haproxy_settings(etcd, tmp_path / "state", haproxy.target()))
    try:
        wait_for(lambda: running.latest() is not None, what="the first round")
        yield running
    finally:
        running.stop()


def test_zone_id_injection_is_rejected_before_haproxy_cfg(
    haproxy_daemon: RunningDaemon,
    writer: EtcdWriter,
    haproxy: HaproxyServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    writer.put(key("web", "instances", "evil"), zone_injection(marker))
    writer.put(key("web", "instances", "b1"), registration(backends[0]))
    wait_for(lambda: only_served_by(haproxy.port, {"b1"}), what="b1 served")
    wait_for(lambda: haproxy_daemon.caught_up(writer), what="daemon caught up")

    assert set(haproxy_daemon.daemon.catalog.rejected) == {key("web", "instances", "evil")}
    config = haproxy.config.read_text()
    assert "program" not in config
    assert "lbsync-id=evil" not in config
    assert not marker.exists()
    assert haproxy_daemon.thread.is_alive()
