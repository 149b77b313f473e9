"""The loop memo is exact: random templates over a changing catalog render byte for byte as
plain Jinja renders them (or fail with the same error), sandbox on and off.

Each example draws a template from loop shapes that qualify for the memo and shapes that
must fall back (``loop``, ``else``, ``{% set %}``, calls, macros, nested loops, names of
every type, undefined attributes), then a sequence of catalog changes; the same
``Renderer`` renders every snapshot of the sequence (so its memo carries over), and a
plain Jinja environment with the same options renders each one afresh.

Bounded for CI: ``LBSYNC_FUZZ_EXAMPLES`` (default 80) examples per test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
import jinja2.sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbsync.catalog import Catalog
from lbsync.errors import RenderError
from lbsync.model import KeyEvent, SourceEvents
from lbsync.render import _ENV_OPTIONS, CacheExtension, Renderer, template_context

EXAMPLES = int(os.environ.get("LBSYNC_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
P = "/lbsync"

QUALIFYING = [
    "{{ x.address }}",
    "{{ x.id }}={{ x.weight }}",
    "{{ x.state }}",
    "{% if x.up %}U{% elif x.draining %}D{% else %}-{% endif %}",
    "{{ x.meta | dictsort }}",
    "{{ x.meta['zone'] | default('none') }}",
    "{{ x.port + n }}",
    "{{ x.id | upper }}{{ x.id ~ word }}",
    "{{ '%s-%d' | format(x.id, x.port) }}",
    "{{ x.health.reason if x.health else '' }}",
    "{{ x.port is even }}",
    "{{ word }}{{ n }}{{ f }}",
    "{{ things }}",
    "{{ x }}",
    "{{ x.weight * 2 }},{{ -x.weight }},{{ x.id[:2] }}",
    "{{ service.name }}{{ tag }}",
    "{{ tag }}{{ x }}",
    "{{ x.nonexistent }}",  # undefined: both fail
    "{{ nothere }}",
]
FALLBACK = [
    "{{ x.meta.get('zone', '?') }}",  # a call
    "{{ loop.index }}/{{ loop.length }}",
    "{% set y = x.port %}{{ y }}",
    "{{ m(x) }}",  # a macro
    "{% for k in x.meta %}[{{ k }}{{ tag }}]{% endfor %}",  # nested: the inner one qualifies
]
ITERABLES = [
    "service.up",
    "service.instances",
    "service.draining",
    "service.instances | list",
    "service.instances | selectattr('up')",
    "service.instances | sort(attribute='port')",
    "service.up + service.draining",
    "[service.name, 'x']",
    "['x', 'y', tag]",
    "range(2)",
    "nothing_here",
    "3",
    "{'k': 1, 'j': 2}",
]
ELSES = [
    "{% else %}E{{ service.name }}",
    "{% else %}{% if tag %}{{ tag }}{% endif %}",
    "{% else %}{{ x }}",  # the loop variable in else: falls back
    "{% else %}{{ loop }}",
]
# Each sets ``tag`` per service, so a body reading it renders differently per service.
WRAPPERS = [
    "{% for service in services.values() %}{% set tag = service.name ~ '!' %}"
    "<{{ service.name }}:{body}>\n{% endfor %}",
    "{% set service = services['web'] if 'web' in services else none %}"
    "{% if service %}{body}{% endif %}\n",
    "{% macro block(service, tag) %}{body}{% endmacro %}"
    "{% for service in services.values() %}{{ block(service, service.name) }}|"
    "{{ block(service, 'same') }}\n{% endfor %}",
    "{% for service in services.values() %}{% set tag = service.name %}"
    "{% cache service %}{body}{% endcache %}\n{% endfor %}",
]
PRELUDE = (
    "{% macro m(i) %}<{{ i.id }}>{% endmacro %}"
    "{% set tag = 't' %}{% set n = @n %}{% set word = @word %}{% set f = @f %}"
    "{% set things = @things %}"
)


@st.composite
def templates(draw: st.DrawFn) -> str:
    loops = []
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.lists(st.sampled_from(QUALIFYING), min_size=1, max_size=3))
        if draw(st.integers(0, 3)) == 0:
            body.insert(draw(st.integers(0, len(body))), draw(st.sampled_from(FALLBACK)))
        iterable = draw(st.sampled_from(ITERABLES))
        tail = draw(st.sampled_from(["", "", "", *ELSES]))
        loops.append(f"{{% for x in {iterable} %}}({''.join(body)}){tail}{{% endfor %}}")
    wrapper = draw(st.sampled_from(WRAPPERS))
    prelude = PRELUDE
    for name, choices in (
        ("@things", ["[1, 2]", "{'a': 1}", "'t'", "(1,)"]),
        ("@word", ["'w'", "'1'", "1"]),
        ("@n", ["1", "True", "none", "2.5"]),
        ("@f", ["0.0", "-0.0", "'f'"]),
    ):
        prelude = prelude.replace(name, draw(st.sampled_from(choices)))
    return prelude + wrapper.replace("{body}", "".join(loops))


def instance(port: int, zone: str) -> bytes:
    return json.dumps({"host": f"10.0.0.{port % 250}", "port": port, "meta": {"zone": zone}})


changes = st.lists(
    st.tuples(
        st.sampled_from(["web", "api", "db"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["port", "drain", "down", "up", "delete"]),
        st.integers(1, 9000),
    ),
    min_size=1,
    max_size=6,
)


def event(revision: int, service: str, iid: str, what: str, port: int) -> KeyEvent:
    base = f"{P}/services/{service}"
    if what == "port":
        value = instance(port, "a" if port % 2 else "b")
        return KeyEvent(
            kind="put", key=f"{base}/instances/{iid}", value=value, mod_revision=revision
        )
    if what == "delete":
        return KeyEvent(kind="delete", key=f"{base}/instances/{iid}", mod_revision=revision)
    key = f"{base}/health/{iid}"
    return KeyEvent(kind="put", key=key, value=what.encode(), mod_revision=revision)


def plain_render(env: jinja2.Environment, source: str, catalog: Catalog) -> str:
    cache = env.extensions[CacheExtension.identifier]
    assert isinstance(cache, CacheExtension)
    cache.begin()
    ok = False
    try:
        text = env.from_string(source).render(template_context(catalog.snapshot()))
        ok = True
        return text
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    finally:
        cache.commit(ok)


def memo_render(renderer: Renderer, src: Path, catalog: Catalog) -> str:
    try:
        return renderer.render(src, catalog.snapshot()).decode()
    except RenderError as err:
        cause = err.__cause__
        return f"error: {type(cause).__name__}: {cause}"


def check(
    tmp_path: Path, source: str, steps: list[tuple[str, str, str, int]], sandbox: bool
) -> None:
    src = tmp_path / "t.j2"
    src.write_text(source)
    catalog = Catalog(P)
    catalog.apply(
        SourceEvents(
            revision=1,
            events=tuple(
                event(1, service, iid, "port", 8000 + n)
                for n, (service, iid) in enumerate(
                    (s, i) for s in ("web", "api") for i in ("a", "b", "c")
                )
            ),
        )
    )
    renderer = Renderer(sandbox=sandbox)
    cls = jinja2.sandbox.SandboxedEnvironment if sandbox else jinja2.Environment
    plain = cls(extensions=[CacheExtension], **_ENV_OPTIONS)
    for revision, step in enumerate([None, *steps], start=2):
        if step is not None:
            catalog.apply(SourceEvents(revision=revision, events=(event(revision, *step),)))
        assert memo_render(renderer, src, catalog) == plain_render(plain, source, catalog)


@FUZZ
@given(source=templates(), steps=changes, sandbox=st.booleans())
def test_memoised_loops_render_as_plain_jinja(
    tmp_path: Path, source: str, steps: list[tuple[str, str, str, int]], sandbox: bool
) -> None:
    check(tmp_path, source, steps, sandbox)
