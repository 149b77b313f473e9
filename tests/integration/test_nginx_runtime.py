"""nginx runtime mode against a real nginx with Debian's Lua module, loopback only.

Rounds go through ``TargetPipeline`` (render with the stock template, ``nginx -t``, Lua
check, runtime push or reload), as the daemon runs them. Tests wait for states, never for
fixed times; "no reload" is checked by master and worker pids and by the error log.
"""

from __future__ import annotations

import bisect
import functools
import http.client
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog.testing

from lbsync import metrics
from lbsync.config import EtcdSettings, Settings
from lbsync.daemon import Daemon
from lbsync.drivers.base import driver_for
from lbsync.drivers.nginx.control import ControlClient, ControlState, digest
from lbsync.drivers.nginx.driver import NginxDriver
from lbsync.drivers.nginx.runtime import LUA_DIR, peers
from lbsync.errors import ValidationFailed, VerifyFailed
from lbsync.model import Instance, Service, Snapshot
from lbsync.pipeline import TargetPipeline
from lbsync.render import Renderer
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, http_get, inst, keep_alive_load, membership
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import free_port, wait_for
from tests.harness.nginx import NGINX, NginxServer

pytestmark = pytest.mark.integration

SETTINGS = {"keepalive": 8}  # upstream keep-alive on: rendered after the balancer


# --- helpers ---------------------------------------------------------------------------


def dead(port: int, name: str = "dead") -> Instance:
    return Instance(id=name, host="127.0.0.1", port=port)


def app(*instances: Instance, **settings: object) -> Service:
    return Service(
        name="app",
        instances=tuple(sorted(instances, key=lambda i: i.id)),
        settings={**SETTINGS, **settings},
    )


def snap(revision: int, *services: Service) -> Snapshot:
    return Snapshot(revision=revision, services={s.name: s for s in services})


@dataclass
class Rig:
    server: NginxServer
    driver: NginxDriver
    pipeline: TargetPipeline

    @property
    def control(self) -> ControlClient:
        return ControlClient(
            self.server.control_url, timeout=5, target="test", token=self.server.control_token
        )

    def state(self) -> ControlState:
        return self.control.state()

    def generation(self) -> tuple[int, list[int]]:
        """(master pid, worker pids): equal before and after = no reload, no restart."""
        return self.server.master_pid(), self.server.worker_pids()

    def apply(self, snapshot: Snapshot, action: str) -> None:
        outcome = self.pipeline.apply(snapshot)
        assert outcome.action == action, outcome.error


def make_rig(server: NginxServer, state_dir: Path, **overrides: object) -> Rig:
    driver = driver_for(server.target(**overrides))
    assert isinstance(driver, NginxDriver)
    pipeline = TargetPipeline(driver.target, driver, Renderer(), state_dir)
    return Rig(server, driver, pipeline)


def write_first_config(rig: Rig, snapshot: Snapshot) -> None:
    """The files lbsync renders, and the control token that validation creates (nginx's
    master reads it when it starts)."""
    for dest, data in rig.pipeline.plan(snapshot).rendered.items():
        dest.write_bytes(data)
    assert rig.driver.runtime is not None
    rig.driver.runtime.token()


def start(rig: Rig, snapshot: Snapshot) -> None:
    """Render the first config as lbsync would, start nginx, then let lbsync take over
    (an unchanged round, and the tick that pushes every upstream)."""
    write_first_config(rig, snapshot)
    rig.server.start()
    rig.apply(snapshot, "unchanged")
    assert rig.driver.tick(rig.pipeline.applied)
    assert rig.state().services == dict.fromkeys(snapshot.services, snapshot.revision)


