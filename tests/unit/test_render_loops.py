"""The loop memo (lbsync.render_loops): which loops it takes, what it reuses, what it keeps.

tests/fuzz/test_render_loops_fuzz.py checks that its output is plain Jinja's for random
templates; these pin the behaviour down on known ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from lbsync import render_loops
from lbsync.catalog import Catalog
from lbsync.errors import RenderError
from lbsync.model import KeyEvent, KeyValue, SourceEvents
from lbsync.render import Renderer

P = "/lbsync"
PLAIN = (
    "{% for service in services.values() %}upstream {{ service.name }} {\n"
    "{% for i in service.up %}    server {{ i.address }} weight={{ i.weight }};\n"
    "{% endfor %}}\n{% endfor %}"
)


def _catalog(services: int, instances: int) -> Catalog:
    catalog = Catalog(P)
    kvs = [
        KeyValue(key=f"{P}/services/s{s}/instances/i{i:03d}", value=_value(s, i), mod_revision=1)
        for s in range(services)
        for i in range(instances)
    ]
    catalog.load(kvs, 1)
    return catalog


def _value(service: int, instance: int, port: int = 80) -> bytes:
    return f"10.{service}.0.{instance + 1}:{port}".encode()


def _put(catalog: Catalog, revision: int, key: str, value: bytes) -> None:
    event = KeyEvent(kind="put", key=f"{P}{key}", value=value, mod_revision=revision)
    catalog.apply(SourceEvents(revision=revision, events=(event,)))


@pytest.fixture
def rendered(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many loop bodies each memoised loop execution had to render."""
    counts: list[int] = []
    inner = render_loops._render_missing

    def counting(items: Any, found: list[str | None], pieces: Any, caller: Any, where: Any) -> bool:
        counts.append(found.count(None))
        return inner(items, found, pieces, caller, where)

    monkeypatch.setattr(render_loops, "_render_missing", counting)
    return counts


