"""EtcdSource and EtcdWriter against a real etcd: reads, watch, reconnect, resync, silence."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from lbsync.config import EtcdSettings
from lbsync.errors import LeaseExpired, SourceError
from lbsync.model import SourceEvents, SourceReset, SourceStatus
from lbsync.source import EtcdSource, EtcdWriter
from tests.harness.etcd import (
    EtcdCluster,
    EtcdServer,
    RunningSource,
    SourceRecorder,
    TcpProxy,
)
from tests.harness.net import wait_for

pytestmark = pytest.mark.integration

PREFIX = "/lbsync"


def settings_for(endpoint: str, **overrides: object) -> EtcdSettings:
    values: dict[str, object] = {"endpoints": [endpoint], "prefix": PREFIX, "timeout": 5.0}
    values.update(overrides)
    return EtcdSettings.model_validate(values)


@pytest.fixture
def writer(etcd: EtcdServer) -> Iterator[EtcdWriter]:
    with EtcdWriter(settings_for(etcd.endpoint)) as w:
        yield w


def converged(etcd: EtcdServer, recorder: SourceRecorder) -> Callable[[], bool]:
    """A probe: the recorder's folded state equals what etcd holds under the prefix."""

    def probe() -> bool:
        return recorder.snapshot() == etcd.dump(f"{PREFIX}/")

    return probe


def lost(recorder: SourceRecorder, containing: str = "") -> Callable[[], bool]:
    def probe() -> bool:
        return any(not s.connected and containing in (s.error or "") for s in recorder.statuses())

    return probe


# --- read_all --------------------------------------------------------------------------


def test_read_all_returns_exactly_the_keys_under_the_prefix_across_pages(
    etcd: EtcdServer, writer: EtcdWriter
) -> None:
    expected = {f"{PREFIX}/services/s{i % 3}/instances/i{i:02}": f"v{i}" for i in range(25)}
    for key, value in expected.items():
        writer.put(key, value)
    writer.put(f"{PREFIX}-other/x", "outside")  # shares the prefix's characters, not its tree
    writer.put("/elsewhere", "outside")
    etcd.etcdctl("put", f"{PREFIX}/\udcff".encode(errors="surrogateescape"), "bad key")

    source = EtcdSource(settings_for(etcd.endpoint), page_size=4, page_bytes=1)  # 4 a page
    try:
        reset = source.read_all()
    finally:
        source.close()

    assert {kv.key: kv.value for kv in reset.kvs} == {k: v.encode() for k, v in expected.items()}
    assert [kv.key for kv in reset.kvs] == sorted(expected)
    assert reset.revision == writer.revision()
    last = max(kv.mod_revision for kv in reset.kvs)
    assert 0 < last < reset.revision


@pytest.mark.parametrize(
    "page_bytes",
    [pytest.param(1, id="pages-of-2"), pytest.param(400, id="pages-growing-by-bytes")],
)
def test_read_all_pages_are_pinned_to_one_revision_under_concurrent_writes(
    etcd: EtcdServer, writer: EtcdWriter, page_bytes: int
) -> None:
    for i in range(30):
        writer.put(f"{PREFIX}/k{i:02}", "initial")
    stop = threading.Event()

    def churn() -> None:
        with EtcdWriter(settings_for(etcd.endpoint)) as w:
            n = 0
            while not stop.is_set():
                w.put(f"{PREFIX}/k{n % 30:02}", f"churn{n}")
                w.put(f"{PREFIX}/new{n:04}", "x")
                n += 1

    thread = threading.Thread(target=churn)
    thread.start()
    source = EtcdSource(settings_for(etcd.endpoint), page_size=2, page_bytes=page_bytes)
    try:
        wait_for(lambda: writer.revision() > 60, what="churn to start")
        resets = [source.read_all() for _ in range(3)]
    finally:
        stop.set()
        thread.join(timeout=30)
        source.close()

    for reset in resets:
        at_revision = etcd.dump_at(f"{PREFIX}/", reset.revision)
        assert {kv.key: kv.value for kv in reset.kvs} == at_revision


def test_read_all_of_an_empty_prefix(etcd: EtcdServer) -> None:
    source = EtcdSource(settings_for(etcd.endpoint))
    try:
        reset = source.read_all()
    finally:
        source.close()
    assert reset.kvs == ()
    assert reset.revision >= 1