def names(port: int, count: int) -> list[str]:
    """Bodies of ``count`` requests on one keep-alive connection (status must be 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 200, (response.status, body)
            out.append(body)
    finally:
        conn.close()
    return out


@pytest.fixture
def rig(nginx_lua_server: NginxServer, tmp_path: Path) -> Rig:
    return make_rig(nginx_lua_server, tmp_path / "state")


# --- 100 changes under load ------------------------------------------------------------


def _up(members: tuple[Instance, ...]) -> frozenset[str]:
    return frozenset(i.id for i in members if i.up)


def _misrouted(
    pushes: list[tuple[float, float, frozenset[str]]], done: list[tuple[float, float, str]]
) -> list[str]:
    """Requests that went to an instance outside every set that could have been in force
    while they ran: the last set pushed before they started, plus any set whose push began
    before they ended."""
    finished = [end for _, end, _ in pushes]
    bad = []
    for began, ended, name in done:
        first = bisect.bisect_right(finished, began) - 1
        allowed: set[str] = set(pushes[first][2]) if first >= 0 else set()
        for push_began, _, up in pushes[first + 1 :]:
            if push_began > ended:
                break
            allowed |= up
        if name not in allowed:
            bad.append(f"{name} not in {sorted(allowed)}")
    return bad


def test_100_membership_changes_under_keep_alive_load_need_no_reload(
    rig: Rig, backends: list[Backend]
) -> None:
    start(rig, snap(1, app(*membership(0, backends))))
    before = rig.generation()
    pushes: list[tuple[float, float, frozenset[str]]] = [(0.0, 0.0, _up(membership(0, backends)))]

    with keep_alive_load(rig.server.port, max_seconds=120.0) as load:
        for step in range(1, 101):
            members = membership(step, backends)
            began = time.monotonic()
            rig.apply(snap(step + 1, app(*members)), "runtime")
            pushes.append((began, time.monotonic(), _up(members)))
            wait_for(
                functools.partial(load.progressed, since=len(load.done)),
                what=f"requests after step {step}",
            )

    assert load.failures == []
    assert len(load.done) >= 500  # at least 5 between any two changes
    assert _misrouted(pushes, load.done) == []
    assert rig.generation() == before
    assert rig.server.reconfigurations() == 0
    assert rig.state().services == {"app": 101}
    # the file on disk says the same as nginx's pushed list (a restart would agree)
    assert rig.pipeline.plan(snap(101, app(*membership(100, backends)))).changed == {}


def test_upstream_keepalive_follows_the_balancer_so_nginx_keeps_it_on(rig: Rig) -> None:
    """nginx only *warns* when keepalive comes before balancer_by_lua_block, and then
    upstream keep-alive is silently off."""
    for dest, data in rig.pipeline.plan(snap(1, app(dead(free_port())))).rendered.items():
        dest.write_bytes(data)
    text = (rig.server.conf_d / "upstreams.conf").read_text()
    assert text.index("balancer_by_lua_block") < text.index("keepalive 8;")
    done = subprocess.run(
        [NGINX, "-t", "-p", str(rig.server.dir), "-c", str(rig.server.conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "[warn]" not in done.stderr


# --- balancing ---------------------------------------------------------------------------


def test_weights_are_honoured(rig: Rig, backends: list[Backend]) -> None:
    b1, b2, b3 = backends
    start(rig, snap(1, app(inst(b1))))
    rig.apply(snap(2, app(inst(b1, weight=3), inst(b2), inst(b3, weight=2))), "runtime")
    served = names(rig.server.port, 60)  # one worker: smooth WRR, exact per 6 requests
    assert (served.count("b1"), served.count("b2"), served.count("b3")) == (30, 10, 20)
    assert "b1,b3,b1,b2,b3,b1" in ",".join(served)  # smooth: interleaved, not 3 in a row


def test_drain_stops_new_requests(rig: Rig, backends: list[Backend]) -> None:
    b1, b2, _ = backends
    start(rig, snap(1, app(inst(b1), inst(b2))))
    assert set(names(rig.server.port, 10)) == {"b1", "b2"}
    rig.apply(snap(2, app(inst(b1), inst(b2, "drain"))), "runtime")
    hits = b2.hits
    assert set(names(rig.server.port, 20)) == {"b1"}
    assert b2.hits == hits
    assert rig.state().services == {"app": 2}


def test_an_empty_service_answers_503_cleanly(rig: Rig, backends: list[Backend]) -> None:
    b1, b2, _ = backends
    start(rig, snap(1, app(inst(b1))))
    rig.apply(snap(2, app(inst(b1, "down"), inst(b2, "drain"))), "runtime")
    status, body = http_get(rig.server.port)
    assert status == 503
    assert "503 Service Temporarily Unavailable" in body
    rig.apply(snap(3, app()), "runtime")  # no instance at all; the service stays
    assert http_get(rig.server.port)[0] == 503
    rig.apply(snap(4, app(inst(b2))), "runtime")
    assert names(rig.server.port, 3) == ["b2"] * 3
    assert "[lua]" not in rig.server.error_log.read_text()  # nothing logged by the Lua side


def test_a_dead_peer_is_retried_on_another(rig: Rig, backends: list[Backend]) -> None:
    b1, _, _ = backends
    start(rig, snap(1, app(inst(b1))))
    rig.apply(snap(2, app(inst(b1), dead(free_port(), "d1"), dead(free_port(), "d2"))), "runtime")
    assert names(rig.server.port, 30) == ["b1"] * 30  # every request that chose a dead peer
    log = rig.server.error_log.read_text()
    assert "connect() failed (111: Connection refused)" in log  # ... was retried


def test_only_dead_peers_give_nginxs_own_502(rig: Rig) -> None:
    start(rig, snap(1, app(dead(free_port(), "d1"), dead(free_port(), "d2"))))
    status, _ = http_get(rig.server.port)
    assert status == 502
    assert "no live upstreams" in rig.server.error_log.read_text()


# --- control endpoint ----------------------------------------------------------------------


def _request(
    port: int,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None,
    source: str = "127.0.0.1",
) -> tuple[int, str]:
    """POST ``body`` (GET without one), with ``X-Lbsync-Token: token`` unless None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Lbsync-Token"] = token
    try:
        conn.request("GET" if body is None else "POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_the_control_endpoint_refuses_stale_ignores_equal_and_checks_input(
    rig: Rig, backends: list[Backend]
) -> None:
    b1, b2, _ = backends
    start(rig, snap(5, app(inst(b1))))
    port, path = rig.server.control_port, "/lbsync/services/app"
    peer = f'{{"host": "127.0.0.1", "port": {b2.port}}}'
    _post = functools.partial(_request, token=rig.server.control_token())

    assert _post(port, path, f'{{"revision": 4, "peers": [{peer}]}}'.encode())[0] == 409
    status, body = _post(port, path, f'{{"revision": 5, "peers": [{peer}]}}'.encode())
    assert (status, '"applied":false' in body) == (200, True)
    assert names(rig.server.port, 3) == ["b1"] * 3  # neither changed anything

    for bad in (
        b"not json",
        b'{"peers": []}',
        b'{"revision": -1, "peers": []}',
        b'{"revision": 6, "peers": {"a": 1}}',
        b'{"revision": 6, "peers": [{"host": "example.com", "port": 80}]}',
        b'{"revision": 6, "peers": [{"host": "127.0.0.1", "port": 70000}]}',
        b'{"revision": 6, "peers": [{"host": "127.0.0.1", "port": 80, "weight": 0}]}',
        b'{"revision": 6, "peers": [{"host": "127.0.0.1", "port": 80, "state": "down"}]}',
    ):
        assert _post(port, path, bad)[0] == 400, bad
    assert rig.state().services == {"app": 5}

    status, body = _post(port, path, f'{{"revision": 6, "peers": [{peer}]}}'.encode())
    assert (status, '"applied":true' in body) == (200, True)
    assert names(rig.server.port, 3) == ["b2"] * 3


