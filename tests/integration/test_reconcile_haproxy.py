"""Level-triggered reconciliation with real etcd and HAProxy: runtime state changed over
the admin socket behind lbsync's back is put back, without a reload or an etcd change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lbsync.config_file import settings_from_dict
from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.state import config_servers
from lbsync.reconcile import RUNTIME_STATE_LOST
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.haproxy import HaproxyServer
from tests.harness.net import free_port, wait_for
from tests.integration.test_pipeline_haproxy import (
    bootstrap,
    generation,
    key,
    listen,
    registration,
)

pytestmark = pytest.mark.integration

P = "/lbsync"


@pytest.fixture
def daemon(
    etcd: EtcdServer, writer: EtcdWriter, haproxy: HaproxyServer, tmp_path: Path
) -> Iterator[RunningDaemon]:
    writer.put(f"{P}/services/web/settings", listen(haproxy.port))
    bootstrap(haproxy, {"web": haproxy.port})
    data = {
        "etcd": {"endpoints": [etcd.endpoint], "prefix": P},
        "wait": {"min": "0s", "max": "0s"},
        "reconcile": {"interval": "0.5s", "retry_initial": "0.2s", "retry_max": "1s"},
        "state_dir": str(tmp_path / "state"),
        "target": [haproxy.target().model_dump(by_alias=True, mode="json")],
    }
    settings = settings_from_dict(data, base_dir=tmp_path, source="test")
    running = RunningDaemon(settings)
    try:
        wait_for(lambda: running.latest() is not None, what="the first round")
        yield running
    finally:
        running.stop()


def server_of(haproxy: HaproxyServer, instance_id: str) -> str:
    servers = config_servers(haproxy.config.read_text())["web"]
    (name,) = (n for n, s in servers.items() if s.instance_id == instance_id)
    return name


def repaired(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["event"] == "drift.repaired"]


def test_a_server_set_to_maint_behind_lbsyncs_back_is_put_back(
    daemon: RunningDaemon, writer: EtcdWriter, haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    writer.put(key("web", "instances", "b1"), registration(b1))
    writer.put(key("web", "instances", "b2"), registration(b2))
    # a draining one too: HAProxy shows it differently after a reload and after a runtime
    # change, and neither may count as drift
    writer.put(key("web", "instances", "b3"), registration(b3, state="drain"))
    wait_for(lambda: only_served_by(haproxy.port, {"b1", "b2"}), what="b1 and b2 served")
    wait_for(lambda: daemon.caught_up(writer), what="the daemon to catch up")
    before, revision = generation(haproxy), writer.revision()

    with capture_logs() as events:
        admin = Cli(haproxy.admin_socket, target="test")
        admin.query(f"set server web/{server_of(haproxy, 'b1')} state maint")
        # (not waiting to see maint: the repair may come first)
        wait_for(lambda: repaired(events), timeout=15, what="drift.repaired")
        assert haproxy.servers("web")[server_of(haproxy, "b1")].admin == "ready"
        wait_for(lambda: only_served_by(haproxy.port, {"b1", "b2"}), what="both served")
        compared = daemon.daemon._reconcile_at
        wait_for(lambda: daemon.daemon._reconcile_at > compared + 1.0, what="two more compares")
    found = repaired(events)
    assert [e["kind"] for e in found] == [RUNTIME_STATE_LOST]
    assert found[0]["action"] == "runtime"
    assert generation(haproxy) == before  # no reload
    assert writer.revision() == revision  # no etcd change


def test_the_lb_identity_survives_a_reload_and_changes_with_a_restart(
    daemon: RunningDaemon, writer: EtcdWriter, haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    driver = daemon.daemon.pipelines[0].driver
    first = driver.lb_identity()
    assert first is not None
    assert first[0] == haproxy.master_pid()
    writer.put(f"{P}/services/api/settings", listen(free_port()))  # a new backend: reload
    writer.put(key("api", "instances", "b1"), registration(backends[0]))
    wait_for(lambda: "reloaded" in daemon.actions(), what="a reload")
    assert driver.lb_identity() == first
    haproxy.stop()
    assert driver.lb_identity() is None
