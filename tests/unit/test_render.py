from pathlib import Path

import pytest

from lbsync.errors import RenderError
from lbsync.model import KeyEvent, SourceEvents
from lbsync.render import Renderer
from lbsync.testing import FakeCatalog, snapshot_from

CATALOG = {
    "services": {
        "web": {
            "instances": {
                "b": {"host": "10.0.0.2", "port": 80},
                "a": {"host": "10.0.0.1", "port": 80, "weight": 2},
                "c": {"host": "10.0.0.3", "port": 80},
            },
            "health": {"c": "drain"},
        },
        "api": {"instances": {"x": "10.1.0.1:9000"}},
    },
    "keys": {"/config/greeting": "hello", "/config/sub/key": "v"},
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_render_is_sorted_and_deterministic(tmp_path: Path) -> None:
    src = write(
        tmp_path,
        "t.j2",
        "{% for s in services.values() %}{{ s.name }}:"
        "{% for i in s.up %} {{ i.id }}={{ i.address }}/{{ i.weight }}{% endfor %}"
        " drain={{ s.draining | map(attribute='id') | list }}\n{% endfor %}",
    )
    renderer = Renderer()
    first = renderer.render(src, snapshot_from(CATALOG))
    assert first == (
        b"api: x=10.1.0.1:9000/1 drain=[]\nweb: a=10.0.0.1:80/2 b=10.0.0.2:80/1 drain=['c']\n"
    )
    assert Renderer().render(src, snapshot_from(CATALOG)) == first


def test_confd_style_key_functions(tmp_path: Path) -> None:
    src = write(
        tmp_path,
        "t.j2",
        "{{ getv('/config/greeting') }} {{ getv('/nope', 'dflt') }} {{ exists('/nope') }} "
        "{{ ls('/config') }} {{ lsdir('/config') }} {{ gets('/config/*')[0]['key'] }}\n",
    )
    out = Renderer().render(src, snapshot_from(CATALOG)).decode()
    assert out == "hello dflt False ['greeting', 'sub'] ['sub'] /config/greeting\n"


def test_undefined_names_fail_with_template_and_line(tmp_path: Path) -> None:
    src = write(tmp_path, "t.j2", "ok\n{{ services.web.nonexistent }}\n")
    with pytest.raises(RenderError) as info:
        Renderer().render(src, snapshot_from(CATALOG))
    assert info.value.template == str(src)
    assert info.value.line == 2


def test_missing_getv_key_is_a_render_error(tmp_path: Path) -> None:
    src = write(tmp_path, "t.j2", "{{ getv('/missing') }}")
    with pytest.raises(RenderError, match="/missing"):
        Renderer().render(src, snapshot_from(CATALOG))


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    src = write(tmp_path, "t.j2", "a\nb\n{% for x in %}\n")
    with pytest.raises(RenderError) as info:
        Renderer().load(src)
    assert info.value.line == 3


def test_sandbox_refuses_unsafe_attribute_access(tmp_path: Path) -> None:
    src = write(tmp_path, "t.j2", "{{ services.__class__.__mro__ }}")
    with pytest.raises(RenderError):
        Renderer(sandbox=True).render(src, snapshot_from(CATALOG))
    assert Renderer(sandbox=False).render(src, snapshot_from(CATALOG))


CACHED = (
    "{% for s in services.values() %}{% cache s %}{{ s.name }}:{{ count(s.name) }}"
    "{% for i in s.instances %} {{ i.address }}{% endfor %};{% endcache %}{% endfor %}"
)


def _counting() -> tuple[dict[str, int], dict[str, object]]:
    calls: dict[str, int] = {}

    def count(name: str) -> str:
        calls[name] = calls.get(name, 0) + 1
        return ""

    return calls, {"count": count}


@pytest.mark.parametrize("sandbox", [False, True])
def test_cache_block_is_reused_while_its_key_is_the_same_object(
    tmp_path: Path, sandbox: bool
) -> None:
    src = write(tmp_path, "t.j2", CACHED)
    catalog = FakeCatalog(CATALOG).catalog
    renderer = Renderer(sandbox=sandbox)
    calls, extra = _counting()
    first = renderer.render(src, catalog.snapshot(), extra)
    assert first == b"api: 10.1.0.1:9000;web: 10.0.0.1:80 10.0.0.2:80 10.0.0.3:80;"
    key = "/lbsync/services/api/instances/y"
    event = KeyEvent(kind="put", key=key, value=b"10.1.0.2:9000", mod_revision=2)
    catalog.apply(SourceEvents(revision=2, events=(event,)))
    second = renderer.render(src, catalog.snapshot(), extra)
    assert second == b"api: 10.1.0.1:9000 10.1.0.2:9000;" + first.split(b";")[1] + b";"
    assert calls == {"api": 2, "web": 1}  # web: the same object, its block reused
    assert Renderer(sandbox=sandbox).render(src, catalog.snapshot(), extra) == second


def test_cache_block_with_more_values_is_reused_only_while_they_are_equal(
    tmp_path: Path,
) -> None:
    src = write(
        tmp_path,
        "t.j2",
        "{% for s in services.values() %}{% cache s, s.name in marked %}"
        "{{ s.name }}{{ count(s.name) }}{% if s.name in marked %}*{% endif %};"
        "{% endcache %}{% endfor %}",
    )
    snapshot = snapshot_from(CATALOG)
    renderer = Renderer()
    calls, extra = _counting()

    assert renderer.render(src, snapshot, {**extra, "marked": ["web"]}) == b"api;web*;"
    assert renderer.render(src, snapshot, {**extra, "marked": ("web",)}) == b"api;web*;"
    assert calls == {"api": 1, "web": 1}  # equal values: both blocks reused
    assert renderer.render(src, snapshot, {**extra, "marked": []}) == b"api;web;"
    assert calls == {"api": 1, "web": 2}  # web's value changed: only web re-rendered


def test_cache_block_outside_a_loop(tmp_path: Path) -> None:
    src = write(
        tmp_path, "t.j2", "{% cache snapshot %}[{{ count('top') }}{{ revision }}]{% endcache %}"
    )
    snapshot = snapshot_from(CATALOG)
    renderer = Renderer(sandbox=True)
    calls, extra = _counting()

    assert renderer.render(src, snapshot, extra) == b"[1]"
    assert renderer.render(src, snapshot, extra) == b"[1]"
    assert calls == {"top": 1}


def test_failed_render_keeps_no_cache_entries(tmp_path: Path) -> None:
    src = write(tmp_path, "t.j2", CACHED + "{{ boom() }}")
    renderer = Renderer()
    snapshot = snapshot_from(CATALOG)
    calls, extra = _counting()

    def boom() -> str:
        raise RuntimeError("boom")

    for _ in range(2):
        with pytest.raises(RenderError):
            renderer.render(src, snapshot, {**extra, "boom": boom})
    assert calls == {"api": 2, "web": 2}