def test_the_control_endpoint_answers_loopback_127_0_0_1_only(rig: Rig) -> None:
    start(rig, snap(1, app(dead(free_port()))))
    path = "/lbsync/services/app"
    body = b'{"revision": 9, "peers": []}'
    token = rig.server.control_token()
    status, _ = _request(rig.server.control_port, path, body, token=token, source="127.0.0.2")
    assert status == 403
    assert rig.state().services == {"app": 1}


def test_a_push_without_the_token_or_with_a_wrong_one_is_refused(
    rig: Rig, backends: list[Backend]
) -> None:
    b1, foreign, _ = backends
    start(rig, snap(5, app(inst(b1))))
    port, path = rig.server.control_port, "/lbsync/services/app"
    hijack = f'{{"revision": 999, "peers": [{{"host": "127.0.0.1", "port": {foreign.port}}}]}}'
    token = rig.server.control_token()
    wrong = "0" * 64 if token != "0" * 64 else "1" * 64
    for attempt in (None, "", wrong, token[:-1], token + "0", token.upper()):
        status, body = _request(port, path, hijack.encode(), token=attempt)
        assert (status, "X-Lbsync-Token" in body) == (403, True), (attempt, body)
        status, body = _request(port, "/lbsync/", token=attempt)  # the lists are not shown
        assert (status, "peers" in body) == (403, False), (attempt, body)

    assert rig.state().services == {"app": 5}
    assert set(names(rig.server.port, 6)) == {"b1"}  # never the foreign port


