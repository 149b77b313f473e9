"""Issue 3 end to end: real etcd → the lbsync daemon → a real HAProxy master-worker (and a
real nginx beside it) → real backends, on loopback.

HAProxy starts on the stock template rendered with each service's ``listen`` setting and
no instances (an operator's first deploy); from then on only the daemon changes it.
"No reload" is checked three ways: every round's outcome is ``runtime``, ``show proc``
reports the same master and workers, and the master logged no further ``Loading success.``
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbsync.config import Settings
from lbsync.config_file import settings_from_dict
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.drivers.haproxy.state import config_servers
from lbsync.model import Service, Snapshot
from lbsync.render import Renderer
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.haproxy import TEMPLATE, HaproxyServer
from tests.harness.net import free_port, wait_for
from tests.harness.nginx import NginxServer

pytestmark = pytest.mark.integration

P = "/lbsync"
HAPROXY = "haproxy-test"
NGINX = "nginx-test"


def key(service: str, kind: str, iid: str) -> str:
    return f"{P}/services/{service}/{kind}/{iid}"


def registration(backend: Backend, weight: int = 1, state: str = "up") -> str:
    return json.dumps({"host": "127.0.0.1", "port": backend.port, "weight": weight, "state": state})


def listen(port: int, **extra: object) -> str:
    return json.dumps({"listen": f"127.0.0.1:{port}", **extra})


def settings_for(etcd: EtcdServer, state_dir: Path, *targets: Any) -> Settings:
    data = {
        "etcd": {"endpoints": [etcd.endpoint], "prefix": P},
        "wait": {"min": "0s", "max": "0s"},
        "state_dir": str(state_dir),
        "target": [t.model_dump(by_alias=True, mode="json") for t in targets],
    }
    return settings_from_dict(data, base_dir=state_dir, source="test")


def bootstrap(haproxy: HaproxyServer, services: dict[str, int]) -> None:
    """Start HAProxy on the stock template: each service's frontend, no instances yet."""
    snapshot = Snapshot(
        revision=0,
        services={
            name: Service(name=name, settings={"listen": f"127.0.0.1:{port}"})
            for name, port in services.items()
        },
    )
    driver = HaproxyDriver(haproxy.target())
    haproxy.config.write_bytes(
        Renderer().render(TEMPLATE, snapshot, driver.template_context(snapshot))
    )
    haproxy.start()


@pytest.fixture
def web(haproxy: HaproxyServer, writer: EtcdWriter) -> HaproxyServer:
    """HAProxy serving the ``web`` service's frontend on ``haproxy.port`` (no instances)."""
    writer.put(f"{P}/services/web/settings", listen(haproxy.port))
    bootstrap(haproxy, {"web": haproxy.port})
    return haproxy


