"""lbsync through etcd's own gRPC proxy (``etcd grpc-proxy start``), the fan-out layer for
many LB hosts (issue 5, "Many LB hosts"; docs/operations.md).

What is checked against a real etcd and a real proxy on loopback: the source reads and
watches through the proxy; the proxy coalesces the watches of several sources into one
watch on etcd; an idle watch through the proxy is kept although the proxy ignores
progress requests; a proxy restart, and an etcd restart behind the proxy, are resumed
from the last revision without losing an event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from lbsync.config import EtcdSettings
from lbsync.source import EtcdWriter
from tests.harness.etcd import EtcdGrpcProxy, EtcdServer, RunningSource, SourceRecorder
from tests.harness.net import wait_for

pytestmark = pytest.mark.integration

PREFIX = "/lbsync"
WATCHERS = "etcd_debugging_mvcc_watcher_total"


def settings_for(endpoint: str, **overrides: object) -> EtcdSettings:
    values: dict[str, object] = {"endpoints": [endpoint], "prefix": PREFIX, "timeout": 2.0}
    values.update(overrides)
    return EtcdSettings.model_validate(values)


def converged(etcd: EtcdServer, recorder: SourceRecorder) -> Callable[[], bool]:
    return lambda: recorder.snapshot() == etcd.dump(f"{PREFIX}/")


def lost(recorder: SourceRecorder) -> Callable[[], bool]:
    return lambda: any(not s.connected for s in recorder.statuses())


@pytest.fixture
def proxy(etcd: EtcdServer, tmp_path: Path) -> Iterator[EtcdGrpcProxy]:
    server = EtcdGrpcProxy(tmp_path / "grpc-proxy", [etcd.endpoint])
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def writer(etcd: EtcdServer) -> Iterator[EtcdWriter]:
    """Writes go to etcd directly, as registrations and health marks do."""
    with EtcdWriter(settings_for(etcd.endpoint)) as w:
        yield w


def test_source_reads_and_watches_through_the_proxy(
    etcd: EtcdServer,
    proxy: EtcdGrpcProxy,
    writer: EtcdWriter,
    run_source: Callable[..., RunningSource],
) -> None:
    for i in range(20):
        writer.put(f"{PREFIX}/services/web/instances/i{i:02}", f"10.0.0.{i}:80")
    running = run_source(settings_for(proxy.endpoint), page_size=7, page_bytes=1)  # paged
    rec = running.recorder
    wait_for(rec.connected, what="the watch through the proxy")
    assert len(rec.resets()[0].kvs) == 20
    writer.delete(f"{PREFIX}/services/web/instances/i00")
    writer.put(f"{PREFIX}/services/web/health/i01", "down")
    wait_for(converged(etcd, rec), what="events through the proxy")
    assert rec.statuses()[-1].endpoint == proxy.endpoint
    assert rec.errors == []


def test_watches_of_many_sources_are_coalesced_into_one_on_etcd(
    etcd: EtcdServer,
    proxy: EtcdGrpcProxy,
    writer: EtcdWriter,
    run_source: Callable[..., RunningSource],
) -> None:
    first = run_source(settings_for(proxy.endpoint))
    wait_for(first.recorder.connected, what="the first watch")
    with_one = etcd.metric(WATCHERS)
    others = [run_source(settings_for(proxy.endpoint)) for _ in range(4)]
    for running in others:
        wait_for(running.recorder.connected, what="another watch through the proxy")
    writer.put(f"{PREFIX}/k", "1")
    for running in [first, *others]:
        wait_for(converged(etcd, running.recorder), what="the event at every source")
    assert etcd.metric(WATCHERS) == with_one, "five sources, still one watch on etcd"


def test_an_idle_watch_through_the_proxy_is_kept(
    etcd: EtcdServer,
    proxy: EtcdGrpcProxy,
    writer: EtcdWriter,
    run_source: Callable[..., RunningSource],
) -> None:
    """The 3.4 proxy never answers progress requests: silence alone must not mean broken.

    lbsync notices that the stream has never answered one, checks the endpoint with a
    small read instead, and keeps the watch while reads succeed.
    """
    with structlog.testing.capture_logs() as logs:
        running = run_source(settings_for(proxy.endpoint, silence_deadline=0.5))
        rec = running.recorder
        wait_for(rec.connected, what="the watch through the proxy")
        wait_for(
            lambda: sum(e["event"] == "source.progress_unanswered" for e in logs) == 1,
            what="the silent stream to be checked with a read",
        )
        writer.put(f"{PREFIX}/after-silence", "1")
        wait_for(converged(etcd, rec), what="an event on the same watch")
    assert [s.connected for s in rec.statuses()] == [True], "never reconnected"


def test_proxy_restart_resumes_the_watch_without_losing_events(
    etcd: EtcdServer,
    proxy: EtcdGrpcProxy,
    writer: EtcdWriter,
    run_source: Callable[..., RunningSource],
) -> None:
    for i in range(5):
        writer.put(f"{PREFIX}/k{i}", "old")
    running = run_source(settings_for(proxy.endpoint))
    rec = running.recorder
    wait_for(converged(etcd, rec), what="the first convergence")

    proxy.kill()
    wait_for(lost(rec), what="the proxy's loss to be reported")
    writer.put(f"{PREFIX}/k0", "while the proxy was down")
    writer.delete(f"{PREFIX}/k1")
    proxy.start()  # same port: to lbsync, one endpoint that went away and came back
    writer.put(f"{PREFIX}/k9", "right after the restart")
    writer.delete(f"{PREFIX}/k2")

    wait_for(converged(etcd, rec), what="convergence after the proxy restart")
    wait_for(rec.connected, what="the watch to be re-established")
    assert len(rec.resets()) == 1, "a resume from the last revision, not a resync"
    assert rec.errors == [], "no event lost or repeated"


def test_etcd_restart_behind_the_proxy_is_resumed_without_losing_events(
    etcd: EtcdServer,
    proxy: EtcdGrpcProxy,
    run_source: Callable[..., RunningSource],
) -> None:
    with EtcdWriter(settings_for(etcd.endpoint)) as w:
        w.put(f"{PREFIX}/a", "1")
    running = run_source(settings_for(proxy.endpoint, silence_deadline=1.0))
    rec = running.recorder
    wait_for(converged(etcd, rec), what="the first convergence")

    etcd.kill()
    wait_for(lost(rec), what="etcd's loss to be noticed through the proxy")
    etcd.start()
    with EtcdWriter(settings_for(etcd.endpoint)) as w:
        w.put(f"{PREFIX}/b", "written right after the restart")
        w.delete(f"{PREFIX}/a")
    wait_for(converged(etcd, rec), timeout=30, what="convergence after etcd's restart")
    wait_for(rec.connected, what="the watch to be re-established")
    assert len(rec.resets()) == 1
    assert rec.errors == []