def test_tampering_with_the_token_is_found_by_the_poll_and_repaired(
    rig: Rig, backends: list[Backend]
) -> None:
    series = metrics.enable()  # recording from the start
    b1, b2, foreign = backends
    applied = snap(5, app(inst(b1), inst(b2)))
    start(rig, applied)
    runtime = rig.driver.runtime
    assert runtime is not None
    assert rig.state().digests == {"app": digest(peers(applied.services["app"]))}  # as Lua has it
    tampered = series.registry.get_sample_value(
        "lbsync_runtime_tampered_total", {"target": "nginx-test"}
    )
    # a root attacker reads the token file and pushes its own peer at a higher revision
    hijack = f'{{"revision": 999, "peers": [{{"host": "127.0.0.1", "port": {foreign.port}}}]}}'
    status, _ = _request(
        rig.server.control_port,
        "/lbsync/services/app",
        hijack.encode(),
        token=rig.server.control_token(),
    )
    assert status == 200
    assert set(names(rig.server.port, 4)) == {foreign.name}  # the attack took effect

    with structlog.testing.capture_logs() as events:
        assert runtime.tick(rig.pipeline.applied, now=runtime.next_poll)
    [event] = [e for e in events if e["event"] == "runtime.tampered"]
    assert (event["upstream"], event["expected_revision"], event["found_revision"]) == (
        "app",
        5,
        999,
    )
    assert event["found_peers"] == [f"127.0.0.1:{foreign.port}/up/1"]
    assert sorted(event["expected_peers"]) == sorted(f"127.0.0.1:{b.port}/up/1" for b in (b1, b2))
    assert (
        series.registry.get_sample_value("lbsync_runtime_tampered_total", {"target": "nginx-test"})
        == (tampered or 0) + 1
    )
    assert runtime.status()["tampered"] == 1

    assert rig.state().services == {"app": 5}  # lbsync's revision again
    assert set(names(rig.server.port, 6)) == {"b1", "b2"}
    with structlog.testing.capture_logs() as events:  # repaired: the next poll is quiet
        assert runtime.tick(rig.pipeline.applied, now=runtime.next_poll)
    assert not [e for e in events if e["event"] == "runtime.tampered"]
    rig.apply(snap(6, app(inst(b2))), "runtime")  # and lbsync's own pushes still work
    assert set(names(rig.server.port, 4)) == {"b2"}


