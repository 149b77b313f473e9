"""The source's transport choice (``[etcd] transport``) against a real etcd and a real
etcd gRPC proxy: the JSON gateway never loads gRPC, ``auto`` falls back to gRPC where the
gateway is not served, and ``http`` there keeps failing instead of switching."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from lbsync.config import EtcdSettings
from lbsync.model import SourceStatus
from tests.harness.etcd import EtcdGrpcProxy, EtcdServer, RunningSource
from tests.harness.net import wait_for

pytestmark = pytest.mark.integration

PREFIX = "/lbsync"
GRPC_PACKAGES = {"grpc", "pyetcd", "google"}

# Imports the daemon, then reads and watches until one event arrives; prints the
# top-level packages loaded by then.
_WATCH_AND_LIST_MODULES = """
import json, sys, threading
import lbsync.daemon
from lbsync.config import EtcdSettings
from lbsync.model import SourceEvents
from lbsync.source.etcd import EtcdSource

endpoint, transport = sys.argv[1:]
settings = EtcdSettings(endpoints=[endpoint], prefix="/lbsync", transport=transport)
source, stop, got = EtcdSource(settings), threading.Event(), threading.Event()
def emit(message):
    if isinstance(message, SourceEvents):
        got.set()
thread = threading.Thread(target=source.run, args=(emit, stop), daemon=True)
thread.start()
print("watching", flush=True)
if not got.wait(60):
    sys.exit("no event within 60 s")
stop.set()
source.interrupt()
thread.join(15)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})), flush=True)
"""


def _packages_while_watching(etcd: EtcdServer, transport: str) -> set[str]:
    with subprocess.Popen(
        [sys.executable, "-c", _WATCH_AND_LIST_MODULES, etcd.endpoint, transport],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "watching"
            # The watch may not be open yet: put until one event is seen (bounded).
            for attempt in range(100):
                etcd.etcdctl("put", f"{PREFIX}/k", str(attempt))
                if child.poll() is not None:
                    break
                try:
                    child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
            out, _ = child.communicate(timeout=30)
        finally:
            child.kill()
    assert child.returncode == 0, out
    return set(json.loads(out.strip().splitlines()[-1]))


def test_a_daemon_source_on_the_gateway_never_loads_grpc(etcd: EtcdServer) -> None:
    assert _packages_while_watching(etcd, "http") & GRPC_PACKAGES == set()


def test_the_grpc_transport_does_load_grpc(etcd: EtcdServer) -> None:
    """The control for the test above: the check sees gRPC when it is there."""
    assert {"grpc", "pyetcd"} <= _packages_while_watching(etcd, "grpc")


@pytest.fixture
def proxy(etcd: EtcdServer, tmp_path: Path) -> Iterator[EtcdGrpcProxy]:
    server = EtcdGrpcProxy(tmp_path / "grpc-proxy", [etcd.endpoint])
    try:
        server.start()
        yield server
    finally:
        server.kill()


def _settings(endpoint: str, transport: str) -> EtcdSettings:
    return EtcdSettings(endpoints=[endpoint], prefix=PREFIX, timeout=2.0, transport=transport)


def test_auto_falls_back_to_grpc_on_a_grpc_proxy_and_says_why(
    etcd: EtcdServer, proxy: EtcdGrpcProxy, run_source: Callable[..., RunningSource]
) -> None:
    with structlog.testing.capture_logs() as logs:
        running = run_source(_settings(proxy.endpoint, "auto"))
        wait_for(running.recorder.connected, what="the watch through the proxy")
    chosen = [e for e in logs if e["event"] == "source.transport"]
    assert len(chosen) == 1, chosen
    assert chosen[0]["transport"] == "grpc"
    assert "does not serve the JSON gateway" in chosen[0]["reason"]
    assert "404" in chosen[0]["reason"]


def test_http_on_a_grpc_proxy_keeps_failing_and_never_switches(
    etcd: EtcdServer, proxy: EtcdGrpcProxy, run_source: Callable[..., RunningSource]
) -> None:
    running = run_source(_settings(proxy.endpoint, "http"))
    rec = running.recorder
    wait_for(lambda: len(rec.statuses()) >= 2, what="two refused attempts")
    assert rec.resets() == []
    statuses: list[SourceStatus] = rec.statuses()
    assert all(not s.connected and "no JSON gateway" in (s.error or "") for s in statuses)


def test_auto_uses_the_gateway_on_etcd_and_says_so(
    etcd: EtcdServer, run_source: Callable[..., RunningSource]
) -> None:
    with structlog.testing.capture_logs() as logs:
        running = run_source(_settings(etcd.endpoint, "auto"))
        wait_for(running.recorder.connected, what="the watch")
    chosen = [e for e in logs if e["event"] == "source.transport"]
    assert [(e["transport"], e["endpoint"]) for e in chosen] == [("http", etcd.endpoint)]
    # the first read (over gRPC) does not wait for the gateway: the watch connects it
    events = [e["event"] for e in logs]
    assert events.index("source.read") < events.index("source.transport"), events
