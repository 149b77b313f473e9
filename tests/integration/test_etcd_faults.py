"""DESIGN.md's etcd rows of the failure table, with the real daemon, etcd, nginx and backends.

Each test runs ``lbsync.daemon.Daemon`` in a thread against real etcd (one member, or three
on loopback), a real nginx and real HTTP backends, breaks etcd the way the row says, and
checks what an operator relies on: the LB config is not touched while etcd is away,
traffic keeps flowing, and once etcd is back the served set equals etcd's state.

Convergence times (etcd healthy again → change served) are printed, not asserted: run
with ``-s`` to see them. They are benchmark numbers, not pass/fail criteria.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbsync.config import EtcdSettings, Settings
from lbsync.daemon import Daemon
from lbsync.errors import SourceError
from lbsync.health import Health
from lbsync.model import SourceMessage
from lbsync.source import EtcdSource, EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.etcd import EtcdCluster, EtcdServer, SourceRecorder, TcpProxy
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import instance, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"
TARGET = "nginx-test"


class TeeSource:
    """The real EtcdSource, with every message it emits also handed to a recorder."""

    def __init__(self, settings: EtcdSettings, recorder: SourceRecorder) -> None:
        self.inner = EtcdSource(settings)
        self.recorder = recorder

    def run(self, emit: Callable[[SourceMessage], None], stop: threading.Event) -> None:
        def both(message: SourceMessage) -> None:
            self.recorder(message)
            emit(message)

        self.inner.run(both, stop)

    def close(self) -> None:
        self.inner.close()


class WatchedDaemon:
    """The daemon in a thread, its source's messages recorded (the lead's ``RunningDaemon``
    with a window on the source)."""

    def __init__(self, settings: Settings) -> None:
        self.recorder = SourceRecorder()
        self.daemon = Daemon(settings, source_factory=lambda s: TeeSource(s.etcd, self.recorder))
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)
        self.thread.start()

    @property
    def health(self) -> Health:
        return self.daemon.health

    def failed_attempts(self) -> int:
        return sum(1 for s in self.recorder.statuses() if not s.connected)

    def applied_revision(self) -> int:
        latest = self.daemon.health.outcomes.get(TARGET)
        return latest.revision if latest is not None and latest.ok else 0

    def stop(self) -> None:
        self.daemon.flags.stop = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "daemon did not stop"


@pytest.fixture
def start_daemon() -> Iterator[Callable[[Settings], WatchedDaemon]]:
    started: list[WatchedDaemon] = []

    def start(settings: Settings) -> WatchedDaemon:
        running = WatchedDaemon(settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def with_etcd(settings: Settings, *endpoints: str, **etcd: object) -> Settings:
    """``settings`` with other etcd endpoints and/or [etcd] options, and the removal guard
    off: these tests replace whole instance sets on purpose, and guards have their own."""
    update: dict[str, object] = {"timeout": 2.0, **etcd}
    if endpoints:
        update["endpoints"] = list(endpoints)
    etcd_settings = EtcdSettings.model_validate({**settings.etcd.model_dump(), **update})
    guard = settings.guard.model_copy(update={"max_removed_fraction": 1.0})
    return settings.model_copy(update={"etcd": etcd_settings, "guard": guard})


def put_retrying(endpoint: str, *pairs: tuple[str, str | None]) -> int:
    """Write (value None: delete) through ``endpoint``, retrying while it is not ready yet
    (just restarted, or electing a leader). Returns the revision of the last write."""
    revision = 0
    with EtcdWriter(EtcdSettings(endpoints=[endpoint], prefix=P, timeout=2.0)) as writer:
        for k, value in pairs:

            def attempt(k: str = k, value: str | None = value) -> bool:
                nonlocal revision
                try:
                    if value is None:
                        writer.delete(k)
                        revision = writer.revision()
                    else:
                        revision = writer.put(k, value)
                except SourceError:
                    return False
                return True

            wait_for(attempt, timeout=30, what=f"a write of {k} to be accepted")
    return revision


def served(live: NginxServer, *names: str) -> Callable[[], bool]:
    return lambda: only_served_by(live.port, set(names))


def report(what: str, seconds: float) -> None:
    print(f"\n[convergence] {what}: {seconds * 1000:.0f} ms")


def nginx_untouched(live: NginxServer) -> tuple[bytes, list[int]]:
    return (live.conf_d / "upstreams.conf").read_bytes(), live.worker_pids()


# --- etcd unreachable at start ------------------------------------------------------------


def test_etcd_unreachable_at_start_leaves_lb_config_untouched(
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    start_daemon: Callable[[Settings], WatchedDaemon],
) -> None:
    live = nginx_server
    etcd = EtcdServer(tmp_path / "etcd")
    try:
        etcd.start()
        put_retrying(etcd.endpoint, (key("app", "instances", "b1"), instance(backends[0])))
        etcd.stop()
        before = nginx_untouched(live)

        running = start_daemon(with_etcd(settings_for(etcd, live, tmp_path / "state")))
        wait_for(lambda: running.failed_attempts() >= 3, what="three failed attempts")
        assert nginx_untouched(live) == before
        assert running.health.synced is False
        assert running.health.connected is False
        assert running.health.disconnected_since is not None
        assert running.daemon.health.outcomes == {}, "no round may run before a full read"
        assert running.recorder.resets() == []

        etcd.start()
        healthy_at = time.monotonic()
        wait_for(served(live, "b1"), what="b1 served once etcd is up")
        report("etcd up after an unreachable start → served", time.monotonic() - healthy_at)
        assert running.health.synced is True
        assert running.health.connected is True
    finally:
        etcd.kill()


# --- etcd lost while running --------------------------------------------------------------


def test_etcd_lost_while_running_keeps_config_and_resumes_without_losing_events(
    etcd: EtcdServer,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    start_daemon: Callable[[Settings], WatchedDaemon],
) -> None:
    live = nginx_server
    b1, b2, b3 = backends
    put_retrying(
        etcd.endpoint,
        (key("app", "instances", "b1"), instance(b1)),
        (key("app", "instances", "b2"), instance(b2)),
    )
    running = start_daemon(with_etcd(settings_for(etcd, live, tmp_path / "state")))
    wait_for(served(live, "b1", "b2"), what="b1 and b2 served")
    before = nginx_untouched(live)

    etcd.kill()
    wait_for(lambda: not running.health.connected, what="the loss to be noticed")
    assert running.health.disconnected_since is not None
    # Polled, not one-shot: a request can straddle the old workers' shutdown from the
    # reload just before; what counts is that b1 + b2 are served while etcd is away.
    wait_for(served(live, "b1", "b2"), timeout=10, what="traffic while etcd is away")
    assert nginx_untouched(live) == before

    etcd.start()
    healthy_at = time.monotonic()
    # Written at once, racing the daemon's reconnect: every event must arrive either way.
    latest = put_retrying(
        etcd.endpoint,
        (key("app", "instances", "b3"), instance(b3)),
        (key("app", "health", "b1"), '{"status": "down", "reason": "test", "by": "monitor"}'),
        (key("app", "instances", "b2"), None),
    )
    wait_for(served(live, "b3"), what="the writes made right after the restart")
    report("etcd restarted after kill -9 → 3 writes served", time.monotonic() - healthy_at)

    wait_for(lambda: running.health.connected, what="connected again")
    wait_for(lambda: running.applied_revision() >= latest, what="a round at etcd's revision")
    rec = running.recorder
    assert rec.snapshot() == etcd.dump(f"{P}/")
    assert len(rec.resets()) == 1, "a resume from the last revision, not a full resync"
    assert rec.errors == [], "no event lost or repeated"


# --- watched revision compacted ------------------------------------------------------------


def test_compacted_revision_while_disconnected_triggers_full_resync(
    etcd: EtcdServer,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    start_daemon: Callable[[Settings], WatchedDaemon],
) -> None:
    live = nginx_server
    b1, b2, b3 = backends
    proxy = TcpProxy(etcd.client_port)
    try:
        put_retrying(etcd.endpoint, (key("app", "instances", "b1"), instance(b1)))
        settings = with_etcd(settings_for(etcd, live, tmp_path / "state"), proxy.endpoint)
        running = start_daemon(settings)
        wait_for(served(live, "b1"), what="b1 served")
        before = nginx_untouched(live)

        proxy.block()
        wait_for(lambda: not running.health.connected, what="the cut to be noticed")
        with EtcdWriter(EtcdSettings(endpoints=[etcd.endpoint], prefix=P)) as writer:
            writer.delete(key("app", "instances", "b1"))
            writer.put(key("app", "instances", "b2"), instance(b2))
            writer.put(key("app", "instances", "b3"), instance(b3))
            writer.compact(writer.put("/elsewhere/bump", "x"))
        assert nginx_untouched(live) == before
        proxy.unblock()
        unblocked_at = time.monotonic()

        wait_for(served(live, "b2", "b3"), what="the state after the compaction served")
        report("cut + compaction, unblocked → served", time.monotonic() - unblocked_at)
        rec = running.recorder
        assert len(rec.resets()) == 2, "a full resync after the compaction"
        assert rec.snapshot() == etcd.dump(f"{P}/")
        assert running.daemon.catalog.revision >= rec.resets()[-1].revision
    finally:
        proxy.close()


# --- silent stream --------------------------------------------------------------------------


def test_silent_stream_is_detected_and_reconnected(
    etcd: EtcdServer,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    start_daemon: Callable[[Settings], WatchedDaemon],
) -> None:
    live = nginx_server
    b1, b2, _ = backends
    put_retrying(etcd.endpoint, (key("app", "instances", "b1"), instance(b1)))
    settings = with_etcd(settings_for(etcd, live, tmp_path / "state"), silence_deadline="1.5s")
    running = start_daemon(settings)
    wait_for(served(live, "b1"), what="b1 served")
    before = nginx_untouched(live)

    etcd.pause()
    try:
        wait_for(
            lambda: any("silent" in (s.error or "") for s in running.recorder.statuses()),
            what="the silent stream to be reported",
        )
        assert not running.health.connected
        assert nginx_untouched(live) == before
        wait_for(served(live, "b1"), timeout=10, what="traffic while etcd is stalled")
    finally:
        etcd.resume()
    resumed_at = time.monotonic()
    put_retrying(etcd.endpoint, (key("app", "instances", "b2"), instance(b2)))
    wait_for(served(live, "b1", "b2"), what="a change after SIGCONT")
    report("SIGCONT → change served", time.monotonic() - resumed_at)
    wait_for(lambda: running.health.connected, what="connected again")
    assert len(running.recorder.resets()) == 1
    assert running.recorder.errors == []


# --- three-node cluster ---------------------------------------------------------------------


def test_three_node_cluster_leader_killed_watch_continues(
    etcd_cluster: EtcdCluster,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    start_daemon: Callable[[Settings], WatchedDaemon],
) -> None:
    live = nginx_server
    b1, b2, _ = backends
    first = etcd_cluster.members[0]
    put_retrying(first.endpoint, (key("app", "instances", "b1"), instance(b1)))
    settings = with_etcd(settings_for(first, live, tmp_path / "state"), *etcd_cluster.endpoints)
    running = start_daemon(settings)
    wait_for(served(live, "b1"), what="b1 served")

    leader = etcd_cluster.leader()
    survivor = next(m for m in etcd_cluster.members if m is not leader)
    leader.kill()
    killed_at = time.monotonic()
    put_retrying(survivor.endpoint, (key("app", "instances", "b2"), instance(b2)))
    written_at = time.monotonic()
    wait_for(served(live, "b1", "b2"), what="a change written through a survivor")
    report("leader killed → write accepted by a survivor", written_at - killed_at)
    report("write accepted after the election → served", time.monotonic() - written_at)

    rec = running.recorder
    assert rec.snapshot() == survivor.dump(f"{P}/")
    assert len(rec.resets()) == 1
    assert rec.errors == []
    assert running.health.synced is True
