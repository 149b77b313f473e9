from pathlib import Path

import pytest

from lbsync.errors import RenderError
from lbsync.render import Renderer
from lbsync.testing import snapshot_from

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
