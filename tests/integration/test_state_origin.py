"""State that knows its cluster, against real etcd (and nginx): a resumed watch on an etcd
whose history is not the one followed resyncs; another cluster's saved catalog is never
rendered; a second daemon on one state_dir exits 1 and touches nothing.

"Another etcd" is a second etcd started on the first one's client port with a fresh data
dir: with the same member name, peer URL and cluster token it even has the same cluster
id (etcd derives it from those), like a member restored from an older snapshot; with
another peer port it is another cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbsync.config import EtcdSettings
from lbsync.daemon import Daemon
from lbsync.model import Snapshot
from lbsync.outcome import Outcome
from lbsync.source import EtcdWriter
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer, RunningSource, TcpProxy
from tests.harness.net import free_port, wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import config_file, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"


def etcd_settings(endpoint: str) -> EtcdSettings:
    return EtcdSettings.model_validate({"endpoints": [endpoint], "prefix": P, "timeout": 5.0})


def put_all(endpoint: str, keys: dict[str, str]) -> int:
    with EtcdWriter(etcd_settings(endpoint)) as writer:
        revision = 0
        for name, value in keys.items():
            revision = writer.put(name, value)
        return revision


@pytest.fixture
def replacements(tmp_path: Path) -> Iterator[Callable[..., EtcdServer]]:
    """Start a fresh etcd on a given client port; every one killed at teardown."""
    started: list[EtcdServer] = []

    def start(client_port: int, *, peer_port: int | None = None) -> EtcdServer:
        server = EtcdServer(
            tmp_path / f"etcd-{len(started) + 1}", client_port=client_port, peer_port=peer_port
        )
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.kill()


def many(prefix: str, count: int) -> dict[str, str]:
    return {f"{P}/{prefix}{k}": str(k) for k in range(count)}


# --- the source: a resumed watch checks the history it resumes -------------------------


def test_a_watch_resumed_on_an_etcd_whose_revision_went_back_resyncs(
    etcd: EtcdServer,
    replacements: Callable[..., EtcdServer],
    run_source: Callable[..., RunningSource],
) -> None:
    put_all(etcd.endpoint, many("old", 30))
    running = run_source(etcd_settings(etcd.endpoint))
    rec = running.recorder
    wait_for(lambda: rec.snapshot() == etcd.dump(f"{P}/"), what="the first convergence")
    old_revision = rec.resets()[0].revision

    etcd.kill()
    restored = replacements(etcd.client_port, peer_port=etcd.peer_port)
    put_all(restored.endpoint, {f"{P}/new": "1"})

    wait_for(lambda: rec.snapshot() == restored.dump(f"{P}/"), what="a full resync")
    last = rec.resets()[-1]
    assert last.revision < old_revision
    assert last.cluster_id == rec.resets()[0].cluster_id != 0  # same id: the revision decided
    put_all(restored.endpoint, {f"{P}/after": "2"})
    wait_for(lambda: rec.snapshot() == restored.dump(f"{P}/"), what="the watch to go on")
    assert rec.errors == []


def test_a_watch_resumed_on_another_cluster_resyncs_even_when_it_is_ahead(
    etcd: EtcdServer,
    replacements: Callable[..., EtcdServer],
    run_source: Callable[..., RunningSource],
) -> None:
    put_all(etcd.endpoint, many("old", 3))
    proxy = TcpProxy(etcd.client_port)
    try:
        running = run_source(etcd_settings(proxy.endpoint))
        rec = running.recorder
        wait_for(lambda: rec.snapshot() == etcd.dump(f"{P}/"), what="the first convergence")

        proxy.block()
        wait_for(lambda: not rec.connected(), what="the loss to be reported")
        etcd.kill()
        other = replacements(etcd.client_port, peer_port=free_port())
        ahead = put_all(other.endpoint, many("new", 20))
        assert ahead > rec.resets()[0].revision
        proxy.unblock()

        wait_for(lambda: rec.snapshot() == other.dump(f"{P}/"), what="a full resync")
        assert rec.resets()[-1].cluster_id not in (0, rec.resets()[0].cluster_id)
    finally:
        proxy.close()


def test_the_daemon_follows_an_etcd_restored_behind_its_endpoint_to_an_older_revision(
    etcd: EtcdServer,
    replacements: Callable[..., EtcdServer],
    nginx_server: NginxServer,
    tmp_path: Path,
) -> None:
    settings = settings_for(etcd, nginx_server, tmp_path / "state")
    dest = nginx_server.conf_d / "upstreams.conf"
    served = {key("app", "instances", "a"): "127.0.0.1:19300"}
    put_all(etcd.endpoint, {**served, **many("churn", 30)})
    running = RunningDaemon(settings)
    try:
        wait_for(lambda: b"127.0.0.1:19300" in dest.read_bytes(), what="the first round")
        before = running.daemon.catalog.revision

        etcd.kill()
        restored = replacements(etcd.client_port, peer_port=etcd.peer_port)
        revision = put_all(
            restored.endpoint, {**served, key("app", "instances", "b"): "127.0.0.1:19301"}
        )
        assert revision < before

        wait_for(lambda: b"127.0.0.1:19301" in dest.read_bytes(), what="the restored etcd served")
        wait_for(lambda: running.daemon.catalog.revision == revision, what="the catalog resynced")
        assert dict(running.daemon.catalog.snapshot().keys) == {
            k.removeprefix(P): v.decode() for k, v in restored.dump(f"{P}/").items()
        }
    finally:
        running.stop()


# --- the daemon: etcd first, another cluster's catalog never rendered --------------------


class RenderRecorder:
    """Wraps every pipeline's apply to keep the dest file's bytes after each round."""

    def __init__(self, daemon: Daemon, dest: Path) -> None:
        self.after_rounds: list[bytes] = []
        for pipeline in daemon.pipelines:
            pipeline.apply = self._recording(pipeline.apply, dest)  # type: ignore[method-assign]

    def _recording(
        self, apply: Callable[[Snapshot], Outcome], dest: Path
    ) -> Callable[[Snapshot], Outcome]:
        def recorded(snapshot: Snapshot) -> Outcome:
            outcome = apply(snapshot)
            self.after_rounds.append(dest.read_bytes())
            return outcome

        return recorded


def test_another_clusters_saved_catalog_is_never_rendered(
    etcd: EtcdServer,
    replacements: Callable[..., EtcdServer],
    nginx_server: NginxServer,
    tmp_path: Path,
) -> None:
    settings = settings_for(etcd, nginx_server, tmp_path / "state")
    dest = nginx_server.conf_d / "upstreams.conf"
    old = {key("app", "instances", f"old{k}"): f"127.0.0.1:{19000 + k}" for k in range(3)}
    put_all(etcd.endpoint, old)
    first = RunningDaemon(settings)
    try:
        wait_for(lambda: b"127.0.0.1:19002" in dest.read_bytes(), what="the old cluster served")
    finally:
        first.stop()  # saves the catalog on the way out
    assert b"19000" in (settings.state_dir / "last-applied.json").read_bytes()

    etcd.kill()
    fresh = replacements(etcd.client_port, peer_port=free_port())  # same endpoint
    put_all(fresh.endpoint, {key("app", "instances", "new0"): "127.0.0.1:19100"})
    daemon = Daemon(settings)
    rounds = RenderRecorder(daemon, dest)
    started = time.monotonic()
    second = RunningDaemon(daemon)
    try:
        wait_for(lambda: b"127.0.0.1:19100" in dest.read_bytes(), what="the new cluster served")
        # printed, not asserted (run with -s): a benchmark number, not a pass/fail criterion
        print(f"new cluster served {time.monotonic() - started:.3f}s after start")
        wait_for(
            lambda: b"19100" in (settings.state_dir / "last-applied.json").read_bytes(),
            what="the new cluster's catalog saved",
        )
    finally:
        second.stop()
    assert rounds.after_rounds, "no round ran"
    for content in rounds.after_rounds:
        assert b"127.0.0.1:190" not in content.replace(b"127.0.0.1:19100", b"")


def test_a_second_daemon_on_the_state_dir_exits_1_in_one_line_and_touches_nothing(
    etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path
) -> None:
    settings = settings_for(etcd, nginx_server, tmp_path / "state")
    config = config_file(settings, tmp_path / "lbsync.toml")
    put_all(etcd.endpoint, {key("app", "instances", "a"): "127.0.0.1:19200"})
    dest = nginx_server.conf_d / "upstreams.conf"
    first = RunningDaemon(Daemon(settings, config_path=config))
    try:
        wait_for(lambda: b"127.0.0.1:19200" in dest.read_bytes(), what="the first daemon's round")
        saved = settings.state_dir / "last-applied.json"
        wait_for(saved.exists, what="the first daemon's save")  # then it is quiet
        before = _tree(settings.state_dir), _tree(nginx_server.conf_d)

        second = subprocess.run(
            [sys.executable, "-m", "lbsync", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert second.returncode == 1
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"lbsync pid {os.getpid()} (config {config})" in second.stderr
        assert (_tree(settings.state_dir), _tree(nginx_server.conf_d)) == before
        assert first.thread.is_alive()
    finally:
        first.stop()


def _tree(path: Path) -> dict[str, tuple[int, int, bytes]]:
    found = {}
    for item in sorted(path.rglob("*")):
        if item.is_file() and not item.is_symlink():
            info = item.stat()
            found[str(item)] = (info.st_ino, info.st_mtime_ns, item.read_bytes())
    return found
