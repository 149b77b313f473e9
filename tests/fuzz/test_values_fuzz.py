"""Property-based fuzzing of every etcd value position (issue 17), through the stock templates.

(a) the catalog never raises, and every rejected put is exactly one rejection naming its key;
(b) whatever it accepts renders to a config that ``nginx -t`` / ``haproxy -c`` accepts;
(c) and that config has the structure rendered from a benign catalog of the same shape.

Bounded for CI: ``LBSYNC_FUZZ_EXAMPLES`` (default 80, ~20 s) examples per LB property, five times
that for the catalog-only one; each example is a whole catalog of up to 30 puts, checked
with one checker run. ``python -m bench fuzz --examples N`` runs it longer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from lbsync.catalog import Catalog
from lbsync.errors import InvalidValue
from lbsync.model import KeyEvent, KeyValue, SourceEvents
from tests.fuzz import lb
from tests.fuzz.strategies import P, catalogs

EXAMPLES = int(os.environ.get("LBSYNC_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Puts = list[tuple[str, bytes]]


# The operator's own service beside the fuzzed ones: HAProxy will not start (`haproxy -c`
# exits 2) without a listener, so every checked catalog has one.
ANCHOR = (f"{P}/services/anchor/settings", b'{"listen": "127.0.0.1:1"}')


def loaded(puts: Puts) -> tuple[Catalog, list[InvalidValue]]:
    """A catalog reset from ``puts`` (the last put of a key wins, as in etcd)."""
    rejected: list[InvalidValue] = []
    catalog = Catalog(P, on_reject=rejected.append)
    latest = dict(puts)
    catalog.load((KeyValue(key=k, value=v, mod_revision=1) for k, v in latest.items()), 1)
    return catalog, rejected


@settings(FUZZ, max_examples=EXAMPLES * 5)
@given(catalogs(resolvable_only=False))
def test_the_catalog_never_raises_and_rejects_each_key_once(puts: Puts) -> None:
    rejected: list[InvalidValue] = []
    catalog = Catalog(P, on_reject=rejected.append)
    for revision, (key, value) in enumerate(puts, start=1):
        before = len(rejected)
        event = KeyEvent(kind="put", key=key, value=value, mod_revision=revision)
        catalog.apply(SourceEvents(revision=revision, events=(event,)))
        new = rejected[before:]
        assert len(new) <= 1
        assert [err.key for err in new] == ([key] if key in catalog.rejected else [])
    catalog.snapshot()

    _, reset_rejected = loaded(puts)
    assert sorted(err.key for err in reset_rejected) == sorted(catalog.rejected)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.integration
@FUZZ
@given(catalogs())
def test_accepted_values_pass_nginx_t_with_the_benign_structure(workdir: Path, puts: Puts) -> None:
    snapshot = loaded([*puts, ANCHOR])[0].snapshot()
    files = lb.render_nginx(snapshot)
    checked = lb.check_nginx(workdir, files)
    assert checked.returncode == 0, checked.stderr + "\n".join(files.values())
    twin = lb.render_nginx(lb.benign_twin(snapshot))
    for name, text in files.items():
        assert lb.nginx_skeleton(text) == lb.nginx_skeleton(twin[name]), text


@pytest.mark.integration
@FUZZ
@given(catalogs())
def test_accepted_values_pass_haproxy_c_with_the_benign_structure(
    workdir: Path, puts: Puts
) -> None:
    snapshot = loaded([*puts, ANCHOR])[0].snapshot()
    text = lb.render_haproxy(snapshot, workdir)
    checked = lb.check_haproxy(workdir, text)
    assert checked.returncode == 0, checked.stdout + checked.stderr + text
    twin = lb.render_haproxy(lb.benign_twin(snapshot), workdir)
    assert lb.haproxy_skeleton(text) == lb.haproxy_skeleton(twin), text


def test_the_skeletons_see_an_injected_line() -> None:
    """The structure check can fail: a newline or ``;`` inside a value changes it."""
    good = "upstream a {\n    server 10.0.0.1:80 weight=1;\n}\n"
    bad = "upstream a {\n    server 10.0.0.1:80; include /x weight=1;\n}\n"
    assert lb.nginx_skeleton(good) != lb.nginx_skeleton(bad)
    assert lb.nginx_skeleton(good) != lb.nginx_skeleton(good.replace("80 ", "80 #"))
    ha = "backend a\n    server s1 10.0.0.1:80 id 1\n"
    assert lb.haproxy_skeleton(ha) != lb.haproxy_skeleton(ha.replace(":80", ":80\nprogram p"))
