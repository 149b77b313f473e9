"""The structural check: a render must not hold structure that benign values don't make."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbsync.config import TemplateSettings
from lbsync.errors import StructureViolation
from lbsync.model import HealthMark, Instance, Snapshot, State
from lbsync.render import Renderer
from lbsync.structure import (
    StructureCheck,
    added_structure,
    haproxy_line_shape,
    is_benign,
    neutral,
    nginx_line_shape,
)
from lbsync.testing import snapshot_from

STOCK = Path(__file__).resolve().parents[2] / "templates" / "nginx"

CATALOG = {
    "services": {
        "web": {
            "instances": {
                "a": {"host": "10.0.0.1", "port": 80, "meta": {"zone": "eu-1"}},
                "b": "web-2.internal:8080",
            },
            "health": {"b": {"status": "drain", "reason": "HTTP 503 (slow)", "by": "monitor"}},
            "settings": {"balance": "least_conn", "keepalive": 16, "listen": 8080},
        },
        "api": {"instances": {"a": "[::1]:9000"}},
    }
}


def test_nginx_line_shape_keeps_names_and_punctuation() -> None:
    assert nginx_line_shape("    server 10.0.0.1:80 weight=2 down;") == ["server", ";"]
    assert nginx_line_shape("upstream web {") == ["upstream", "{"]
    assert nginx_line_shape("a b; include x; } # c ;") == ["a", ";", "include", ";", "}", "#"]
    assert nginx_line_shape("set $x \"a; b\"; set $y '}';") == ["set", ";", "set", ";"]
    assert nginx_line_shape('set $x "unterminated;') == ["set", '"', ";"]


def test_haproxy_line_shape_is_the_first_keyword() -> None:
    assert haproxy_line_shape("    server a 10.0.0.1:80 check") == ["server"]
    assert haproxy_line_shape("program pwn") == ["program"]
    assert haproxy_line_shape("  # a comment") == []
    assert haproxy_line_shape("") == []


def test_neutral_replaces_structural_characters_only() -> None:
    assert neutral("web-2.internal:8080/x y") == "web-2.internal:8080/x y"
    assert neutral("a;b{c}d#e\"f'g\\h`i\nj\rk") == "axbxcxdxexfxgxhxixjxk"
    assert is_benign("HTTP 503 (slow)")
    assert not is_benign("line\u2028separator")


def test_added_structure_counts_lines_not_just_kinds() -> None:
    """An injected ``include`` is found even though the template has one of its own."""
    twin = b"include mime.types;\nserver 10.0.0.9xinclude /etc/passwd;\n}\n"
    real = b"include mime.types;\nserver 10.0.0.9;\ninclude /etc/passwd;\n}\n"
    assert added_structure(real, twin, nginx_line_shape) == ("include", "include /etc/passwd;")
    assert added_structure(twin, twin, nginx_line_shape) is None


@pytest.mark.parametrize("where", [0, 500, 999])
def test_added_structure_finds_one_changed_line_among_many(where: int) -> None:
    lines = [f"    server 10.0.{n // 250}.{n % 250}:80;" for n in range(1000)]

    def render(line: str) -> bytes:
        changed = [*lines[:where], line, *lines[where + 1 :]]
        return "\n".join(["upstream a {", *changed, "}", ""]).encode()

    twin = render("    server 10.0.0.1:80x")
    assert added_structure(render("    server 10.0.0.1:80 x"), twin, nginx_line_shape) is None
    broken = "    server 10.0.0.1:80 x}"
    assert added_structure(render(broken), twin, nginx_line_shape) == ("}", broken)
    two_lines = render("    server 10.0.0.1:80\n}")
    assert added_structure(two_lines, twin, nginx_line_shape) == ("}", "}")


def checker(*names: str) -> StructureCheck:
    templates = [
        TemplateSettings(src=STOCK / name, dest=Path("/etc/nginx/conf.d") / name) for name in names
    ]
    return StructureCheck(Renderer(), templates, nginx_line_shape)


def run_check(check: StructureCheck, snapshot: Snapshot) -> None:
    raw = check.keys(snapshot)
    rendered = {
        t.dest: check.renderer.render(t.src, snapshot, {}, raw=raw) for t in check.templates
    }
    check.check(snapshot, {}, rendered, raw)


def test_a_benign_snapshot_is_its_own_twin_and_costs_nothing() -> None:
    snapshot = snapshot_from(CATALOG)
    check = checker("upstreams.conf.j2", "sites.conf.j2")
    assert check.twin(snapshot) is snapshot
    run_check(check, snapshot)


def hostile(snapshot: Snapshot, instance: Instance) -> Snapshot:
    web = snapshot.services["web"]
    services = dict(snapshot.services)
    services["web"] = web.model_copy(update={"instances": (*web.instances, instance)})
    return Snapshot.model_construct(revision=2, services=services, keys=snapshot.keys)


@pytest.mark.parametrize("in_place", [False, True])
def test_an_injected_host_is_found_after_a_benign_version_of_its_service(in_place: bool) -> None:
    """Only the instances a benign earlier version lacked are looked at again: the new
    one is among them, shared instances are not (added, or replacing one in place)."""
    benign = snapshot_from(CATALOG)
    check = checker("upstreams.conf.j2")
    run_check(check, benign)
    injected = Instance.model_construct(id="b", host="1.2.3.4; } x {", port=1)
    snapshot = hostile(benign, injected)
    if in_place:
        web = snapshot.services["web"]
        services = {
            **snapshot.services,
            "web": web.model_copy(update={"instances": web.instances[::2]}),
        }
        snapshot = Snapshot.model_construct(revision=3, services=services, keys=benign.keys)
    assert len(snapshot.services["web"].instances) == 2 + (not in_place)
    assert snapshot.services["web"].instances[0] is benign.services["web"].instances[0]
    with pytest.raises(StructureViolation, match="added ';'"):
        run_check(check, snapshot)


@pytest.mark.parametrize(
    "unsafe",
    [
        {"host": "10.0.0.9;"},
        {"id": "z}"},
        {"meta": {"zone": "eu-1"}, "health": HealthMark(status=State.UP, by="#")},
        {"meta": {"zo\nne": "eu-1"}},
        {"meta": {"zone": "eu'1"}},
        {"health": HealthMark(status=State.DRAIN, reason="down\\")},
    ],
)
def test_one_unsafe_text_among_many_instances_makes_the_service_twinned(
    unsafe: dict[str, object],
) -> None:
    """The service's texts are searched joined: one structural character in any field of
    any one instance, first or last, still counts."""
    benign = snapshot_from(CATALOG)
    many = [
        Instance(id=f"i{n}", host=f"10.1.0.{n}", port=80, meta={"zone": "eu-1"}) for n in range(50)
    ]
    for position in (0, 50):
        fields: dict[str, object] = {"id": "x", "host": "10.0.0.9", "port": 80, **unsafe}
        instances = list(many)
        instances.insert(position, Instance.model_construct(**fields))
        web = benign.services["web"].model_copy(update={"instances": tuple(instances)})
        services = {**benign.services, "web": web}
        snapshot = Snapshot.model_construct(revision=2, services=services, keys=benign.keys)
        twin = checker("upstreams.conf.j2").twin(snapshot)
        assert twin is not snapshot
        assert twin.services["web"] is not web
    services = {
        **benign.services,
        "web": benign.services["web"].model_copy(update={"instances": tuple(many)}),
    }
    all_benign = Snapshot.model_construct(revision=2, services=services, keys=benign.keys)
    assert checker("upstreams.conf.j2").twin(all_benign) is all_benign


def test_the_stock_templates_pass_with_structural_characters_in_a_reason() -> None:
    mark = HealthMark(status=State.DRAIN, reason='said "no"; {retry} #3')
    snapshot = hostile(snapshot_from(CATALOG), Instance(id="c", host="10.0.0.3", port=80))
    snapshot = hostile(snapshot, Instance(id="d", host="10.0.0.4", port=80, health=mark))
    check = checker("upstreams.conf.j2", "sites.conf.j2")
    twin = check.twin(snapshot)
    assert twin is not snapshot
    assert check.twin(snapshot).services["web"] is twin.services["web"]  # kept per service
    run_check(check, snapshot)


@pytest.mark.parametrize(
    ("host", "directive"),
    [
        ("10.0.0.9;\ninclude /etc/passwd", "include"),
        ("10.0.0.9; } server { listen 9999", "server"),
        ("10.0.0.9 #", "#"),
    ],
)
def test_the_stock_upstreams_template_refuses_an_injected_host(host: str, directive: str) -> None:
    snapshot = hostile(snapshot_from(CATALOG), Instance.model_construct(id="z", host=host, port=1))
    with pytest.raises(StructureViolation, match=f"added '{directive}'") as caught:
        run_check(checker("upstreams.conf.j2"), snapshot)
    assert caught.value.file == "/etc/nginx/conf.d/upstreams.conf.j2"


def test_the_stock_haproxy_template_refuses_a_program_section_through_its_slots(
    tmp_path: Path,
) -> None:
    """The HAProxy template reads instances through the driver's slots, not ``services``:
    the twin's extras carry the twin instances too."""
    from lbsync.config import HaproxyTarget
    from lbsync.drivers.haproxy.driver import HaproxyDriver

    src = STOCK.parent / "haproxy" / "haproxy.cfg.j2"
    config = tmp_path / "haproxy.cfg"
    target = HaproxyTarget.model_validate(
        {
            "name": "h",
            "driver": "haproxy",
            "config": str(config),
            "template": [{"src": str(src), "dest": str(config)}],
        }
    )
    driver = HaproxyDriver(target)
    check = StructureCheck(Renderer(), target.templates, driver.line_shape())

    def run(snapshot: Snapshot) -> None:
        extra = driver.template_context(snapshot)
        raw = check.keys(snapshot)
        rendered = {config: check.renderer.render(src, snapshot, extra, raw=raw)}
        check.check(snapshot, extra, rendered, raw)

    mark = HealthMark(status=State.DRAIN, reason='said "no"; {retry} #3')
    run(hostile(snapshot_from(CATALOG), Instance(id="c", host="10.0.0.3", port=80, health=mark)))
    evil = Instance.model_construct(
        id="d", host="10.0.0.4\nprogram pwn\n  command /bin/sh", port=80, weight=1
    )
    with pytest.raises(StructureViolation, match="added 'program'"):
        run(hostile(snapshot_from(CATALOG), evil))


