"""Reload failures with real nginx: last-known-good is restored, reloaded, and alerted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import instance, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"


def test_dead_lb_master_restores_last_known_good_files(
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    upstreams = nginx_server.conf_d / "upstreams.conf"
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    running = RunningDaemon(settings_for(etcd, nginx_server, tmp_path / "state"))
    try:
        wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")
        good = upstreams.read_bytes()
        os.kill(nginx_server.master_pid(), signal.SIGKILL)

        writer.put(key("app", "instances", "b2"), instance(backends[1]))
        wait_for(lambda: running.outcome() == "rolled_back", what="rollback")
        outcome = running.daemon.health.outcomes["nginx-test"]
        assert "nginx-test" in str(outcome.error)
        assert upstreams.read_bytes() == good  # never left half-applied
        backups = list((tmp_path / "state" / "backup" / "nginx-test").rglob("*"))
        assert backups, "last-known-good copy kept in the state dir"
    finally:
        running.stop()
