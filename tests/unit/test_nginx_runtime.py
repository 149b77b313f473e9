"""nginx runtime mode without nginx: Lua scanning, settings, push/reload/tick decisions
against an in-memory control endpoint that follows the Lua side's rules, the templates."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from lbsync.config import NginxTarget, TemplateSettings
from lbsync.drivers.nginx.config import nginx_listens
from lbsync.drivers.nginx.control import ControlState, PushResult, StalePush, digest
from lbsync.drivers.nginx.driver import NginxDriver
from lbsync.drivers.nginx.lua import _explain, _Source, lua_blocks, strip_lua_blocks
from lbsync.drivers.nginx.runtime import LUA_DIR, RuntimeSync, peers
from lbsync.errors import ConfigError, DriverError
from lbsync.model import Instance, Service, Snapshot, State
from lbsync.render import Renderer

REPO = Path(__file__).resolve().parents[2]
UPSTREAMS = REPO / "templates" / "nginx" / "upstreams.conf.j2"
SITES = REPO / "templates" / "nginx" / "sites.conf.j2"


def inst(name: str, host: str = "10.0.0.1", state: str = "up", **kw: object) -> Instance:
    fields: dict[str, object] = {"id": name, "host": host, "port": 8000, "state": State(state)}
    fields.update(kw)
    return Instance.model_validate(fields)


def svc(name: str, *instances: Instance, **settings: object) -> Service:
    return Service.model_validate(
        {"name": name, "instances": sorted(instances, key=lambda i: i.id), "settings": settings}
    )


def snap(revision: int, *services: Service, keys: dict[str, str] | None = None) -> Snapshot:
    return Snapshot(revision=revision, services={s.name: s for s in services}, keys=keys or {})


def target(**overrides: object) -> NginxTarget:
    fields: dict[str, object] = {
        "name": "web",
        "driver": "nginx",
        "templates": [TemplateSettings(src=UPSTREAMS, dest=Path("/etc/nginx/lbsync/up.conf"))],
        "runtime": True,
        "poll_interval": 1.0,
    }
    fields.update(overrides)
    return NginxTarget.model_validate(fields)


# --- an in-memory control endpoint ------------------------------------------------------


class FakeControl:
    """The Lua side's rules: per upstream (generation, revision, peers); stale refused,
    equal ignored; a restart is a new generation with nothing in it."""

    def __init__(self) -> None:
        self.generation = "g1"
        self.held_lists: dict[str, tuple[str, int, list[dict[str, Any]]]] = {}
        self.up = True
        self.pushes: list[tuple[str, int]] = []
        self.forced: list[str] = []
        self.refuse_pushes = 0  # refuse this many pushes (old workers with another token)
        self.gets = 0

    def restart(self, generation: str) -> None:
        self.generation = generation

    def state(self) -> ControlState:
        self.gets += 1
        self._reachable()
        held = {
            n: (rev, p) for n, (gen, rev, p) in self.held_lists.items() if gen == self.generation
        }
        return ControlState(
            self.generation,
            {n: rev for n, (rev, _) in held.items()},
            {n: digest(p) for n, (_, p) in held.items()},
        )

    def held(self, service: str) -> list[dict[str, Any]]:
        self._reachable()
        return self.held_lists[service][2]

    def push(
        self, service: str, revision: int, peer_list: list[dict[str, Any]], *, force: bool = False
    ) -> PushResult:
        self._reachable()
        if self.refuse_pushes:
            self.refuse_pushes -= 1
            raise DriverError("POST answered 403 missing or wrong X-Lbsync-Token", target="web")
        self.pushes.append((service, revision))
        if force:
            self.forced.append(service)
            self.held_lists[service] = (self.generation, revision, peer_list)
            return PushResult(True, self.generation)
        gen, held, _ = self.held_lists.get(service, ("", -1, []))
        if gen == self.generation and revision < held:
            raise StalePush(f"stale {revision} < {held}", target="web")
        if gen == self.generation and revision == held:
            return PushResult(False, self.generation)
        self.held_lists[service] = (self.generation, revision, peer_list)
        return PushResult(True, self.generation)

    def _reachable(self) -> None:
        if not self.up:
            raise DriverError("control endpoint unreachable: refused", target="web")


def sync(**overrides: object) -> tuple[RuntimeSync, FakeControl]:
    runtime = RuntimeSync(target(**overrides))
    fake = FakeControl()
    runtime.client = fake  # type: ignore[assignment]
    return runtime, fake


def declined(runtime: RuntimeSync, old: Snapshot | None, new: Snapshot) -> str:
    with structlog.testing.capture_logs() as events:
        assert not runtime.update(old, new)
    [event] = [e for e in events if e["event"] == "nginx.runtime_update"]
    return str(event["reason"])


# --- runtime_update decisions ---------------------------------------------------------------


BASE = snap(10, svc("app", inst("a"), inst("b")), svc("api", inst("c")))


def test_a_membership_change_pushes_the_changed_upstream_once_synced() -> None:
    runtime, fake = sync()
    assert runtime.tick(BASE, now=0.0)  # first sync: everything
    assert sorted(fake.pushes) == [("api", 10), ("app", 10)]
    fake.pushes.clear()

    new = snap(11, svc("app", inst("a"), inst("b", state="drain"), inst("d")), BASE.services["api"])
    assert runtime.update(BASE, new)
    assert fake.pushes == [("app", 11)]
    assert fake.held_lists["app"][2] == [
        {"id": "a", "host": "10.0.0.1", "port": 8000, "weight": 1, "state": "up"},
        {"id": "b", "host": "10.0.0.1", "port": 8000, "weight": 1, "state": "drain"},
        {"id": "d", "host": "10.0.0.1", "port": 8000, "weight": 1, "state": "up"},
    ]


def test_down_instances_are_left_out_of_the_push() -> None:
    service = svc("app", inst("a"), inst("b", state="down"), inst("c", state="drain"))
    assert [p["id"] for p in peers(service)] == ["a", "c"]


def test_a_push_to_a_generation_never_synced_pushes_every_upstream() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    fake.restart("g2")  # restarted behind our back, before the next poll
    fake.pushes.clear()
    new = snap(11, svc("app", inst("a")), BASE.services["api"])
    assert runtime.update(BASE, new)
    assert sorted(fake.pushes) == [("api", 11), ("app", 11), ("app", 11)]
    assert fake.state().services == {"api": 11, "app": 11}


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        (snap(11, svc("app", inst("a"))), "an upstream appeared or disappeared"),
        (
            snap(11, svc("app", inst("a"), balance="x"), BASE.services["api"]),
            "app: settings changed",
        ),
        (
            snap(
                11,
                svc("app", inst("a"), inst("b", meta={"zone": "z"}), inst("d")),
                BASE.services["api"],
            ),
            "app: instance b: meta changed",
        ),
        (
            snap(11, svc("app", inst("a"), inst("b", host="b.example")), BASE.services["api"]),
            "app: an instance has a hostname (the Lua balancer needs IP addresses)",
        ),
        (
            snap(11, *BASE.services.values(), keys={"/other": "1"}),
            "keys outside the instance schema changed",
        ),
        (
            snap(11, *BASE.services.values()),
            "no membership change (the template or something else changed)",
        ),
    ],
)
def test_anything_but_membership_declines_to_a_reload(new: Snapshot, reason: str) -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    fake.pushes.clear()
    assert declined(runtime, BASE, new) == reason
    assert fake.pushes == []


def test_upstreams_the_lua_balancer_does_not_drive_reload() -> None:
    old = snap(1, svc("app", inst("a"), balance="least_conn"))
    new = snap(2, svc("app", inst("a"), inst("b"), balance="least_conn"))
    runtime, _ = sync()
    assert "least_conn is not done by the Lua balancer" in declined(runtime, old, new)
    assert runtime.template_context(new)["nginx_runtime"]["upstreams"] == ()


def test_no_applied_snapshot_declines() -> None:
    runtime, _ = sync()
    assert declined(runtime, None, BASE) == "no applied snapshot to compare with"


def test_an_unreachable_endpoint_or_a_stale_push_declines() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    new = snap(11, svc("app", inst("a")), BASE.services["api"])
    fake.up = False
    assert "unreachable" in declined(runtime, BASE, new)
    fake.up = True
    fake.held_lists["app"] = (fake.generation, 99, [])
    assert "stale" in declined(runtime, BASE, new)


# --- reloads ---------------------------------------------------------------------------------


def test_after_a_reload_the_snapshot_it_loaded_is_pushed_to_the_new_generation() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    grown = snap(12, *BASE.services.values(), svc("new", inst("n")))
    assert not runtime.update(BASE, grown)  # structural: the pipeline reloads
    details = runtime.before_reload()
    assert details.generation == "g1"
    fake.restart("g2")  # what the SIGHUP does
    fake.pushes.clear()
    runtime.after_reload(details)
    assert sorted(fake.pushes) == [("api", 12), ("app", 12), ("new", 12)]

    # a rollback reloads again: what was loaded before is pushed
    details = runtime.before_reload()
    assert details.push is grown
    fake.restart("g3")
    runtime.after_reload(details)
    assert fake.state().services == {"api": 12, "app": 12, "new": 12}
    assert fake.state().generation == "g3"


def test_after_a_reload_pushes_refused_by_old_workers_are_retried() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    details = runtime.before_reload()
    fake.restart("g2")
    fake.refuse_pushes = 2
    with structlog.testing.capture_logs() as events:
        runtime.after_reload(details)
    assert [e["event"] for e in events] == ["nginx.runtime_resync"]
    assert fake.state().services == {"api": 10, "app": 10}
    assert fake.refuse_pushes == 0


def test_after_a_reload_a_silent_endpoint_is_logged_not_raised() -> None:
    runtime, fake = sync(verify_timeout=0.05)
    runtime.tick(BASE, now=0.0)
    details = runtime.before_reload()
    fake.up = False
    with structlog.testing.capture_logs() as events:
        runtime.after_reload(details)
    assert [e["event"] for e in events] == ["nginx.runtime_resync_failed"]


# --- tick --------------------------------------------------------------------------------------


def test_tick_polls_once_per_interval() -> None:
    runtime, fake = sync(poll_interval=2.0)
    assert runtime.tick(BASE, now=100.0)
    assert runtime.next_poll == 102.0
    gets = fake.gets
    assert runtime.tick(BASE, now=101.9)
    assert fake.gets == gets


def test_tick_repushes_after_a_restart_and_a_missing_upstream() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    fake.pushes.clear()
    assert runtime.tick(BASE, now=1.0)
    assert fake.pushes == []  # in step: nothing to do

    fake.restart("g2")
    with structlog.testing.capture_logs() as events:
        assert runtime.tick(BASE, now=2.0)
    assert sorted(fake.pushes) == [("api", 10), ("app", 10)]
    assert events[-1]["reason"] == "nginx restarted or reloaded"

    del fake.held_lists["api"]
    fake.pushes.clear()
    assert runtime.tick(BASE, now=3.0)
    assert ("api", 10) in fake.pushes


def test_tick_reports_an_unreachable_endpoint_once() -> None:
    runtime, fake = sync()
    fake.up = False
    with structlog.testing.capture_logs() as events:
        assert not runtime.tick(BASE, now=0.0)
        assert not runtime.tick(BASE, now=1.0)
    assert [e["event"] for e in events] == ["nginx.control_unreachable"]
    fake.up = True
    assert runtime.tick(BASE, now=2.0)
    assert fake.state().services == {"api": 10, "app": 10}


def test_tick_repairs_peers_or_revisions_someone_else_pushed() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    expected = fake.held_lists["app"][2]
    foreign = [{"id": "x", "host": "10.9.9.9", "port": 4444, "weight": 1, "state": "up"}]
    fake.held_lists["app"] = ("g1", 99, foreign)  # a higher revision and a foreign peer
    fake.held_lists["api"] = ("g1", 10, [*fake.held_lists["api"][2], *foreign])  # same revision
    fake.pushes.clear()

    with structlog.testing.capture_logs() as events:
        assert runtime.tick(BASE, now=1.0)
    found = [e for e in events if e["event"] == "runtime.tampered"]
    tampered = sorted((e["upstream"], e["found_revision"], e["found_peers"]) for e in found)
    assert tampered == [
        ("api", 10, ["10.0.0.1:8000/up/1", "10.9.9.9:4444/up/1"]),
        ("app", 99, ["10.9.9.9:4444/up/1"]),
    ]
    assert all(e["log_level"] == "warning" and e["security"] for e in found)
    assert sorted(fake.forced) == ["api", "app"]
    assert fake.held_lists["app"] == ("g1", 10, expected)  # back at lbsync's revision
    assert runtime.status()["tampered"] == 2

    with structlog.testing.capture_logs() as events:  # repaired: nothing more to say
        assert runtime.tick(BASE, now=2.0)
    assert not [e for e in events if e["event"] == "runtime.tampered"]


def test_the_digest_is_the_lua_sides_length_prefixed_encoding() -> None:
    peer = {"id": "a", "host": "10.0.0.1", "port": 80, "weight": 2, "state": "up"}
    encoded = b"1:a,8:10.0.0.1,2:80,1:2,2:up"
    assert digest([peer]) == hashlib.sha1(encoded).hexdigest()
    assert digest([peer, peer]) == hashlib.sha1(encoded + b"\n" + encoded).hexdigest()
    assert digest([]) == hashlib.sha1(b"").hexdigest()
    # moving text between fields changes the encoding
    shifted = {**peer, "id": "a,8:10.0.0.1", "host": "10.0.0.1"}
    assert digest([shifted]) != digest([peer])
    assert digest([{**peer, "state": "drain"}]) != digest([peer])


def test_a_runtime_push_is_what_the_next_tick_expects() -> None:
    runtime, fake = sync()
    runtime.tick(BASE, now=0.0)
    new = snap(11, svc("app", inst("a"), inst("d")), BASE.services["api"])
    assert runtime.update(BASE, new)
    with structlog.testing.capture_logs() as events:
        assert runtime.tick(new, now=1.0)
    assert fake.forced == []
    assert not [e for e in events if e["event"] == "runtime.tampered"]


def test_the_driver_without_runtime_mode_does_none_of_this() -> None:
    driver = NginxDriver(target(runtime=False))
    assert driver.runtime is None
    assert driver.template_context(BASE) == {}
    assert not driver.runtime_update(BASE, BASE)
    assert driver.tick(BASE)


# --- settings ----------------------------------------------------------------------------------


def test_defaults_keep_existing_configs_working() -> None:
    plain = target(runtime=False)
    assert (plain.runtime, plain.control_url, plain.lua_dir) == (
        False,
        "http://127.0.0.1:8089/lbsync/",
        None,
    )
    assert RuntimeSync(target()).lua_dir == LUA_DIR
    assert (LUA_DIR / "lbsync" / "runtime.lua").is_file()


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8089/lbsync/",  # not loopback
        "https://127.0.0.1:8089/lbsync/",
        "http://localhost:8089/lbsync/",
        "http://127.0.0.1/lbsync/",  # no port
        "http://127.0.0.1:8089/lbsync",  # the path must end in "/"
        "http://127.0.0.1:70000/lbsync/",
        'http://127.0.0.1:8089/a"b/',
    ],
)
def test_the_control_url_must_be_loopback_http(url: str) -> None:
    from lbsync.config_file import settings_from_dict

    data = {
        "target": [
            {
                "name": "web",
                "driver": "nginx",
                "runtime": True,
                "control_url": url,
                "template": [{"src": "t.j2", "dest": "/etc/nginx/x.conf"}],
            }
        ]
    }
    with pytest.raises(ConfigError, match="control_url"):
        settings_from_dict(data, base_dir=Path("/tmp"), source="lbsync.toml")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8089/lbsync/", "http://[::1]:9/", "http://127.1.2.3:80/a/b/"]
)
def test_loopback_control_urls_are_accepted(url: str) -> None:
    assert target(control_url=url).control_url == url


def test_lua_dir_must_be_absolute_and_plain() -> None:
    with pytest.raises(ValueError, match="lua_dir"):
        target(lua_dir="relative/lua")
    with pytest.raises(ValueError, match="lua_dir"):
        target(lua_dir='/opt/"lua')


@pytest.mark.parametrize("path", ["relative/token", '/var/lib/"x', "/var/lib/a b", "/a\n/b"])
def test_the_token_file_must_be_absolute_and_plain(path: str) -> None:
    with pytest.raises(ValueError, match="control_token_file"):
        target(control_token_file=path)


# --- templates ---------------------------------------------------------------------------------


def render(src: Path, snapshot: Snapshot, runtime: bool, renderer: Renderer) -> str:
    extra = RuntimeSync(target()).template_context(snapshot) if runtime else {}
    return renderer.render(src, snapshot, extra).decode()


def test_the_runtime_template_adds_the_lua_side_and_keeps_the_static_lists() -> None:
    snapshot = snap(
        1,
        svc("app", inst("a"), inst("b", state="drain"), keepalive=16),
        svc("old", inst("c"), balance="ip_hash"),
    )
    renderer = Renderer()
    plain = render(UPSTREAMS, snapshot, False, renderer)
    text = render(UPSTREAMS, snapshot, True, renderer)  # same renderer: shared cache
    assert "lua" not in plain
    assert render(UPSTREAMS, snapshot, False, renderer) == plain

    assert f'lua_package_path "{LUA_DIR}/?.lua;;";' in text
    token_file = "/var/lib/lbsync/nginx-control.token"
    assert f'require("lbsync.runtime").init("{token_file}")' in text
    assert "lua_shared_dict lbsync 16m;" in text
    for line in ("listen 127.0.0.1:8089;", "location /lbsync/ {", "allow 127.0.0.1;", "deny all;"):
        assert line in text
    app = text[text.index("upstream app {") :]
    app = app[: app.index("\n}\n")]
    assert "server 10.0.0.1:8000 weight=1;" in app  # the static list stays
    assert "weight=1 down;  # draining" in app
    assert app.index('balancer_by_lua_block { require("lbsync.runtime").balance("app") }') < (
        app.index("keepalive 16;")
    )
    old = text[text.index("upstream old {") :]
    assert "balancer_by_lua_block" not in old[: old.index("}")]  # ip_hash: static


def test_the_sites_template_adds_the_access_check_in_runtime_mode() -> None:
    snapshot = snap(1, svc("app", inst("a"), listen=8080))
    renderer = Renderer()
    assert "access_by_lua" not in render(SITES, snapshot, False, renderer)
    assert 'access_by_lua_block { require("lbsync.runtime").access("app") }' in render(
        SITES, snapshot, True, renderer
    )


# --- Lua in nginx configs ---------------------------------------------------------------------

CONF = """http {
  # balancer_by_lua_block { a comment, not a block
  init_by_lua_block { local s = "}" -- } comment
    local t = {a = [[ } ]], b = '{'}  --[==[ } ]==]
  }
  set $x "content_by_lua_block {";
  upstream u { server 1.2.3.4; balancer_by_lua_block { require("x").balance("u") } keepalive 2; }
  location / { access_by_lua_block {
     if #t == 0 then return end
  } proxy_pass http://u#frag; }
}
"""


def test_lua_blocks_are_found_like_ngx_lua_finds_them() -> None:
    found = [(b.directive, b.line, b.code.strip()) for b in lua_blocks(CONF)]
    assert found == [
        (
            "init_by_lua_block",
            3,
            "local s = \"}\" -- } comment\n    local t = {a = [[ } ]], b = '{'}  --[==[ } ]==]",
        ),
        ("balancer_by_lua_block", 7, 'require("x").balance("u")'),
        ("access_by_lua_block", 8, "if #t == 0 then return end"),
    ]


def test_stripping_lua_keeps_lines_and_the_nginx_structure() -> None:
    stripped = strip_lua_blocks(CONF)
    assert stripped.count("\n") == CONF.count("\n")
    assert "#t" not in stripped
    assert "[[" not in stripped


def test_the_listen_precheck_is_not_confused_by_lua(tmp_path: Path) -> None:
    """To nginx's tokenizer the "}" in a Lua long string closes a block, so the listen
    after the location would count as outside the server."""
    main = tmp_path / "nginx.conf"
    main.write_text(
        "http {\n"
        "  server { listen 127.0.0.1:1234; location / {\n"
        "    content_by_lua_block { local s = [[}]] }\n"
        "  }\n"
        "  listen 127.0.0.1:1235; }\n"
        "}\n"
    )
    assert [str(a) for a in nginx_listens(main)] == ["127.0.0.1:1234", "127.0.0.1:1235"]


def test_an_unterminated_block_ends_the_scan() -> None:
    assert lua_blocks("init_by_lua_block { local s = [[ never closed }\n") == []


def test_lua_errors_are_reported_by_file_and_line() -> None:
    sources = [
        _Source("/opt/lua/lbsync/runtime.lua", None, 1, ""),
        _Source("/etc/nginx/up.conf", "balancer_by_lua_block", 40, ""),
    ]
    output = "#0:12: '=' expected near 'x'\n#1:2: unexpected symbol near '='\n"
    assert _explain(output, sources) == (
        "/opt/lua/lbsync/runtime.lua:12: '=' expected near 'x'\n"
        "/etc/nginx/up.conf:41 (in balancer_by_lua_block): unexpected symbol near '='"
    )


# --- verify: a broken module fails the reload with only an [error] -----------------------------


def test_an_init_by_lua_error_counts_as_a_failed_reload(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    log.write_text(
        "old line\n"
        "2026/11/22 03:36:39 [notice] 1#1: reconfiguring\n"
        "2026/11/22 03:36:39 [error] 1#1: init_by_lua error: error loading module "
        "'lbsync.runtime' from file '/x/lbsync/runtime.lua':\n"
        "\t/x/lbsync/runtime.lua:11: '<eof>' expected near 'local'\n"
        "stack traceback:\n"
        "\t[C]: in function 'require'\n"
    )
    driver = NginxDriver(target(error_log=log))
    assert driver._emergencies(len("old line\n")) == [
        "2026/11/22 03:36:39 [error] 1#1: init_by_lua error: error loading module "
        "'lbsync.runtime' from file '/x/lbsync/runtime.lua':",
        "\t/x/lbsync/runtime.lua:11: '<eof>' expected near 'local'",
    ]