@pytest.fixture
def daemon(etcd: EtcdServer, web: HaproxyServer, tmp_path: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(settings_for(etcd, tmp_path / "state", web.target()))
    try:
        wait_for(lambda: running.latest() is not None, what="the first round")
        yield running
    finally:
        running.stop()


def generation(haproxy: HaproxyServer) -> tuple[int, tuple[int, ...], int]:
    """(master pid, worker pids, successful loads): equal before/after = no reload."""
    proc = haproxy.show_proc()
    return proc.master_pid, proc.pids, haproxy.loads()


def runtime_agrees_with_config(haproxy: HaproxyServer, backend: str) -> bool:
    """Every server HAProxy runs is what the config on disk says (a restart would agree)."""
    configured = config_servers(haproxy.config.read_text())[backend]
    running = haproxy.servers(backend)
    return set(running) == set(configured) and all(
        running[name].matches(server.want) for name, server in configured.items()
    )


def configured_members(haproxy: HaproxyServer, backend: str) -> dict[str, tuple[int, int, str]]:
    """Instance id → (port, weight, admin state), from the config's lbsync-id markers."""
    return {
        server.instance_id: (server.want.port, server.want.weight, server.want.admin)
        for server in config_servers(haproxy.config.read_text())[backend].values()
        if server.instance_id is not None
    }


def test_membership_changes_in_etcd_are_served_without_a_reload(
    daemon: RunningDaemon, writer: EtcdWriter, web: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    assert daemon.actions() == ["unchanged"]  # the daemon renders what HAProxy started on
    before = generation(web)
    mark = len(daemon.outcomes)

    writer.put(key("web", "instances", "b1"), registration(b1))
    writer.put(key("web", "instances", "b2"), registration(b2))
    wait_for(lambda: only_served_by(web.port, {"b1", "b2"}), what="b1 and b2 served")

    writer.put(key("web", "health", "b2"), '{"status": "down", "reason": "5xx", "by": "mon"}')
    wait_for(lambda: only_served_by(web.port, {"b1"}), what="b2 out after its health mark")

    writer.delete(key("web", "instances", "b1"))
    writer.put(key("web", "instances", "b3"), registration(b3, weight=3))
    wait_for(lambda: only_served_by(web.port, {"b3"}), what="b1 deleted, b3 in")

    writer.delete(key("web", "health", "b2"))
    wait_for(lambda: only_served_by(web.port, {"b2", "b3"}), what="b2 back, mark cleared")

    writer.put(key("web", "instances", "b3"), registration(b3, state="drain"))
    wait_for(lambda: only_served_by(web.port, {"b2"}), what="b3 draining")
    wait_for(lambda: daemon.caught_up(writer), what="the daemon to catch up")

    actions = daemon.actions(mark)
    assert actions
    assert set(actions) == {"runtime"}, actions
    assert generation(web) == before
    assert runtime_agrees_with_config(web, "web")
    assert configured_members(web, "web") == {
        "b2": (b2.port, 1, "ready"),
        "b3": (b3.port, 0, "drain"),  # rendered as weight 0: HAProxy has no drain keyword
    }


def test_a_new_backend_reloads_and_a_refused_setting_changes_nothing(
    daemon: RunningDaemon, writer: EtcdWriter, web: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    writer.put(key("web", "instances", "b1"), registration(b1))
    wait_for(lambda: only_served_by(web.port, {"b1"}), what="b1 served")
    master, workers, loads = generation(web)

    api_port = free_port()
    mark = len(daemon.outcomes)
    writer.put(f"{P}/services/api/settings", listen(api_port))
    writer.put(key("api", "instances", "b3"), registration(b3))
    wait_for(lambda: only_served_by(api_port, {"b3"}), what="the new api backend served")
    wait_for(lambda: daemon.caught_up(writer), what="the daemon to catch up")
    assert "reloaded" in daemon.actions(mark)
    new_master, new_workers, new_loads = generation(web)
    assert new_master == master
    assert not set(new_workers) & set(workers)
    assert new_loads > loads
    assert only_served_by(web.port, {"b1"})

    # "nonsense" is no balance (issue 17): lbsync drops that one setting with a
    # value.rejected and keeps the listen, so HAProxy never sees it and no round fails.
    mark = len(daemon.outcomes)
    writer.put(f"{P}/services/web/settings", listen(web.port, balance="nonsense"))
    wait_for(lambda: daemon.caught_up(writer), what="the daemon to catch up")
    assert f"{P}/services/web/settings" in daemon.daemon.catalog.rejected
    assert "nonsense" not in web.config.read_text()
    assert "failed" not in daemon.actions(mark)
    assert only_served_by(web.port, {"b1"})

    # The same listen and balance as before: b2's registration is a runtime change.
    before = generation(web)
    mark = len(daemon.outcomes)
    writer.put(key("web", "instances", "b2"), registration(b2))
    wait_for(lambda: only_served_by(web.port, {"b1", "b2"}), what="b2 served")
    wait_for(lambda: daemon.caught_up(writer), what="the daemon to catch up")
    assert daemon.actions(mark) == ["runtime"]
    assert generation(web) == before


def test_a_mass_change_the_guard_lets_through_is_applied_at_runtime(
    daemon: RunningDaemon, writer: EtcdWriter, web: HaproxyServer, backends: list[Backend]
) -> None:
    """30 instances (ten on each backend process), then one burst of 30 writes: 8 marked
    down, 4 deleted (12 of 30 out: under the guard's half), 10 weights changed, 2 set
    draining, 6 new. 30 is more than the 16 slots HAProxy started with, so the pool grows
    (a reload); the burst then fits and needs none."""
    expected: dict[str, tuple[int, int, str]] = {}

    def put(iid: str, backend: Backend, weight: int = 1, state: str = "up") -> None:
        writer.put(key("web", "instances", iid), registration(backend, weight, state))
        admin = {"up": "ready", "drain": "drain", "down": "maint"}[state]
        expected[iid] = (backend.port, 0 if state == "drain" else weight, admin)

    for n in range(30):
        put(f"i{n:02d}", backends[n % 3])
    wait_for(lambda: daemon.caught_up(writer), what="30 instances applied")
    wait_for(lambda: configured_members(web, "web") == expected, what="30 instances rendered")
    assert "reloaded" in daemon.actions()
    # Grown to twice the instances of the round that overflowed (17..30 of them, as the
    # writes batched), rounded up to 16: 48 or 64, room for the burst's 32 at most.
    assert len(web.servers("web")) in (48, 64)
    before = generation(web)
    mark = len(daemon.outcomes)

    for n in range(8):
        writer.put(key("web", "health", f"i{n:02d}"), '{"status": "down"}')
        expected[f"i{n:02d}"] = (*expected[f"i{n:02d}"][:2], "maint")
    for n in range(8, 12):
        writer.delete(key("web", "instances", f"i{n:02d}"))
        del expected[f"i{n:02d}"]
    for n in range(12, 22):
        put(f"i{n:02d}", backends[n % 3], weight=2 + n % 4)
    for n in range(22, 24):
        put(f"i{n:02d}", backends[n % 3], state="drain")
    for n in range(30, 36):
        put(f"i{n:02d}", backends[n % 3], weight=5)
    wait_for(lambda: daemon.caught_up(writer), what="the burst applied")

    assert not daemon.daemon.guard.holding
    actions = daemon.actions(mark)
    assert actions
    assert set(actions) == {"runtime"}, actions
    assert generation(web) == before
    assert configured_members(web, "web") == expected
    assert runtime_agrees_with_config(web, "web")
    wait_for(lambda: only_served_by(web.port, {"b1", "b2", "b3"}), what="all three serving")


def test_a_restarted_daemon_renders_the_same_config_and_reloads_nothing(
    etcd: EtcdServer,
    writer: EtcdWriter,
    web: HaproxyServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    settings = settings_for(etcd, tmp_path / "state", web.target())
    first = RunningDaemon(settings)
    try:
        for backend in backends:
            writer.put(key("web", "instances", backend.name), registration(backend))
        writer.delete(key("web", "instances", "b1"))  # leaves a hole among the slots
        wait_for(lambda: first.caught_up(writer), what="the first daemon to catch up")
    finally:
        first.stop()
    before = generation(web)
    held = holders(web)
    assert set(held.values()) == {"b2", "b3"}

    second = RunningDaemon(settings)
    try:
        wait_for(lambda: second.caught_up(writer), what="the second daemon to catch up")
        # (the saved catalog, then etcd's read: both render the same)
        assert set(second.actions()) == {"unchanged"}
        writer.put(key("web", "instances", "b1"), registration(backends[0]))
        wait_for(lambda: only_served_by(web.port, {"b1", "b2", "b3"}), what="b1 back")
        wait_for(lambda: second.caught_up(writer), what="the second daemon to catch up")
        # The round from the saved catalog and the one from etcd's read may be one round or
        # two (whether the read arrives before the first round runs): only "unchanged"
        # rounds before the change, and exactly one runtime round for it.
        changes = [a for a in second.actions() if a != "unchanged"]
        assert changes == ["runtime"]
        assert second.actions()[-1] == "runtime"
    finally:
        second.stop()
    assert generation(web) == before
    free = next(f"s{k}" for k in range(1, 17) if f"s{k}" not in held)
    assert holders(web) == {**held, free: "b1"}  # b2, b3 kept their slots; b1 the first free


def holders(haproxy: HaproxyServer) -> dict[str, str]:
    """Slot → instance id, from the config's lbsync-id markers."""
    servers = config_servers(haproxy.config.read_text())["web"]
    return {name: s.instance_id for name, s in servers.items() if s.instance_id is not None}


def test_one_etcd_change_reaches_nginx_and_haproxy(
    etcd: EtcdServer,
    writer: EtcdWriter,
    haproxy: HaproxyServer,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    """Both drivers through the same pipeline: nginx reloads, HAProxy changes at runtime."""
    b1, b2, _ = backends
    writer.put(f"{P}/services/app/settings", listen(haproxy.port))  # nginx's site: "app"
    writer.put(key("app", "instances", "b1"), registration(b1))
    bootstrap(haproxy, {"app": haproxy.port})
    settings = settings_for(etcd, tmp_path / "state", nginx_server.target(), haproxy.target())
    running = RunningDaemon(settings)
    try:
        wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="nginx serving b1")
        wait_for(lambda: only_served_by(haproxy.port, {"b1"}), what="HAProxy serving b1")
        wait_for(lambda: running.caught_up(writer, NGINX, HAPROXY), what="both caught up")
        before = generation(haproxy)
        nginx_workers = nginx_server.worker_pids()
        mark = len(running.outcomes)

        writer.put(key("app", "instances", "b2"), registration(b2))

        wait_for(lambda: only_served_by(nginx_server.port, {"b1", "b2"}), what="nginx: b1+b2")
        wait_for(lambda: only_served_by(haproxy.port, {"b1", "b2"}), what="HAProxy: b1+b2")
        wait_for(lambda: running.caught_up(writer, NGINX, HAPROXY), what="both caught up")
        assert running.actions(mark, NGINX) == ["reloaded"]
        assert running.actions(mark, HAPROXY) == ["runtime"]
        assert nginx_server.worker_pids() != nginx_workers
        assert generation(haproxy) == before
    finally:
        running.stop()
