"""The nginx and command drivers against a real nginx 1.22 and real HTTP backends."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbsync.config import CommandTarget, NginxTarget, TemplateSettings
from lbsync.drivers.command import CommandDriver
from lbsync.drivers.listen import check_listen
from lbsync.drivers.nginx import driver as nginx_driver
from lbsync.drivers.nginx.config import nginx_listens
from lbsync.drivers.nginx.driver import NginxDriver
from lbsync.errors import ListenConflict, ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.model import Instance, Service, Snapshot, State
from lbsync.render import Renderer
from lbsync.stage.swap import swap_in
from lbsync.stage.tree import staged
from tests.harness.backends import Backend, served_names
from tests.harness.net import free_port, wait_for
from tests.harness.nginx import REPO, NginxServer, process_gone

pytestmark = pytest.mark.integration

TEMPLATES = REPO / "templates" / "nginx"


def render(template: str, snapshot: Snapshot) -> bytes:
    """As lbsync renders it (its environment, extensions and context)."""
    return Renderer().render(TEMPLATES / template, snapshot)


def snapshot_of(*services: Service, revision: int = 7) -> Snapshot:
    return Snapshot(revision=revision, services={s.name: s for s in services})


def app_with(*backends: Backend) -> Snapshot:
    instances = tuple(Instance(id=b.name, host="127.0.0.1", port=b.port) for b in backends)
    return snapshot_of(Service(name="app", instances=instances))


def apply(server: NginxServer, snapshot: Snapshot) -> NginxDriver:
    """The daemon's round, by hand: render → stage → validate → swap → reload → verify."""
    target = server.target()
    driver = NginxDriver(target)
    rendered = {server.conf_d / "upstreams.conf": render("upstreams.conf.j2", snapshot)}
    with staged(target, rendered, server.dir.parent / "work") as tree:
        driver.validate(tree)
    swap_in(rendered, server.dir.parent / "backup")
    driver.verify(driver.reload())
    return driver


