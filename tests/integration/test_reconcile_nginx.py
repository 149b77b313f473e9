"""Level-triggered reconciliation with real etcd and nginx: what goes wrong between etcd
events is put right without waiting for the next one."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from lbsync.config import Settings
from lbsync.reconcile import FILE_EDITED, LB_RESTARTED
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import UPSTREAMS_TEMPLATE, NginxServer
from tests.integration.test_pipeline_nginx import instance, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"
RECONCILE = {"interval": "0.5s", "retry_initial": "0.2s", "retry_max": "1s"}
# reconcile.interval + one round (a reload: well under a second here), with room for a
# loaded CI machine; the wait ends as soon as the state is reached.
CONVERGE = 15.0


def settings_with(
    etcd: EtcdServer, nginx: NginxServer, state_dir: Path, template: Path = UPSTREAMS_TEMPLATE
) -> Settings:
    return settings_for(etcd, nginx, state_dir, template, reconcile=RECONCILE)


@pytest.fixture
def daemon(etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(settings_with(etcd, nginx_server, tmp_path / "state"))
    yield running
    running.stop()


def kill_nginx(nginx: NginxServer) -> None:
    """SIGKILL the master and its workers, as a crash would leave it for a supervisor."""
    master = psutil.Process(nginx.master_pid())
    procs = [master, *master.children()]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=10)
    nginx.pid_file.unlink(missing_ok=True)


def repaired(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["event"] == "drift.repaired"]


def rolled_back(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["event"] == "apply.rolled_back"]


def test_nginx_restarted_on_older_files_converges_without_an_etcd_change(
    daemon: RunningDaemon, writer: EtcdWriter, nginx_server: NginxServer, backends: list[Backend]
) -> None:
    upstreams = nginx_server.conf_d / "upstreams.conf"
    b1, b2, _ = backends
    writer.put(key("app", "instances", "b1"), instance(b1))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")
    older = upstreams.read_bytes()
    writer.put(key("app", "instances", "b2"), instance(b2))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1", "b2"}), what="b1 and b2")
    wait_for(lambda: daemon.caught_up(writer), what="round done")
    revision = writer.revision()

    with capture_logs() as events:
        kill_nginx(nginx_server)
        upstreams.write_bytes(older)  # e.g. a config-management run put its copy back
        nginx_server.start()  # the supervisor restarts it, on the older files
        wait_for(
            lambda: only_served_by(nginx_server.port, {"b1", "b2"}),
            timeout=CONVERGE,
            what="b2 served again",
        )
        # Traffic moves at the reload; the round's event comes after its verify.
        wait_for(lambda: repaired(events) or rolled_back(events), what="the repair logged")
    assert writer.revision() == revision  # no etcd change was needed
    # Found by the comparison once nginx is back (lb_restarted), or, when a comparison
    # fell in the window where nginx was down, that round's reload failed (the older file
    # restored) and its retry converged once nginx was back.
    kinds = [e["kind"] for e in repaired(events)]
    retried = rolled_back(events)
    assert kinds == [LB_RESTARTED] or (retried and set(kinds) <= {FILE_EDITED, LB_RESTARTED})


def test_a_round_failed_by_a_dead_master_is_retried_once_it_is_back(
    daemon: RunningDaemon, writer: EtcdWriter, nginx_server: NginxServer, backends: list[Backend]
) -> None:
    """The issue's case: the master dies during a reload, lbsync restores the older files,
    the supervisor restarts nginx on them; the retry, not an etcd change, brings b2."""
    b1, b2, _ = backends
    writer.put(key("app", "instances", "b1"), instance(b1))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")
    kill_nginx(nginx_server)
    writer.put(key("app", "instances", "b2"), instance(b2))
    wait_for(lambda: daemon.outcome() in ("rolled_back", "failed"), what="the round failed")
    revision = writer.revision()
    assert "nginx-test" in daemon.daemon.health.failing_since
    nginx_server.start()
    wait_for(
        lambda: only_served_by(nginx_server.port, {"b1", "b2"}),
        timeout=CONVERGE,
        what="b2 served by a retry",
    )
    assert writer.revision() == revision
    wait_for(lambda: "nginx-test" not in daemon.daemon.health.failing_since, what="cleared")


def test_a_hand_edited_file_is_repaired_and_logged(
    daemon: RunningDaemon, writer: EtcdWriter, nginx_server: NginxServer, backends: list[Backend]
) -> None:
    upstreams = nginx_server.conf_d / "upstreams.conf"
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")
    wait_for(lambda: daemon.caught_up(writer), what="round done")
    ours = upstreams.read_bytes()
    hand = f"upstream app {{\n    server {instance(backends[2])};\n}}\n"
    with capture_logs() as events:
        upstreams.write_text(hand)
        os.kill(nginx_server.master_pid(), signal.SIGHUP)  # and someone reloads it
        wait_for(lambda: upstreams.read_bytes() == ours, timeout=CONVERGE, what="repaired")
        wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 only again")
        wait_for(lambda: repaired(events), what="the repair logged")  # after its verify
    found = repaired(events)
    assert [e["kind"] for e in found] == [FILE_EDITED]
    assert found[0]["files"] == [str(upstreams)]
    assert found[0]["action"] == "reloaded"


def test_a_failing_checker_that_starts_passing_is_applied_by_the_retry(
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    extra = tmp_path / "extra" / "maps.conf"
    template = tmp_path / "upstreams.conf.j2"
    template.write_text(UPSTREAMS_TEMPLATE.read_text() + f"include {extra};\n")
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    running = RunningDaemon(settings_with(etcd, nginx_server, tmp_path / "state", template))
    try:
        wait_for(lambda: running.outcome() == "failed", what="nginx -t refuses")
        wait_for(lambda: running.actions().count("failed") >= 2, what="retried")
        revision = writer.revision()
        extra.parent.mkdir()
        extra.write_text("map $host $lbsync_test { default 1; }\n")  # the file appears
        wait_for(
            lambda: only_served_by(nginx_server.port, {"b1"}),
            timeout=CONVERGE,
            what="applied by a retry",
        )
        assert writer.revision() == revision
        assert running.outcome() == "reloaded"
    finally:
        running.stop()
