"""Every example in docs/templates.md is rendered by lbsync's renderer and compared.

The page's conventions (stated at its top): a ```json catalog block sets the catalog for
the examples after it; each ```jinja block is followed by a ```text block with the exact
output, or a ```text error block with the render error; options after ``jinja`` add a
driver's names (``haproxy``, ``nginx-runtime``), render in the ``sandbox``, or have the
output checked by the LB (``check=nginx``, ``check=haproxy``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lbsync.config import HaproxyTarget, NginxTarget, TemplateSettings
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.drivers.nginx.driver import NginxDriver
from lbsync.errors import RenderError
from lbsync.model import Snapshot
from lbsync.render import Renderer
from lbsync.testing import FakeCatalog
from tests.harness.haproxy import HAPROXY
from tests.harness.nginx import NGINX

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "templates.md"
TEMPLATE_NAME = "example.conf.j2"  # what error messages in the page call the template

_FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```$", re.M | re.S)
_DRIVERS = ("haproxy", "nginx-runtime")
_CHECKS = ("check=nginx", "check=haproxy")


@dataclass(frozen=True)
class Example:
    line: int
    template: str
    expected: str
    error: bool
    catalog: Mapping[str, Any]
    options: frozenset[str]

    @property
    def driver(self) -> str | None:
        return next((o for o in self.options if o in _DRIVERS), None)

    @property
    def check(self) -> str | None:
        return next((o.removeprefix("check=") for o in self.options if o in _CHECKS), None)


def _examples() -> list[Example]:
    text = DOC.read_text(encoding="utf-8")
    blocks = [
        (text.count("\n", 0, m.start()) + 1, m[1], m[2].split(), m[3])
        for m in _FENCE.finditer(text)
    ]
    examples, catalog = [], None
    for (line, lang, opts, body), after in zip(blocks, [*blocks[1:], None], strict=True):
        if lang == "json" and opts == ["catalog"]:
            catalog = json.loads(body)
        elif lang == "jinja":
            assert after is not None, f"line {line}: no ```text after it"
            assert after[1] == "text", f"line {line}: no ```text after it"
            assert catalog is not None, f"line {line}: no ```json catalog before it"
            unknown = set(opts) - {*_DRIVERS, *_CHECKS, "sandbox"}
            assert not unknown, f"line {line}: unknown options {unknown}"
            assert after[2] in ([], ["error"]), f"line {after[0]}: ```text takes only 'error'"
            error = after[2] == ["error"]
            expected = after[3].rstrip("\n") if error else after[3]
            examples.append(Example(line, body, expected, error, catalog, frozenset(opts)))
    return examples


EXAMPLES = _examples()


def _driver_names(driver: str | None, snapshot: Snapshot, src: Path) -> Mapping[str, Any]:
    """What the driver adds to the context, from a target set as the page says."""
    template = [TemplateSettings(src=src, dest=Path("/etc/lb/out.conf"))]
    if driver == "haproxy":
        target = HaproxyTarget(
            name="haproxy",
            driver="haproxy",
            templates=template,
            config=src.parent / "no-live-haproxy.cfg",  # no live config: fresh slots
            admin_socket=Path("/run/haproxy/admin.sock"),
            state_file=Path("/var/lib/haproxy/server-state"),
        )
        return HaproxyDriver(target).template_context(snapshot)
    if driver == "nginx-runtime":
        nginx = NginxTarget(
            name="nginx",
            driver="nginx",
            templates=template,
            runtime=True,
            lua_dir=Path("/usr/share/lbsync/lua"),
        )
        return NginxDriver(nginx).template_context(snapshot)
    return {}


def render(example: Example, directory: Path) -> str:
    """The example's output, as the daemon renders it; raises RenderError."""
    src = directory / TEMPLATE_NAME
    src.write_text(example.template, encoding="utf-8")
    fake = FakeCatalog(example.catalog)
    assert fake.rejected == [], f"line {example.line}: the catalog has rejected values"
    snapshot = fake.snapshot()
    extra = _driver_names(example.driver, snapshot, src)
    renderer = Renderer(sandbox="sandbox" in example.options)
    return renderer.render(src, snapshot, extra).decode("utf-8")


def _ids(examples: list[Example]) -> list[str]:
    return [f"line{e.line}" for e in examples]


@pytest.mark.parametrize("example", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_renders_as_the_page_says(example: Example, tmp_path: Path) -> None:
    if example.error:
        with pytest.raises(RenderError) as caught:
            render(example, tmp_path)
        assert str(caught.value).replace(f"{tmp_path}/", "") == example.expected
    else:
        assert render(example, tmp_path) == example.expected


def test_the_page_has_an_example_of_every_function_and_driver() -> None:
    templates = "\n".join(e.template for e in EXAMPLES)
    for name in ("getv(", "gets(", "getvs(", "ls(", "lsdir(", "exists(", "{% cache "):
        assert name in templates, f"no example uses {name}"
    used = {o for e in EXAMPLES for o in e.options}
    assert used >= {*_DRIVERS, *_CHECKS, "sandbox"}
    assert any(e.error for e in EXAMPLES)


def test_whitespace_example_shows_the_one_line_trap() -> None:
    """The before/after pair of the whitespace section: same loop, with and without ``-``."""
    pairs = [e for e in EXAMPLES if "for instance in services.web.up" in e.template]
    dashed = [e for e in pairs if "{%- for" in e.template]
    plain = [e for e in pairs if "{% for" in e.template and "{%-" not in e.template]
    assert dashed, "the Jinja2-defaults version is gone"
    assert plain, "the lbsync version is gone"
    assert dashed[0].expected.count("\n") == 1  # everything on one line
    assert plain[0].expected.count("\n") == plain[0].expected.count("server") + 2


# --- the LB's own checker ---------------------------------------------------------------------

CHECKED = [e for e in EXAMPLES if e.check]


def _nginx_accepts(rendered: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a minimal nginx.conf that includes ``rendered`` in its http block."""
    (directory / "rendered.conf").write_text(rendered, encoding="utf-8")
    temp = "".join(
        f"    {kind}_temp_path {directory}/tmp-{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = directory / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"pid {directory}/nginx.pid;\n"
        + f"error_log {directory}/error.log;\n"
        + "events { worker_connections 64; }\n"
        + "http {\n"
        + f"{temp}"
        + f"    include {directory}/rendered.conf;\n"
        + "}\n"
    )
    error_log = str(directory / "error.log")
    argv = [NGINX, "-t", "-q", "-p", str(directory), "-c", str(conf), "-e", error_log]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


def _haproxy_accepts(rendered: str, directory: Path) -> subprocess.CompletedProcess[str]:
    config = directory / "haproxy.cfg"
    config.write_text(rendered, encoding="utf-8")
    argv = [HAPROXY, "-c", "-f", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


@pytest.mark.integration
@pytest.mark.parametrize("example", CHECKED, ids=_ids(CHECKED))
def test_cookbook_output_passes_the_lb_checker(example: Example, tmp_path: Path) -> None:
    rendered = render(example, tmp_path)
    check = _nginx_accepts if example.check == "nginx" else _haproxy_accepts
    done = check(rendered, tmp_path)
    assert done.returncode == 0, f"line {example.line}:\n{done.stdout}{done.stderr}"