def _without(snapshot: Snapshot, name: str) -> Snapshot:
    services = {n: s for n, s in snapshot.services.items() if n != name}
    return Snapshot.model_construct(revision=3, services=services, keys=snapshot.keys)


def test_a_kept_check_twins_each_round_as_a_fresh_one_would() -> None:
    """Rounds that change one service, turn it hostile and back, drop and add services:
    the check that looks only at what moved gives the twin a fresh check gives."""
    benign = snapshot_from(CATALOG)
    injected = Instance.model_construct(id="x", host="1.2.3.4; } x {", port=1)
    hostile_web = hostile(benign, injected)
    other = hostile(benign, Instance(id="y", host="10.0.0.7", port=80))
    rounds = [
        benign,
        hostile_web,  # the same names, one service a new object: the C pass
        hostile_web,
        _without(hostile_web, "api"),  # a name gone
        hostile_web,  # and back
        benign,  # hostile → benign: its twin is itself again
        _without(benign, "web"),
        other,  # added back, then changed
        hostile(other, injected),
    ]
    kept = checker("upstreams.conf.j2")
    for number, snapshot in enumerate(rounds):
        fresh = checker("upstreams.conf.j2").twin(snapshot)
        twin = kept.twin(snapshot)
        assert (twin is snapshot) == (fresh is snapshot), number
        assert list(twin.services) == list(fresh.services), number
        assert list(twin.services.values()) == list(fresh.services.values()), number
        if (
            snapshot.services.get("web") is not None
            and injected in snapshot.services["web"].instances
        ):
            with pytest.raises(StructureViolation, match="a value added"):
                run_check(kept, snapshot)
        else:
            run_check(kept, snapshot)