def test_nginx_started_without_a_token_refuses_all_until_the_first_change_reloads(
    rig: Rig, backends: list[Backend]
) -> None:
    b1, b2, _ = backends
    first = snap(1, app(inst(b1)))
    for dest, data in rig.pipeline.plan(first).rendered.items():
        dest.write_bytes(data)
    rig.server.start()  # no token file yet: nginx serves, its endpoint refuses everything
    assert set(names(rig.server.port, 3)) == {"b1"}
    rig.apply(first, "unchanged")
    runtime = rig.driver.runtime
    assert runtime is not None
    assert not runtime.tick(rig.pipeline.applied, now=runtime.next_poll)  # token created now
    status, body = _request(rig.server.control_port, "/lbsync/", token=rig.server.control_token())
    assert (status, "no control token loaded" in body) == (403, True)

    rig.apply(snap(2, app(inst(b1), inst(b2))), "reloaded")  # the push is refused: reload
    wait_for(rig.server.settled, what="the old worker (without the token) to exit")
    assert runtime.tick(rig.pipeline.applied, now=runtime.next_poll)
    assert rig.state().services == {"app": 2}  # the reloaded master read the token
    rig.apply(snap(3, app(inst(b2))), "runtime")
    assert set(names(rig.server.port, 4)) == {"b2"}


# --- reloads, restarts, fallbacks ------------------------------------------------------------