def _src(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.j2"
    path.write_text(text)
    return path


@pytest.mark.parametrize("sandbox", [False, True])
def test_a_change_renders_the_changed_instance_only(
    tmp_path: Path, rendered: list[int], sandbox: bool
) -> None:
    src, catalog, renderer = _src(tmp_path, PLAIN), _catalog(3, 50), Renderer(sandbox=sandbox)
    renderer.render(src, catalog.snapshot())
    assert rendered == [50, 50, 50]
    rendered.clear()
    _put(catalog, 2, "/services/s1/instances/i007", _value(1, 7, port=81))
    out = renderer.render(src, catalog.snapshot())
    assert rendered == [1]  # s0 and s2: the same tuples, one lookup each; s1: one body
    assert b"server 10.1.0.8:81 weight=1;" in out
    assert out == Renderer(sandbox=sandbox).render(src, catalog.snapshot())


def test_one_big_loop_compares_its_items_position_by_position(
    tmp_path: Path, rendered: list[int]
) -> None:
    src, catalog, renderer = _src(tmp_path, PLAIN), _catalog(1, 200), Renderer()
    renderer.render(src, catalog.snapshot())
    for revision, iid in enumerate((7, 7, 150), start=2):
        _put(catalog, revision, f"/services/s0/instances/i{iid:03d}", _value(0, iid, revision))
        out = renderer.render(src, catalog.snapshot())
        assert out == Renderer().render(src, catalog.snapshot())
        assert f"10.0.0.{iid + 1}:{revision} ".encode() in out
    assert rendered == [200] + [1, 200] * 3  # each change: 1 body; each fresh renderer: 200


def test_a_health_mark_moves_an_instance_out_of_the_up_view(
    tmp_path: Path, rendered: list[int]
) -> None:
    src, catalog, renderer = _src(tmp_path, PLAIN), _catalog(1, 20), Renderer()
    renderer.render(src, catalog.snapshot())
    rendered.clear()
    _put(catalog, 2, "/services/s0/health/i003", b"down")
    out = renderer.render(src, catalog.snapshot())
    assert rendered == [0]  # every remaining body reused, none rendered
    assert b"10.0.0.4:80" not in out
    assert out.count(b"server ") == 19


@pytest.mark.parametrize(
    "loop",
    [
        "{% for i in service.up %}{{ loop.index }} {{ i.address }};{% endfor %}",
        "{% for i in service.up %}{{ i.address }};{% else %}{{ i }};{% endfor %}",
        "{% for i in service.up %}{% set a = i.address %}{{ a }};{% endfor %}",
        "{% for i in service.up %}{{ i.meta.get('zone', '') }};{% endfor %}",
        "{% for i in service.up if i.weight %}{{ i.address }};{% endfor %}",
        "{% for i in service.up %}{{ i.address | random }};{% endfor %}",
        "{% for i in service.up %}{{ caller }};{% endfor %}",
        "{% autoescape true %}{% endautoescape %}"
        "{% for i in service.up %}{{ i.address }};{% endfor %}",
    ],
)
def test_loops_the_memo_cannot_prove_pure_render_as_plain_loops(
    tmp_path: Path, rendered: list[int], loop: str
) -> None:
    text = f"{{% for service in services.values() %}}{loop}{{% endfor %}}"
    catalog = _catalog(1, 3)
    with contextlib.suppress(RenderError):  # `caller` is undefined outside a call block
        Renderer().render(_src(tmp_path, text), catalog.snapshot())
    assert rendered == []


def test_a_loop_with_else_is_memoised_and_renders_else_when_empty(
    tmp_path: Path, rendered: list[int]
) -> None:
    text = (
        "{% for service in services.values() %}{{ service.name }}:"
        "{% for i in service.up %}{{ i.id }};{% else %}none{% endfor %}|{% endfor %}"
    )
    src, catalog, renderer = _src(tmp_path, text), _catalog(2, 2), Renderer()
    assert renderer.render(src, catalog.snapshot()) == b"s0:i000;i001;|s1:i000;i001;|"
    for revision, iid in enumerate(("i000", "i001"), start=2):
        _put(catalog, revision, f"/services/s1/health/{iid}", b"down")
    assert renderer.render(src, catalog.snapshot()) == b"s0:i000;i001;|s1:none|"
    assert rendered == [2, 2, 0]  # s0 reused whole, s1's empty loop renders nothing


def test_a_loop_whose_names_hold_other_types_renders_every_body(
    tmp_path: Path, rendered: list[int]
) -> None:
    text = (
        "{% set marks = {'i001': '*'} %}{% for service in services.values() %}"
        "{% for i in service.up %}{{ i.id }}{{ marks[i.id] | default('') }};{% endfor %}"
        "{% endfor %}"
    )
    src, catalog, renderer = _src(tmp_path, text), _catalog(1, 3), Renderer()
    assert renderer.render(src, catalog.snapshot()) == b"i000;i001*;i002;"
    assert renderer.render(src, catalog.snapshot()) == b"i000;i001*;i002;"
    assert rendered == []  # a dict may change under the same identity: never memoised


def test_a_loop_over_items_of_other_types_runs_as_the_plain_loop(
    tmp_path: Path, rendered: list[int]
) -> None:
    text = (
        "{% for n in range(3) %}{{ n }};{% else %}none{% endfor %}|"
        "{% for n in [] %}{% else %}E{% endfor %}"
    )
    assert Renderer().render(_src(tmp_path, text), _catalog(1, 1).snapshot()) == b"0;1;2;|E"
    assert rendered == [0]  # range(3): the plain loop; []: the memo, with nothing to render


def test_bodies_are_reused_only_with_the_same_values_of_the_other_names(
    tmp_path: Path, rendered: list[int]
) -> None:
    text = (
        "{% for service in services.values() %}{% for tag in ('a', 'b', 'a') %}"
        "{% for i in service.up %}{{ tag }}{{ i.id }};{% endfor %}|{% endfor %}{% endfor %}"
    )
    src, catalog, renderer = _src(tmp_path, text), _catalog(1, 2), Renderer()
    assert renderer.render(src, catalog.snapshot()) == b"ai000;ai001;|bi000;bi001;|ai000;ai001;|"
    assert rendered == [2, 2, 0]  # the third: tag 'a' again, every body from the first


def test_a_failed_render_keeps_the_bodies_it_rendered(tmp_path: Path, rendered: list[int]) -> None:
    src, catalog, renderer = _src(tmp_path, PLAIN + "{{ boom }}"), _catalog(1, 5), Renderer()
    for _ in range(2):
        with pytest.raises(RenderError, match="boom"):
            renderer.render(src, catalog.snapshot())
    assert rendered == [5, 0]  # each body is still a function of its item: kept


def test_the_sandbox_still_refuses_unsafe_attributes_inside_a_memoised_loop(
    tmp_path: Path, rendered: list[int]
) -> None:
    text = "{% for service in services.values() %}{% for i in service.up %}{{ i.__class__ }}"
    src = _src(tmp_path, text + "{% endfor %}{% endfor %}")
    with pytest.raises(RenderError, match="__class__"):
        Renderer(sandbox=True).render(src, _catalog(1, 2).snapshot())
    assert rendered == [2]  # the loop was memoised; its body ran in the sandbox


def test_pieces_of_replaced_instances_are_dropped(tmp_path: Path) -> None:
    src, catalog, renderer = _src(tmp_path, PLAIN), _catalog(1, 300), Renderer()
    for revision in range(2, 2000):
        port = 1000 + revision
        _put(catalog, revision, f"/services/s0/instances/i{revision % 300:03d}", _value(0, 1, port))
        renderer.render(src, catalog.snapshot())
    env = renderer._env_for(tmp_path)
    memo = env.extensions[render_loops.LoopMemo.identifier]
    assert isinstance(memo, render_loops.LoopMemo)
    (slot,) = memo._slots.values()
    held = sum(len(pieces.texts) for pieces in slot.pieces.values())
    assert 300 <= held <= 2 * 300 + 256


@pytest.mark.parametrize("sandbox", [False, True])
def test_memoised_loops_in_included_imported_and_extended_templates(
    tmp_path: Path, rendered: list[int], sandbox: bool
) -> None:
    """Templates loaded through others are parsed (and rewritten) while the environment
    already holds templates: the rewrite must not copy it."""
    (tmp_path / "base.j2").write_text("B{% block b %}base{% endblock %}E|")
    (tmp_path / "inc.j2").write_text("{% for i in services.s0.up %}<{{ i.id }}>{% endfor %}|")
    (tmp_path / "mac.j2").write_text(
        "{% macro f(s) %}{% for i in s.up %}({{ i.id }}){% endfor %}{% endmacro %}"
    )
    (tmp_path / "child.j2").write_text(
        "{% extends 'base.j2' %}{% block b %}{% for i in services.s0.up %}{{ i.id }}"
        "{% endfor %}{{ super() }}{% endblock %}"
    )
    src = _src(tmp_path, "{% include 'inc.j2' %}{% import 'mac.j2' as m %}{{ m.f(services.s0) }}")
    snapshot = _catalog(1, 2).snapshot()
    renderer = Renderer(sandbox=sandbox)
    assert renderer.render(src, snapshot) == b"<i000><i001>|(i000)(i001)"
    assert renderer.render(tmp_path / "child.j2", snapshot) == b"Bi000i001baseE|"
    assert rendered == [2, 2, 2]


def test_a_mutable_item_after_kept_ones_is_rendered_every_time(tmp_path: Path) -> None:
    """The first item decides the memo path; a dict further on must not be reused, nor
    the loop as a whole, though the tuple holding it is the same object."""
    text = "{% for x in extra %}{{ x }};{% endfor %}"
    counts = {"n": 1}
    items = ("a", counts)
    src, snapshot, renderer = _src(tmp_path, text), _catalog(1, 1).snapshot(), Renderer()
    assert renderer.render(src, snapshot, {"extra": items}) == b"a;{'n': 1};"
    counts["n"] = 2
    assert renderer.render(src, snapshot, {"extra": items}) == b"a;{'n': 2};"


def test_loops_inside_a_cache_block_are_left_to_it(tmp_path: Path, rendered: list[int]) -> None:
    """The cache block keeps its whole output already: memoising its loops too would hold
    the same text twice."""
    text = (
        "{% for service in services.values() %}{% cache service %}"
        "{% for i in service.up %}{{ i.id }};{% endfor %}{% endcache %}{% endfor %}"
    )
    src, catalog, renderer = _src(tmp_path, text), _catalog(2, 2), Renderer()
    assert renderer.render(src, catalog.snapshot()) == b"i000;i001;i000;i001;"
    assert rendered == []
