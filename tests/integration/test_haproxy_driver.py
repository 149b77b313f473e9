"""The HAProxy driver against a real HAProxy 2.6 (Debian), loopback only.

Configs are rendered from the stock template the way the pipeline does it: lbsync's
``Renderer`` (with its ``{% cache %}`` blocks) plus the driver's ``template_context``.
Tests wait for states (``wait_for``), never for fixed times.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import structlog.testing

import lbsync.drivers.haproxy.driver as haproxy_driver
from lbsync.drivers.base import driver_for
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.runtime import Plan
from lbsync.drivers.haproxy.state import servers_state
from lbsync.errors import ListenConflict, ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.model import Instance, Service, SettingValue, Snapshot, State
from lbsync.pipeline import TargetPipeline
from lbsync.render import Renderer
from lbsync.stage.tree import StagedConfig
from tests.harness.backends import Backend, inst, keep_alive_load, membership, served_names
from tests.harness.haproxy import HAPROXY, TEMPLATE, HaproxyServer
from tests.harness.net import free_port, wait_for

pytestmark = pytest.mark.integration

_RENDERER = Renderer()


# --- helpers ---------------------------------------------------------------------------


def render(driver: HaproxyDriver, snapshot: Snapshot) -> str:
    return _RENDERER.render(TEMPLATE, snapshot, driver.template_context(snapshot)).decode()


def write_config(driver: HaproxyDriver, snapshot: Snapshot) -> None:
    """Render and write the live config (what the pipeline's swap does)."""
    driver.target.config.write_text(render(driver, snapshot))


def service(name: str, port: int, *instances: Instance, **settings: SettingValue) -> Service:
    return Service(
        name=name,
        instances=tuple(sorted(instances, key=lambda i: i.id)),
        settings={"listen": f"127.0.0.1:{port}", **settings},
    )


def snap(revision: int, *services: Service) -> Snapshot:
    return Snapshot(revision=revision, services={s.name: s for s in services})


def make_driver(haproxy: HaproxyServer, **overrides: object) -> HaproxyDriver:
    driver = driver_for(haproxy.target(**overrides))
    assert isinstance(driver, HaproxyDriver)
    return driver


def start(haproxy: HaproxyServer, driver: HaproxyDriver, snapshot: Snapshot) -> None:
    write_config(driver, snapshot)
    haproxy.start()


def reload_and_verify(driver: HaproxyDriver) -> None:
    driver.verify(driver.reload())


def serves(port: int, names: set[str]) -> None:
    wait_for(lambda: served_names(port) == names, what=f"port {port} to serve {sorted(names)}")


def generation(haproxy: HaproxyServer) -> tuple[int, tuple[int, ...], int]:
    """(master pid, worker pids, reload count): equal before/after = no reload."""
    proc = haproxy.show_proc()
    return proc.master_pid, proc.pids, proc.reloads


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 1000])
def test_stock_template_passes_haproxy_check(tmp_path: Path, count: int) -> None:
    config = tmp_path / "haproxy.cfg"
    state_file = tmp_path / "server-state"
    target = HaproxyServer(tmp_path).target(config=config, state_file=state_file)
    driver = driver_for(target)
    assert isinstance(driver, HaproxyDriver)
    states = ["up", "drain", "down"]
    instances = [
        Instance(
            id=f"i{k:04d}",
            host=f"10.{k // 250}.{k % 250}.7",
            port=8000 + k % 1000,
            weight=1 + k % 3,
            state=State(states[k % 3]),
        )
        for k in range(count)
    ]
    snapshot = snap(
        1,
        service("web", free_port(), *instances, balance="least_conn"),
        Service(name="internal", instances=tuple(instances)),  # no frontend
    )
    config.write_text(render(driver, snapshot))

    # As the driver checks it (the state file does not even exist yet) ...
    driver.validate(StagedConfig(root=tmp_path, main=config, files={}))
    # ... and plainly, with the state file a reload writes.
    state_file.write_text("1\n")
    done = subprocess.run(
        [HAPROXY, "-c", "-dW", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "etc",
        "haproxy.cfg",
        "run",
        "server-state",
    ]


def test_validate_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    driver = driver_for(HaproxyServer(tmp_path).target(config=config))
    assert isinstance(driver, HaproxyDriver)
    good = render(driver, snap(1, service("web", free_port())))
    config.write_text(good + "    bogus-directive 1\n")

    with pytest.raises(ValidationFailed) as caught:
        driver.validate(StagedConfig(root=tmp_path, main=config, files={}))

    assert "bogus-directive" in caught.value.stderr
    assert ".check-" not in str(caught.value)  # reported against the config, not the copy
    assert not [p for p in tmp_path.iterdir() if ".check-" in p.name]


def test_a_taken_listen_port_is_refused_and_the_old_config_keeps_serving(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    driver = make_driver(haproxy)
    web = service("web", haproxy.port, inst(backends[0]))
    start(haproxy, driver, snap(1, web))
    serves(haproxy.port, {"b1"})
    staged = haproxy.dir / "staged.cfg"

    # Same listen address, held by HAProxy itself: fine.
    staged.write_text(render(driver, snap(2, service("web", haproxy.port, *map(inst, backends)))))
    driver.validate(StagedConfig(root=haproxy.dir, main=staged, files={}))

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        staged.write_text(render(driver, snap(3, web, service("api", taken, inst(backends[1])))))
        with pytest.raises(ListenConflict, match=str(taken)):
            driver.validate(StagedConfig(root=haproxy.dir, main=staged, files={}))

    serves(haproxy.port, {"b1"})


# --- reload path -------------------------------------------------------------------------


def test_reload_follows_instances_going_down_and_up(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    driver = make_driver(haproxy)
    start(haproxy, driver, snap(1, service("web", haproxy.port, inst(b1), inst(b2), inst(b3))))
    serves(haproxy.port, {"b1", "b2", "b3"})
    master, workers, _ = generation(haproxy)

    write_config(driver, snap(2, service("web", haproxy.port, inst(b1), inst(b2, "down"))))
    ticket = driver.reload()
    driver.verify(ticket)

    assert ticket.before.master_pid == master
    assert ticket.before.workers == workers
    new_master, new_workers, _ = generation(haproxy)
    assert new_master == master
    assert not set(new_workers) & set(workers)
    serves(haproxy.port, {"b1"})

    write_config(driver, snap(3, service("web", haproxy.port, inst(b1), inst(b2))))
    reload_and_verify(driver)
    serves(haproxy.port, {"b1", "b2"})
    assert haproxy.loads() == 3


def test_a_refused_reload_is_reported_and_the_old_workers_keep_serving(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    driver = make_driver(haproxy)
    start(haproxy, driver, snap(1, service("web", haproxy.port, inst(backends[0]))))
    _, workers, _ = generation(haproxy)
    haproxy.config.write_text(haproxy.config.read_text() + "    bogus-directive 1\n")

    with pytest.raises(VerifyFailed, match="Loading failure"):
        reload_and_verify(driver)

    assert generation(haproxy)[1] == workers
    serves(haproxy.port, {"b1"})


def test_a_dead_master_fails_verify_and_reload(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    driver = make_driver(haproxy)
    start(haproxy, driver, snap(1, service("web", haproxy.port, inst(backends[0]))))
    ticket = driver.reload()

    os.kill(haproxy.master_pid(), signal.SIGKILL)

    with pytest.raises(VerifyFailed, match="gone"):
        driver.verify(ticket)
    with pytest.raises(ReloadFailed, match="cannot find the HAProxy master"):
        driver.reload()


# --- runtime path ------------------------------------------------------------------------


def _serving(members: tuple[Instance, ...]) -> set[str]:
    return {i.id for i in members if i.up}


def test_100_runtime_changes_under_keep_alive_load_need_no_reload(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    driver = make_driver(haproxy)
    old = snap(0, service("web", haproxy.port, *membership(0, backends)))
    start(haproxy, driver, old)
    serves(haproxy.port, _serving(membership(0, backends)))
    before = generation(haproxy)

    with keep_alive_load(haproxy.port, max_seconds=10.0) as load:
        for step in range(1, 101):
            members = membership(step, backends)
            new = snap(step, service("web", haproxy.port, *members))
            write_config(driver, new)
            assert driver.runtime_update(old, new), f"step {step} fell back to a reload"
            old = new
            done = load.ok
            wait_for(functools.partial(load.progressed, since=done), what="requests in between")
            if step % 10 == 0:
                serves(haproxy.port, _serving(members))

    assert load.failures == []
    assert load.ok >= 500  # at least 5 between any two changes
    assert generation(haproxy) == before
    assert haproxy.loads() == 1
    driver.validate(StagedConfig(root=haproxy.etc, main=haproxy.config, files={}))


def test_an_idle_repair_compares_server_by_server_only_until_a_backend_is_found_in_step(
    haproxy: HaproxyServer, backends: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    b1, b2, _ = backends
    driver = make_driver(haproxy)
    applied = snap(1, service("web", haproxy.port, inst(b1), inst(b2, "drain")))
    start(haproxy, driver, applied)
    serves(haproxy.port, {"b1"})
    compared: list[list[str]] = []
    apply_plans = haproxy_driver.apply_plans

    def spy(admin: Cli, plans: list[Plan]) -> int:
        compared.append([p.backend for p in plans])
        return apply_plans(admin, plans)

    monkeypatch.setattr(haproxy_driver, "apply_plans", spy)
    assert not driver.repair_runtime(applied)
    assert not driver.repair_runtime(applied)
    assert compared == [["web"], []]  # the second tick: the same columns, in step

    Cli(haproxy.admin_socket, target="test").query("set server web/s1 state maint")
    assert driver.repair_runtime(applied)  # seen behind the cached comparison
    assert haproxy.servers("web")["s1"].admin == "ready"
    serves(haproxy.port, {"b1"})
    assert not driver.repair_runtime(applied)  # back to the columns found in step
    assert compared == [["web"], [], ["web"], []]


def test_runtime_membership_survives_a_forced_reload(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    driver = make_driver(haproxy)
    first = snap(1, service("web", haproxy.port, inst(b1)))
    start(haproxy, driver, first)
    serves(haproxy.port, {"b1"})

    second = snap(2, service("web", haproxy.port, inst(b1), inst(b2), inst(b3, "drain")))
    write_config(driver, second)
    assert driver.runtime_update(first, second)
    serves(haproxy.port, {"b1", "b2"})

    reload_and_verify(driver)

    serves(haproxy.port, {"b1", "b2"})
    states = {s.name: s.admin for s in haproxy.servers("web").values()}
    assert states == {"s1": "ready", "s2": "ready", "s3": "drain"} | {
        f"s{n}": "maint" for n in range(4, 17)
    }
    assert len(servers_state(haproxy.state_file.read_text())) == 16  # all agreed: all kept


def test_a_reload_lbsync_does_not_make_keeps_the_runtimemembership(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    """``systemctl reload haproxy`` after runtime changes: no state dump first. The state
    file from lbsync's last reload still says b2 holds s2 (added at runtime: loaded
    ``disabled``, then set ready), and HAProxy would take that over the config."""
    b1, b2, _ = backends
    driver = make_driver(haproxy)
    first = snap(1, service("web", haproxy.port, inst(b1)))
    start(haproxy, driver, first)
    second = snap(2, service("web", haproxy.port, inst(b1), inst(b2)))
    write_config(driver, second)
    assert driver.runtime_update(first, second)
    reload_and_verify(driver)  # dumps the state: s2 = b2, ready
    serves(haproxy.port, {"b1", "b2"})

    third = snap(3, service("web", haproxy.port, inst(b1)))
    write_config(driver, third)
    assert driver.runtime_update(second, third)
    serves(haproxy.port, {"b1"})
    loads = haproxy.loads()
    os.kill(haproxy.master_pid(), signal.SIGUSR2)  # what Debian's unit does on reload
    wait_for(lambda: haproxy.loads() > loads, what="the external reload")

    serves(haproxy.port, {"b1"})
    assert haproxy.servers("web")["s2"].admin == "maint"


def test_a_reload_does_not_bring_back_a_slot_freed_in_the_same_round(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    """The slot b2 got at runtime (loaded ``disabled``, then set ready) is freed in a round
    that also adds a backend, so that round reloads with the state dumped just before.
    HAProxy would put that server back in service from a raw dump."""
    b1, b2, b3 = backends
    api_port = free_port()
    driver = make_driver(haproxy)
    first = snap(1, service("web", haproxy.port, inst(b1)))
    start(haproxy, driver, first)
    second = snap(2, service("web", haproxy.port, inst(b1), inst(b2)))
    write_config(driver, second)
    assert driver.runtime_update(first, second)
    serves(haproxy.port, {"b1", "b2"})

    third = snap(3, service("web", haproxy.port, inst(b1)), service("api", api_port, inst(b3)))
    write_config(driver, third)
    assert not driver.runtime_update(second, third)
    reload_and_verify(driver)

    serves(haproxy.port, {"b1"})
    serves(api_port, {"b3"})
    assert haproxy.servers("web")["s2"].admin == "maint"


def test_exhausted_slots_fall_back_to_a_reload(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    driver = make_driver(haproxy)
    first = snap(1, service("web", haproxy.port, inst(b1), inst(b2), slots=2))
    start(haproxy, driver, first)
    serves(haproxy.port, {"b1", "b2"})
    before = generation(haproxy)

    second = snap(2, service("web", haproxy.port, inst(b1), inst(b2), inst(b3), slots=2))
    write_config(driver, second)
    assert not driver.runtime_update(first, second)
    assert generation(haproxy) == before  # nothing was applied
    reload_and_verify(driver)

    serves(haproxy.port, {"b1", "b2", "b3"})
    assert len(haproxy.servers("web")) == 16


def test_reload_without_a_master_socket_uses_the_pid_file(
    haproxy: HaproxyServer, backends: list[Backend]
) -> None:
    b1, b2, _ = backends
    driver = make_driver(haproxy, master_socket=None)
    start(haproxy, driver, snap(1, service("web", haproxy.port, inst(b1))))
    workers = generation(haproxy)[1]

    write_config(driver, snap(2, service("web", haproxy.port, inst(b1), inst(b2))))
    ticket = driver.reload()
    driver.verify(ticket)

    assert ticket.before.master_pid == haproxy.master_pid()
    assert set(ticket.before.workers) == set(workers)
    serves(haproxy.port, {"b1", "b2"})


def test_a_master_in_another_pid_namespace_is_reloaded_through_its_cli(
    haproxy: HaproxyServer, backends: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    b1, b2, _ = backends
    driver = make_driver(haproxy)
    start(haproxy, driver, snap(1, service("web", haproxy.port, inst(b1))))
    # As seen from a sidecar: show proc answers, but its pid is nobody here.
    monkeypatch.setattr(driver._master, "local_master", lambda pid: None)

    write_config(driver, snap(2, service("web", haproxy.port, inst(b1), inst(b2))))
    with structlog.testing.capture_logs() as events:
        reload_and_verify(driver)

    assert [e["by"] for e in events if e["event"] == "haproxy.reload"] == ["master_cli"]
    serves(haproxy.port, {"b1", "b2"})
    assert haproxy.loads() == 2


# --- through the pipeline ----------------------------------------------------------------


def test_the_pipeline_uses_the_runtime_api_for_membership_and_reloads_for_the_rest(
    haproxy: HaproxyServer, backends: list[Backend], tmp_path: Path
) -> None:
    b1, b2, b3 = backends
    api_port = free_port()
    driver = make_driver(haproxy)
    pipeline = TargetPipeline(driver.target, driver, Renderer(), tmp_path / "state")
    first = snap(1, service("web", haproxy.port, inst(b1)))
    start(haproxy, driver, first)
    before = generation(haproxy)

    assert pipeline.apply(first).action == "unchanged"
    assert pipeline.apply(snap(2, service("web", haproxy.port, inst(b1), inst(b2)))).action == (
        "runtime"
    )
    serves(haproxy.port, {"b1", "b2"})
    assert generation(haproxy) == before

    bad = snap(3, service("web", haproxy.port, inst(b1), balance="nonsense"))
    refused = pipeline.apply(bad)
    assert refused.action == "unchanged"  # web held back at what HAProxy runs
    assert type(refused.held["web"].error) is ValidationFailed

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", api_port))
        squatter.listen()
        grows = snap(4, service("web", haproxy.port, inst(b1)), service("api", api_port, inst(b3)))
        taken = pipeline.apply(grows)
    assert (taken.action, type(taken.error)) == ("failed", ListenConflict)
    assert generation(haproxy) == before
    serves(haproxy.port, {"b1", "b2"})

    assert pipeline.apply(grows).action == "reloaded"
    serves(haproxy.port, {"b1"})
    serves(api_port, {"b3"})
    assert haproxy.loads() == 2
    assert haproxy.config.read_text() == render(driver, grows)