def test_a_structural_change_reloads_and_every_upstream_is_pushed_again(
    rig: Rig, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    start(rig, snap(1, app(inst(b1))))
    rig.apply(snap(2, app(inst(b1), inst(b2))), "runtime")
    master, workers = rig.generation()
    generation = rig.state().generation

    api = Service(name="api", instances=(inst(b3),))
    rig.apply(snap(3, app(inst(b1), inst(b2)), api), "reloaded")

    assert rig.server.master_pid() == master
    assert rig.server.worker_pids() != workers
    state = rig.state()
    assert state.generation != generation
    assert state.services == {"api": 3, "app": 3}
    assert set(names(rig.server.port, 6)) == {"b1", "b2"}


def test_a_restart_behind_lbsyncs_back_is_repushed_at_the_next_poll(
    rig: Rig, backends: list[Backend]
) -> None:
    b1, b2, _ = backends
    start(rig, snap(1, app(inst(b1))))
    rig.apply(snap(2, app(inst(b1), inst(b2, "drain"))), "runtime")
    master = rig.server.master_pid()

    rig.server.stop()  # an operator restarts nginx
    rig.server.start()
    assert rig.server.master_pid() != master
    assert rig.state().services == {}  # the restart emptied the shared dict
    assert set(names(rig.server.port, 6)) == {"b1"}  # meanwhile: the static list on disk

    runtime = rig.driver.runtime
    assert runtime is not None
    due = runtime.next_poll
    assert runtime.tick(rig.pipeline.applied, now=due - 0.001)  # not due: nothing asked
    assert rig.state().services == {}
    with structlog.testing.capture_logs() as events:
        assert runtime.tick(rig.pipeline.applied, now=due)
    assert rig.state().services == {"app": 2}
    [resync] = [e for e in events if e["event"] == "nginx.runtime_resync"]
    assert resync["reason"] == "nginx restarted or reloaded"


def test_an_unreachable_control_endpoint_falls_back_to_a_reload(
    rig: Rig, backends: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    b1, b2, _ = backends
    start(rig, snap(1, app(inst(b1))))
    runtime = rig.driver.runtime
    assert runtime is not None
    monkeypatch.setattr(runtime.client, "port", free_port())  # nothing listens there
    with structlog.testing.capture_logs() as events:
        rig.apply(snap(2, app(inst(b1), inst(b2))), "reloaded")
    [declined] = [e for e in events if e["event"] == "nginx.runtime_update"]
    assert "unreachable" in declined["reason"]
    assert set(names(rig.server.port, 6)) == {"b1", "b2"}  # the reloaded static list

    monkeypatch.undo()
    assert runtime.tick(rig.pipeline.applied, now=runtime.next_poll)
    assert rig.state().services == {"app": 2}
    rig.apply(snap(3, app(inst(b2))), "runtime")
    assert set(names(rig.server.port, 6)) == {"b2"}


def test_a_hostname_instance_goes_through_a_reload(rig: Rig, backends: list[Backend]) -> None:
    b1, _, _ = backends
    start(rig, snap(1, app(inst(b1))))
    named = Instance(id="named", host="localhost", port=b1.port)
    rig.apply(snap(2, app(inst(b1), named)), "reloaded")
    assert rig.state().services == {}  # not pushable: served from the static list
    assert set(names(rig.server.port, 4)) == {"b1"}


# --- Lua checks ----------------------------------------------------------------------------


def _break(lua: Path) -> int:
    """Put a syntax error into the module under ``lua``; returns its line."""
    module = lua / "lbsync" / "runtime.lua"
    text = module.read_text()
    good = "local function pick(entry, tried)"
    module.write_text(text.replace(good, good + " )", 1))
    return text[: text.index(good)].count("\n") + 1


def _broken_copy(tmp_path: Path) -> tuple[Path, int]:
    lua = tmp_path / "lua"
    shutil.copytree(LUA_DIR, lua)
    return lua, _break(lua)


def test_a_lua_syntax_error_in_the_module_is_caught_before_any_reload(
    nginx_lua_server: NginxServer, tmp_path: Path, backends: list[Backend]
) -> None:
    b1, _, b3 = backends
    good = make_rig(nginx_lua_server, tmp_path / "state")
    start(good, snap(1, app(inst(b1))))
    before = good.generation()
    files = (nginx_lua_server.conf_d / "upstreams.conf").read_bytes()

    lua, line = _broken_copy(tmp_path)
    broken = make_rig(nginx_lua_server, tmp_path / "state", lua_dir=lua)
    api = Service(name="api", instances=(inst(b3),))
    outcome = broken.pipeline.apply(snap(2, app(inst(b1)), api))

    assert outcome.action == "failed"
    assert isinstance(outcome.error, ValidationFailed)
    assert f"{lua}/lbsync/runtime.lua:{line}" in str(outcome.error)
    assert good.generation() == before
    assert nginx_lua_server.reconfigurations() == 0
    assert (nginx_lua_server.conf_d / "upstreams.conf").read_bytes() == files


def test_without_luajit_a_broken_module_fails_the_reload_not_the_requests(
    nginx_lua_server: NginxServer, tmp_path: Path, backends: list[Backend]
) -> None:
    """The second line of defence: init_by_lua loads the module, so the reload fails,
    lbsync rolls back, and the old workers keep serving."""
    b1, b2, _ = backends
    lua = tmp_path / "lua"
    shutil.copytree(LUA_DIR, lua)
    rig = make_rig(nginx_lua_server, tmp_path / "state", lua_dir=lua, luajit="/nonexistent")
    start(rig, snap(1, app(inst(b1))))
    workers = nginx_lua_server.worker_pids()
    _break(lua)  # the copy nginx loads from

    outcome = rig.pipeline.apply(snap(2, app(inst(b1)), Service(name="api", instances=(inst(b2),))))

    assert outcome.action == "rolled_back"
    assert isinstance(outcome.error, VerifyFailed)
    assert "init_by_lua error" in str(outcome.error)
    assert "runtime.lua" in str(outcome.error)
    assert nginx_lua_server.worker_pids() == workers
    assert names(nginx_lua_server.port, 3) == ["b1"] * 3


def test_a_lua_error_in_a_custom_template_block_is_caught_with_its_line(
    nginx_lua_server: NginxServer, tmp_path: Path, backends: list[Backend]
) -> None:
    rig = make_rig(nginx_lua_server, tmp_path / "state")
    start(rig, snap(1, app(inst(backends[0]))))
    template = tmp_path / "custom.conf.j2"
    template.write_text(
        "upstream custom {\n    server 127.0.0.1:1 down;\n"
        "    balancer_by_lua_block {\n        local x = = 1\n    }\n}\n"
    )
    dest = nginx_lua_server.conf_d / "custom.conf"
    custom = make_rig(
        nginx_lua_server, tmp_path / "state2", templates=[{"src": template, "dest": dest}]
    )
    with pytest.raises(ValidationFailed) as caught:
        custom.pipeline.check(custom.pipeline.plan(snap(1, app())))
    assert f"{dest}:4 (in balancer_by_lua_block)" in str(caught.value)


# --- through the daemon --------------------------------------------------------------------


P = "/lbsync"


def round_on_latest(running: RunningDaemon, writer: EtcdWriter) -> str | None:
    """Wait for a round on etcd's latest revision; its action."""
    wait_for(lambda: running.caught_up(writer), what="a round")
    return running.outcome()


def test_the_daemon_pushes_membership_from_etcd_and_repushes_after_a_restart(
    etcd: EtcdServer, nginx_lua_server: NginxServer, tmp_path: Path, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    server = nginx_lua_server
    write_first_config(make_rig(server, tmp_path / "s"), snap(0, app()))
    server.start()
    target = server.target(poll_interval=0.5)
    settings = Settings.model_validate(
        {
            "etcd": {"endpoints": [etcd.endpoint], "prefix": P},
            "wait": {"min": "0s", "max": "0s"},
            "state_dir": str(tmp_path / "state"),
            "target": [target.model_dump(by_alias=True, mode="json")],
        }
    )
    control = ControlClient(
        server.control_url, timeout=5, target="test", token=server.control_token
    )

    def key(iid: str) -> str:
        return f"{P}/services/app/instances/{iid}"

    with EtcdWriter(EtcdSettings(endpoints=[etcd.endpoint], prefix=P)) as writer:
        writer.put(key("b1"), f"127.0.0.1:{b1.port}")
        running = RunningDaemon(Daemon(settings))
        try:
            # the first round has no applied snapshot to compare with: a reload
            assert round_on_latest(running, writer) == "reloaded"
            wait_for(server.settled, what="the old worker to exit")
            before = server.master_pid(), server.worker_pids()
            for backend in (b2, b3):
                writer.put(key(backend.name), f"127.0.0.1:{backend.port}")
                assert round_on_latest(running, writer) == "runtime"
            writer.delete(key("b1"))
            assert round_on_latest(running, writer) == "runtime"
            assert set(names(server.port, 6)) == {"b2", "b3"}
            assert (server.master_pid(), server.worker_pids()) == before
            assert server.reconfigurations() == 1

            server.stop()  # restarted behind lbsync's back
            server.start()
            revision = writer.revision()
            wait_for(
                lambda: control.state().services == {"app": revision},
                what="the re-push after the restart",
            )

            # someone who read the token pushes a removed instance back: the poll repairs it
            hijack = {
                "revision": revision + 1000,
                "peers": [{"host": "127.0.0.1", "port": b1.port}],
            }
            status, _ = _request(
                server.control_port,
                "/lbsync/services/app",
                json.dumps(hijack).encode(),
                token=server.control_token(),
            )
            assert status == 200
            wait_for(lambda: control.state().services == {"app": revision}, what="the repair")
            assert set(names(server.port, 6)) == {"b2", "b3"}
            runtime = running.daemon.status_document()["runtime"]
            assert runtime == {
                "nginx-test": {
                    "control_reachable": True,
                    "tampered": 1,
                    "last_tampered": {
                        "upstream": "app",
                        "expected_revision": revision,
                        "found_revision": revision + 1000,
                        "at": pytest.approx(time.time(), abs=60),
                    },
                }
            }
        finally:
            running.stop()