def test_read_all_with_etcd_down_raises_source_unavailable_naming_the_endpoint(
    etcd: EtcdServer,
) -> None:
    etcd.stop()
    source = EtcdSource(settings_for(etcd.endpoint, timeout=2.0))
    try:
        with pytest.raises(SourceError, match=f"{etcd.endpoint}"):
            source.read_all()
    finally:
        source.close()


# --- run: the watch --------------------------------------------------------------------


def test_run_emits_a_reset_then_connected_then_events_in_order(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource]
) -> None:
    writer.put(f"{PREFIX}/before", "1")
    running = run_source(settings_for(etcd.endpoint))
    rec = running.recorder
    wait_for(rec.connected, what="the watch to be established")

    key = f"{PREFIX}/services/web/instances/a"
    ops = [("put", key, b"1"), ("put", key, b"2"), ("delete", key, b""), ("put", key, b"3")]
    ops += [
        ("put", f"{PREFIX}/services/web/instances/b", b"x"),
        ("delete", f"{PREFIX}/before", b""),
    ]
    for kind, k, value in ops:
        if kind == "put":
            writer.put(k, value)
        else:
            assert writer.delete(k)
    writer.put(f"{PREFIX}-other/ignored", "outside the prefix")
    writer.put(f"{PREFIX}/last", "marker")
    ops.append(("put", f"{PREFIX}/last", b"marker"))

    wait_for(lambda: rec.snapshot().get(f"{PREFIX}/last") == b"marker", what="the marker")
    seen = [
        (e.kind, e.key, e.value)
        for m in rec.of_type(SourceEvents)
        if isinstance(m, SourceEvents)
        for e in m.events
    ]
    assert seen == ops
    assert rec.snapshot() == etcd.dump(f"{PREFIX}/")
    first, second = rec.messages[:2]
    assert isinstance(first, SourceReset)
    assert [kv.key for kv in first.kvs] == [f"{PREFIX}/before"]
    assert isinstance(second, SourceStatus)
    assert second.connected
    assert second.endpoint == etcd.endpoint
    assert second.revision == first.revision
    assert rec.errors == []


def test_lease_expiry_and_revocation_arrive_as_deletes(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource]
) -> None:
    running = run_source(settings_for(etcd.endpoint))
    rec = running.recorder
    wait_for(rec.connected, what="the watch to be established")

    expiring = writer.lease(1)
    revoked = writer.lease(30)
    assert revoked.refresh() > 0
    writer.put(f"{PREFIX}/expiring", "1", lease=expiring)
    writer.put(f"{PREFIX}/revoked", "1", lease=revoked)
    writer.put(f"{PREFIX}/ttl", "1", ttl=1)
    wait_for(lambda: len(rec.snapshot()) == 3, what="the three leased keys")

    revoked.revoke()
    wait_for(lambda: rec.snapshot() == {}, timeout=30, what="every leased key to be deleted")
    deletes = {
        e.key
        for m in rec.of_type(SourceEvents)
        if isinstance(m, SourceEvents)
        for e in m.events
        if e.kind == "delete"
    }
    assert deletes == {f"{PREFIX}/expiring", f"{PREFIX}/revoked", f"{PREFIX}/ttl"}
    with pytest.raises(LeaseExpired, match="expired"):
        expiring.refresh()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_kill_and_restart_resumes_without_losing_an_event(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource], transport: str
) -> None:
    for i in range(10):
        writer.put(f"{PREFIX}/k{i}", f"v{i}")
    running = run_source(settings_for(etcd.endpoint, transport=transport))
    rec = running.recorder
    wait_for(rec.connected, what="the watch to be established")
    for i in range(10, 20):
        writer.put(f"{PREFIX}/k{i}", f"v{i}")
    wait_for(converged(etcd, rec), what="the first convergence")

    etcd.kill()
    wait_for(lost(rec), what="the loss to be reported")
    etcd.start()
    # Written as soon as etcd is back, racing the source's reconnect: whichever wins,
    # every event must arrive exactly once.
    for i in range(0, 20, 2):
        assert writer.delete(f"{PREFIX}/k{i}")
    for i in range(20, 30):
        writer.put(f"{PREFIX}/k{i}", f"v{i}")
    wait_for(converged(etcd, rec), what="convergence after the restart")

    assert len(rec.resets()) == 1, "a resume must not re-read the prefix"
    assert rec.errors == []
    assert rec.connected()