@pytest.fixture
def held_port() -> Iterator[tuple[int, socket.socket]]:
    """A port some other process (this test) listens on."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1], sock
    sock.close()


# --- validate ----------------------------------------------------------------------------


def test_validate_accepts_a_good_staged_tree(
    nginx_server: NginxServer, backends: list[Backend], tmp_path: Path
) -> None:
    target = nginx_server.target()
    rendered = {
        nginx_server.conf_d / "upstreams.conf": render("upstreams.conf.j2", app_with(*backends))
    }
    with staged(target, rendered, tmp_path / "work") as tree:
        NginxDriver(target).validate(tree)


def test_validate_catches_a_bad_fragment_behind_an_absolute_include(
    nginx_server: NginxServer, tmp_path: Path
) -> None:
    target = nginx_server.target()
    live = nginx_server.conf_d / "upstreams.conf"
    live_before = live.read_bytes()
    log_before = nginx_server.error_log.read_bytes()
    rendered = {live: b"upstream app {\n}\n"}  # nginx: no servers are inside upstream

    with (
        staged(target, rendered, tmp_path / "work") as tree,
        pytest.raises(ValidationFailed) as info,
    ):
        NginxDriver(target).validate(tree)

    assert "no servers are inside upstream" in info.value.stderr
    assert f"in {live}:" in info.value.stderr, "the error names the live path, not the stage"
    assert live.read_bytes() == live_before
    # Nothing of the check in the live error log. (Not byte equality: the running worker
    # may still log, at info, the harness's own "is it listening?" connection closing.)
    added = nginx_server.error_log.read_bytes().removeprefix(log_before)
    assert b"no servers are inside upstream" not in added, "the check wrote to the live log"
    assert b"[emerg]" not in added, added


def test_validate_catches_a_new_bad_file_picked_up_by_the_include_glob(
    nginx_server: NginxServer, tmp_path: Path
) -> None:
    target = nginx_server.target()
    new_file = nginx_server.conf_d / "extra.conf"
    with (
        staged(target, {new_file: b"this is not nginx;\n"}, tmp_path / "work") as tree,
        pytest.raises(ValidationFailed, match="unknown directive"),
    ):
        NginxDriver(target).validate(tree)
    assert not new_file.exists()


# --- reload + verify ---------------------------------------------------------------------


def test_reload_verify_moves_traffic_to_the_new_upstream_set(
    nginx_server: NginxServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    master = nginx_server.master_pid()
    first_workers = nginx_server.worker_pids()
    assert served_names(nginx_server.port) == set(), "placeholder upstream: only 502s"

    apply(nginx_server, app_with(b1, b2))

    assert nginx_server.master_pid() == master
    wait_for(
        lambda: not set(nginx_server.worker_pids()) & set(first_workers),
        what="old workers retired",
    )
    wait_for(lambda: served_names(nginx_server.port) == {"b1", "b2"}, what="b1+b2 serving")

    apply(nginx_server, app_with(b3))

    wait_for(lambda: served_names(nginx_server.port) == {"b3"}, what="only b3 serving")
    assert nginx_server.master_pid() == master


def test_verify_detects_a_dead_master(nginx_server: NginxServer) -> None:
    driver = NginxDriver(nginx_server.target())
    master = psutil.Process(nginx_server.master_pid())
    ticket = driver.reload()
    master.send_signal(signal.SIGKILL)
    wait_for(lambda: process_gone(master), what="master gone")

    with pytest.raises(VerifyFailed, match=f"master {master.pid} died"):
        driver.verify(ticket)
    with pytest.raises(ReloadFailed, match=str(nginx_server.pid_file)):
        driver.reload()


def test_verify_reports_a_config_nginx_refused_on_reload(nginx_server: NginxServer) -> None:
    driver = NginxDriver(nginx_server.target())
    workers = nginx_server.worker_pids()
    # Bypass validation on purpose: what nginx says when the file on disk is bad.
    (nginx_server.conf_d / "upstreams.conf").write_text("upstream app {\n}\n")

    with pytest.raises(VerifyFailed, match="no servers are inside upstream"):
        driver.verify(driver.reload())
    assert nginx_server.worker_pids() == workers, "old workers keep serving"


def test_reload_without_a_pid_file_names_the_file(tmp_path: Path) -> None:
    target = NginxTarget(
        name="t",
        driver="nginx",
        templates=[TemplateSettings(src=tmp_path / "t.j2", dest=tmp_path / "t.conf")],
        pid_file=tmp_path / "missing.pid",
    )
    with pytest.raises(ReloadFailed, match=str(tmp_path / "missing.pid")):
        NginxDriver(target).reload()


# --- listen pre-check --------------------------------------------------------------------


def _site(port: int | str) -> bytes:
    return f"server {{ listen {port}; location / {{ return 204; }} }}\n".encode()


def test_listen_conflict_when_another_process_holds_the_port(
    nginx_server: NginxServer, held_port: tuple[int, socket.socket], tmp_path: Path
) -> None:
    port, _sock = held_port
    target = nginx_server.target()
    rendered = {nginx_server.conf_d / "new-site.conf": _site(f"127.0.0.1:{port}")}

    with (
        staged(target, rendered, tmp_path / "work") as tree,
        pytest.raises(ListenConflict) as info,
    ):
        NginxDriver(target).validate(tree)  # nginx -t passes; the pre-check does not

    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert f"pid {os.getpid()}" in message


def test_new_free_listen_address_passes(nginx_server: NginxServer, tmp_path: Path) -> None:
    target = nginx_server.target()
    rendered = {nginx_server.conf_d / "new-site.conf": _site(f"127.0.0.1:{free_port()}")}
    with staged(target, rendered, tmp_path / "work") as tree:
        NginxDriver(target).validate(tree)


def test_rendered_upstreams_alone_cannot_add_a_listen_address(
    nginx_server: NginxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def walked(*_args: object) -> list[object]:
        raise AssertionError("no rendered file has a listen or include: nothing to walk")

    monkeypatch.setattr(nginx_driver, "nginx_listens", walked)
    target = nginx_server.target()
    rendered = {nginx_server.conf_d / "upstreams.conf": b"upstream app { server 10.0.0.1:80; }\n"}
    with staged(target, rendered, tmp_path / "work") as tree:
        NginxDriver(target).validate(tree)

    rendered = {nginx_server.conf_d / "new-site.conf": _site(f"127.0.0.1:{free_port()}")}
    with (
        staged(target, rendered, tmp_path / "work2") as tree,
        pytest.raises(AssertionError, match="nothing to walk"),
    ):
        NginxDriver(target).validate(tree)  # a listen: walked


def test_nginx_own_listeners_are_not_a_conflict(nginx_server: NginxServer, tmp_path: Path) -> None:
    live = nginx_listens(nginx_server.conf)
    assert [str(a) for a in live] == [f"127.0.0.1:{nginx_server.port}"]
    own = [nginx_server.master_pid(), *nginx_server.worker_pids()]

    check_listen(live, own_pids=own, target="t")  # held exactly by this nginx: fine
    with pytest.raises(ListenConflict, match="in use"):
        check_listen(live, own_pids=[], target="t")  # the probe does see the port taken

    target = nginx_server.target()
    with staged(target, {}, tmp_path / "work") as tree:
        NginxDriver(target).validate(tree)


def test_an_address_overlapping_nginx_own_listener_is_a_conflict(
    nginx_server: NginxServer, tmp_path: Path
) -> None:
    """Measured: nginx cannot bind *:P on reload while it holds 127.0.0.1:P."""
    target = nginx_server.target()
    rendered = {nginx_server.conf_d / "new-site.conf": _site(nginx_server.port)}
    with (
        staged(target, rendered, tmp_path / "work") as tree,
        pytest.raises(ListenConflict, match="overlaps an address this LB already listens on"),
    ):
        NginxDriver(target).validate(tree)


# --- stock templates ---------------------------------------------------------------------


def _instances(count: int) -> tuple[Instance, ...]:
    return tuple(
        Instance(id=f"i{n:04d}", host=f"10.{n // 250}.{n % 250}.1", port=8000 + n % 1000)
        for n in range(count)
    )


@pytest.mark.parametrize("count", [0, 1, 1000])
def test_stock_templates_pass_nginx_t(
    nginx_server: NginxServer, tmp_path: Path, count: int
) -> None:
    mixed = (
        Instance(id="a", host="10.9.0.1", port=80, weight=5),
        Instance(id="b", host="10.9.0.2", port=80, state=State.DRAIN),
        Instance(id="c", host="10.9.0.3", port=80, state=State.DOWN),
        Instance(id="d", host="::1", port=81),
    )
    all_down = (Instance(id="x", host="10.9.1.1", port=80, state=State.DOWN),)
    listen = free_port()
    snapshot = snapshot_of(
        Service(name="app", instances=_instances(count)),
        Service(
            name="least",
            instances=_instances(count),
            settings={"balance": "least_conn", "keepalive": 16},
        ),
        Service(name="hash", instances=mixed, settings={"balance": "ip_hash"}),
        Service(name="rand.v2", instances=mixed, settings={"balance": "random", "listen": listen}),
        Service(name="down-all", instances=all_down, settings={"balance": "bogus"}),
        Service(name="drain-only", instances=mixed[1:2]),
    )
    upstreams = render("upstreams.conf.j2", snapshot)
    sites = render("sites.conf.j2", snapshot)
    assert upstreams.count(b"upstream ") == 6
    assert upstreams.startswith(b"# Generated by lbsync from etcd.")
    assert b"revision" not in upstreams + sites, "an unrelated etcd write must not re-render"
    assert sites.count(b"server {") == 1
    target = nginx_server.target()
    rendered = {
        nginx_server.conf_d / "upstreams.conf": upstreams,
        nginx_server.conf_d / "sites.conf": sites,
    }
    with staged(target, rendered, tmp_path / "work") as tree:
        NginxDriver(target).validate(tree)


def test_stock_upstream_rendering_details() -> None:
    mixed = (
        Instance(id="a", host="10.9.0.1", port=80, weight=5),
        Instance(id="b", host="10.9.0.2", port=80, state=State.DRAIN),
        Instance(id="c", host="10.9.0.3", port=80, state=State.DOWN),
    )
    text = render(
        "upstreams.conf.j2",
        snapshot_of(
            Service(
                name="web", instances=mixed, settings={"balance": "least_conn", "keepalive": 8}
            ),
            Service(name="empty"),
        ),
    ).decode()
    web = text.split("upstream web {", 1)[1].split("}", 1)[0]
    assert web.splitlines()[1:] == [
        "    least_conn;",
        "    server 10.9.0.1:80 weight=5;",
        "    server 10.9.0.2:80 weight=1 down;  # draining",
        "    keepalive 8;",
    ]
    empty = text.split("upstream empty {", 1)[1].split("}", 1)[0]
    assert "server 127.0.0.1:1 down;" in empty


# --- command driver ----------------------------------------------------------------------


def _command_target(tmp_path: Path, **fields: object) -> CommandTarget:
    base: dict[str, object] = {
        "name": "cmd",
        "driver": "command",
        "templates": [TemplateSettings(src=tmp_path / "t.j2", dest=tmp_path / "live" / "b.txt")],
        "reload_command": ["touch", str(tmp_path / "reloaded")],
        "command_timeout": 10.0,
    }
    base.update(fields)
    return CommandTarget.model_validate(base)


def test_command_driver_checks_the_staged_file_and_reloads(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    target = _command_target(
        tmp_path,
        check_command=[
            "sh",
            "-c",
            'grep -q b1 "$1" && printf %s "$1" > "$2"',
            "sh",
            "{staged}",
            str(seen),
        ],
    )
    driver = CommandDriver(target)
    dest = target.templates[0].dest
    with staged(target, {dest: b"b1 b2\n"}, tmp_path / "work") as tree:
        driver.validate(tree)
        staged_path = Path(seen.read_text())
        assert staged_path == tree.files[dest]
        assert staged_path.is_relative_to(tree.root)
    with (
        staged(target, {dest: b"b3\n"}, tmp_path / "work") as tree,
        pytest.raises(ValidationFailed, match="check command refused"),
    ):
        driver.validate(tree)

    driver.verify(driver.reload())

    assert (tmp_path / "reloaded").exists()


def test_command_driver_shell_mode_and_failed_reload(tmp_path: Path) -> None:
    target = _command_target(
        tmp_path,
        shell=True,
        check_command="test -d {staged_root} && grep -q ok {staged}",
        reload_command="exit 3",
    )
    driver = CommandDriver(target)
    with staged(target, {target.templates[0].dest: b"ok\n"}, tmp_path / "w") as tree:
        driver.validate(tree)
    with pytest.raises(ReloadFailed, match="exit 3"):
        driver.reload()
