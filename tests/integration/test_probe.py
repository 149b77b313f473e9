"""Issue 16 end to end: ``lbsync probe`` checks real backends, writes verdicts to a real
etcd, and the daemon takes failing instances out of a real nginx — and puts them back.

Short intervals (0.2 s, rise 2, fall 2); every wait polls for the expected state with the
harness's generous bound, never for a time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbsync.config import Settings
from lbsync.config_file import settings_from_dict
from lbsync.model import State
from lbsync.probe.run import Prober
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by, start_backend
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"
# A timeout well above the interval: the backends, the prober and the daemon share this
# process (and its GIL) on a loaded machine; a slow answer must not read as a failure.
CHECK = {"interval": "0.2s", "timeout": "1s", "rise": 2, "fall": 2, "path": "/healthz"}
SETTLE = 60.0  # seconds: the bound of every wait for a state (not a duration asserted)


def settle(probe: Callable[[], object], what: str) -> None:
    wait_for(probe, timeout=SETTLE, what=what)


def register(writer: EtcdWriter, service: str, backend: Backend) -> None:
    writer.put(f"{P}/services/{service}/instances/{backend.name}", f"127.0.0.1:{backend.port}")


def verdict_key(service: str, iid: str, prober: str) -> str:
    return f"{P}/services/{service}/probes/{iid}/{prober}"


def probe_settings(etcd: EtcdServer, **probe: object) -> Settings:
    data = {
        "etcd": {"endpoints": [etcd.endpoint], "prefix": P},
        "probe": {"check": CHECK, "lease_ttl": "3s", **probe},
    }
    return settings_from_dict(data, base_dir=Path("/"), source="test", targets_optional=True)


@pytest.fixture
def daemon(etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(settings_for(etcd, nginx_server, tmp_path / "state"))
    yield running
    running.stop()


@pytest.fixture
def run_prober(etcd: EtcdServer) -> Iterator[Callable[[str], threading.Event]]:
    """Start a Prober named ``name`` in a thread; every one is stopped at teardown."""
    started: list[tuple[threading.Event, threading.Thread]] = []

    def start(name: str) -> threading.Event:
        stop = threading.Event()
        prober = Prober(probe_settings(etcd), name)
        thread = threading.Thread(target=prober.run, args=(stop,), name=f"prober-{name}")
        thread.start()
        started.append((stop, thread))
        return stop

    yield start
    for stop, thread in started:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "prober did not stop"


def verdict(writer: EtcdWriter, service: str, iid: str, prober: str) -> str | None:
    raw = writer.get(verdict_key(service, iid, prober))
    return None if raw is None else str(json.loads(raw)["status"])


@pytest.mark.parametrize("failure", ["error", "reset", "hang"])
def test_a_failing_backend_is_taken_out_and_comes_back(
    failure: str,
    daemon: RunningDaemon,
    run_prober: Callable[[str], threading.Event],
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
) -> None:
    for backend in backends:
        register(writer, "app", backend)
    run_prober("lb-a")
    names = {b.name for b in backends}
    settle(lambda: all(verdict(writer, "app", n, "lb-a") == "up" for n in names), what="up")
    settle(lambda: only_served_by(nginx_server.port, names), what="all three served")

    backends[1].fail(failure)
    settle(lambda: verdict(writer, "app", "b2", "lb-a") == "down", what="b2 probed down")
    settle(lambda: only_served_by(nginx_server.port, {"b1", "b3"}), what="b2 out of nginx")
    raw = writer.get(verdict_key("app", "b2", "lb-a"))
    assert raw is not None
    assert json.loads(raw)["reason"]  # says why

    backends[1].fail(None)
    # A check already in flight when the backend recovered may still count one failure:
    # wait for the verdict, then for nginx, rather than reading either once.
    settle(lambda: verdict(writer, "app", "b2", "lb-a") == "up", what="b2 probed up")
    settle(lambda: only_served_by(nginx_server.port, names), what="b2 back in nginx")


def test_probers_disagreeing_change_nothing_and_two_of_three_take_it_out(
    daemon: RunningDaemon,
    run_prober: Callable[[str], threading.Event],
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
) -> None:
    for backend in backends:
        register(writer, "app", backend)
    run_prober("lb-a")
    settle(lambda: verdict(writer, "app", "b2", "lb-a") == "up", what="lb-a reporting")
    # Two more probers that see b2 from elsewhere, each under a lease of its own.
    up = json.dumps({"status": "up"})
    down = json.dumps({"status": "down", "reason": "timeout"})
    writer.put(verdict_key("app", "b2", "lb-b"), up, lease=writer.lease(30))
    backends[1].fail("error")  # lb-a sees it down, lb-b up: no majority of two
    settle(lambda: verdict(writer, "app", "b2", "lb-a") == "down", what="lb-a says down")
    settle(lambda: daemon.caught_up(writer), what="the daemon at etcd's revision")
    instance = daemon.daemon.catalog.snapshot().services["app"].instances[1]
    assert (instance.id, instance.state, sorted(instance.probes)) == (
        "b2",
        State.UP,
        ["lb-a", "lb-b"],
    )

    writer.put(verdict_key("app", "b2", "lb-c"), down, lease=writer.lease(30))
    settle(lambda: only_served_by(nginx_server.port, {"b1", "b3"}), what="2 of 3: b2 out")


def test_a_killed_probers_verdicts_expire_with_its_lease(
    daemon: RunningDaemon,
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    for backend in backends:
        register(writer, "app", backend)
    config = tmp_path / "probe.toml"
    config.write_text(
        f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nprefix = "{P}"\n'
        '[probe]\nname = "lb-k"\nlease_ttl = "3s"\n'
        '[probe.check]\ninterval = "0.2s"\ntimeout = "1s"\nrise = 2\nfall = 2\n'
    )
    backends[1].fail("error")
    argv = [sys.executable, "-m", "lbsync", "probe", "-c", str(config)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settle(lambda: verdict(writer, "app", "b2", "lb-k") == "down", what="b2 probed down")
        settle(lambda: only_served_by(nginx_server.port, {"b1", "b3"}), what="b2 out")
        proc.send_signal(signal.SIGKILL)  # no chance to revoke its lease
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    backends[1].fail(None)
    settle(lambda: verdict(writer, "app", "b2", "lb-k") is None, what="the lease to expire")
    settle(
        lambda: only_served_by(nginx_server.port, {"b1", "b2", "b3"}), what="b2 back after expiry"
    )


def test_a_prober_whose_checks_all_fail_trips_the_panic_threshold_of_that_service_only(
    daemon: RunningDaemon,
    run_prober: Callable[[str], threading.Event],
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
) -> None:
    others = [start_backend(f"o{i}") for i in (1, 2, 3)]
    try:
        for backend in backends:
            register(writer, "app", backend)
        for backend in others:
            register(writer, "api", backend)
        others[0].fail("error")
        run_prober("lb-a")
        settle(lambda: verdict(writer, "api", "o1", "lb-a") == "down", what="o1 probed down")
        for backend in backends:  # the prober loses every app backend at once
            backend.fail("reset")
        names = ("b1", "b2", "b3")
        settle(
            lambda: all(verdict(writer, "app", n, "lb-a") == "down" for n in names),
            what="all of app probed down",
        )
        settle(lambda: daemon.daemon.status_document()["probe_panic"] == ["app"], what="panic")
        snapshot = daemon.daemon.catalog.snapshot()
        assert all(i.up for i in snapshot.services["app"].instances)
        assert [i.state for i in snapshot.services["api"].instances] == [
            State.DOWN,
            State.UP,
            State.UP,
        ]
        for backend in backends:
            backend.fail(None)
        settle(lambda: only_served_by(nginx_server.port, set(names)), what="app served")
        settle(lambda: daemon.daemon.status_document()["probe_panic"] == [], what="panic over")
    finally:
        for backend in others:
            backend.stop()


@pytest.mark.parametrize(
    "value",
    [
        '{"status": "down", "reason": "x\\nserver 10.0.0.1:1;"}',
        '{"status": "drain"}',
        '{"status": "down", "since": 1e400}',
        "down",
    ],
)
def test_a_hostile_verdict_is_rejected_and_changes_nothing(
    value: str,
    daemon: RunningDaemon,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
) -> None:
    for backend in backends:
        register(writer, "app", backend)
    settle(lambda: only_served_by(nginx_server.port, {"b1", "b2", "b3"}), what="all served")
    key = verdict_key("app", "b2", "evil")
    writer.put(key, value)
    settle(lambda: key in daemon.daemon.catalog.rejected, what="the verdict rejected")
    settle(lambda: daemon.caught_up(writer), what="the daemon at etcd's revision")
    # The first served config came with a reload: its old worker (the harness's initial
    # config, no upstream "app") may still take a connection until it exits.
    settle(nginx_server.settled, what="nginx's old workers gone")
    assert only_served_by(nginx_server.port, {"b1", "b2", "b3"})
    assert daemon.daemon.catalog.snapshot().services["app"].instances[1].probes == {}