def test_events_missed_while_cut_off_are_replayed_on_resume(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource]
) -> None:
    proxy = TcpProxy(etcd.client_port)
    try:
        running = run_source(settings_for(proxy.endpoint))
        rec = running.recorder
        writer.put(f"{PREFIX}/a", "1")
        wait_for(converged(etcd, rec), what="the first convergence")

        proxy.block()
        wait_for(lost(rec), what="the loss to be reported")
        writer.put(f"{PREFIX}/a", "2")
        writer.put(f"{PREFIX}/b", "1")
        writer.delete(f"{PREFIX}/a")
        proxy.unblock()

        wait_for(converged(etcd, rec), what="convergence after the cut")
        assert len(rec.resets()) == 1
        missed = [
            (e.kind, e.key, e.value)
            for m in rec.of_type(SourceEvents)
            if isinstance(m, SourceEvents)
            for e in m.events
        ][-3:]
        assert missed == [
            ("put", f"{PREFIX}/a", b"2"),
            ("put", f"{PREFIX}/b", b"1"),
            ("delete", f"{PREFIX}/a", b""),
        ]
        assert rec.errors == []
    finally:
        proxy.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_compaction_while_disconnected_brings_a_fresh_reset(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource], transport: str
) -> None:
    proxy = TcpProxy(etcd.client_port)
    try:
        for i in range(5):
            writer.put(f"{PREFIX}/k{i}", "old")
        running = run_source(settings_for(proxy.endpoint, transport=transport))
        rec = running.recorder
        wait_for(converged(etcd, rec), what="the first convergence")

        proxy.block()
        wait_for(lost(rec), what="the loss to be reported")
        writer.delete(f"{PREFIX}/k0")
        writer.put(f"{PREFIX}/k1", "new")
        writer.put(f"{PREFIX}/k9", "new")
        compacted_at = writer.put("/elsewhere/bump", "x")
        writer.compact(compacted_at)
        proxy.unblock()

        wait_for(lambda: len(rec.resets()) == 2, what="a second reset")
        wait_for(converged(etcd, rec), what="convergence after the resync")
        assert rec.resets()[-1].revision >= compacted_at
        writer.put(f"{PREFIX}/after", "1")
        wait_for(converged(etcd, rec), what="the watch to go on after the resync")
        assert rec.connected()
    finally:
        proxy.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_stalled_server_is_detected_as_silent_and_recovered(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource], transport: str
) -> None:
    running = run_source(
        settings_for(etcd.endpoint, transport=transport, silence_deadline=1.5, timeout=2.0)
    )
    rec = running.recorder
    writer.put(f"{PREFIX}/a", "1")
    wait_for(converged(etcd, rec), what="the first convergence")

    etcd.pause()
    try:
        wait_for(lost(rec, "silent"), what="the silent stream to be reported")
    finally:
        etcd.resume()
    writer.put(f"{PREFIX}/b", "2")
    wait_for(converged(etcd, rec), what="convergence after SIGCONT")
    wait_for(rec.connected, what="the watch to be re-established")
    assert len(rec.resets()) == 1
    assert rec.errors == []


def test_etcd_down_at_start_reports_unavailable_and_never_an_empty_reset(
    etcd: EtcdServer, writer: EtcdWriter, run_source: Callable[..., RunningSource]
) -> None:
    writer.put(f"{PREFIX}/a", "1")
    etcd.stop()
    running = run_source(settings_for(etcd.endpoint, timeout=2.0))
    rec = running.recorder
    wait_for(lambda: len(rec.statuses()) >= 3, what="three failed attempts")
    assert rec.resets() == []
    assert all(not s.connected and etcd.endpoint in (s.error or "") for s in rec.statuses())

    etcd.start()
    wait_for(rec.resets, what="a reset once etcd is up")
    assert {kv.key for kv in rec.resets()[0].kvs} == {f"{PREFIX}/a"}
    wait_for(rec.connected, what="the watch to be established")
    writer.put(f"{PREFIX}/b", "2")
    wait_for(converged(etcd, rec), what="convergence")


def test_stop_returns_within_the_call_timeout_when_a_read_hangs(etcd: EtcdServer) -> None:
    """A hung call is never cut short from another thread (gRPC crashes if a channel is
    closed under a stub being created); it runs out its timeout, and then run() returns
    instead of retrying."""
    etcd.pause()
    try:
        source = EtcdSource(settings_for(etcd.endpoint, timeout=2.0))
        entered = threading.Event()
        real_read_all = source.read_all

        def read_all() -> SourceReset:
            entered.set()
            return real_read_all()

        source.read_all = read_all  # type: ignore[method-assign]
        rec, stop = SourceRecorder(), threading.Event()
        thread = threading.Thread(target=source.run, args=(rec, stop))
        thread.start()
        try:
            wait_for(entered.is_set, what="run() to start its first read")
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive(), "run() kept going after stop and a timed-out read"
        assert rec.resets() == []
        source.close()
    finally:
        etcd.resume()


# --- the writer ------------------------------------------------------------------------


def test_writer_put_get_delete_and_revisions(etcd: EtcdServer, writer: EtcdWriter) -> None:
    start = writer.revision()
    rev1 = writer.put(f"{PREFIX}/x", "1")
    rev2 = writer.put(f"{PREFIX}/x", b"\x00\xff")
    assert start < rev1 < rev2 == writer.revision()
    assert writer.get(f"{PREFIX}/x") == b"\x00\xff"
    assert etcd.dump(f"{PREFIX}/") == {f"{PREFIX}/x": b"\x00\xff"}
    assert writer.delete(f"{PREFIX}/x") is True
    assert writer.delete(f"{PREFIX}/x") is False
    assert writer.get(f"{PREFIX}/x") is None


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_losing_the_member_in_use_fails_over_to_another(
    etcd_cluster: EtcdCluster, run_source: Callable[..., RunningSource], transport: str
) -> None:
    settings = settings_for(etcd_cluster.endpoints[0], transport=transport, timeout=2.0)
    settings = settings.model_copy(update={"endpoints": etcd_cluster.endpoints})
    running = run_source(settings)
    rec = running.recorder
    wait_for(rec.connected, what="the watch to be established")
    in_use = rec.statuses()[-1].endpoint
    victim = next(m for m in etcd_cluster.members if m.endpoint == in_use)
    survivor = next(m for m in etcd_cluster.members if m is not victim)

    victim.kill()
    wait_for(lost(rec), what="the loss to be reported")
    with EtcdWriter(settings_for(survivor.endpoint, timeout=2.0)) as writer:

        def put_once() -> bool:
            try:
                writer.put(f"{PREFIX}/after-failover", "1")
            except SourceError:
                return False  # an election may be under way
            return True

        wait_for(put_once, what="a write to the surviving members")
    wait_for(converged(survivor, rec), what="convergence through another member")
    assert rec.statuses()[-1].endpoint != in_use
    assert len(rec.resets()) == 1


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_stop_wakes_a_watch_waiting_for_its_silence_deadline(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """The watch waits in long slices (here 10 minutes, until its silence deadline); the
    runner's stop interrupts that wait instead of waiting for the slice's end."""
    import time

    from lbsync.source import grpc_session
    from lbsync.source.runner import SourceRunner

    monkeypatch.setattr(grpc_session, "_LONGEST_WAIT", 600.0)  # on gRPC; the gateway has none

    source = EtcdSource(settings_for(etcd.endpoint, transport=transport, silence_deadline=600.0))
    runner = SourceRunner(source)
    runner.start()
    try:
        wait_for(
            lambda: any(isinstance(m, SourceStatus) and m.connected for m in runner.messages(0.1)),
            what="the watch to be established",
        )
        wait_for(lambda: source._watch_open is not None, what="the watch being consumed")
    finally:
        started = time.monotonic()
        runner.stop(timeout=30)
    assert not runner._thread.is_alive()
    assert time.monotonic() - started < 20, "stopped by the interrupt, not at the slice's end"
