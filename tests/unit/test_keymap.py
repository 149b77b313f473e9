"""Snapshot keys grouped by service (``lbsync.keymap``) behave as the plain dict they replace.

A random sequence of puts and deletes goes to a ``Catalog`` and to a plain dict; after
every snapshot the snapshot's keys must read as that dict, every earlier snapshot must
still read as it did (a group shared with it is never written), and the comparisons
and compositions done group by group must equal the ones done key by key.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync.catalog import Catalog
from lbsync.keymap import KeyMap, differing, group_of, plain, with_groups_from
from lbsync.model import KeyEvent, Snapshot, SourceEvents, compose, service_prefix

P = "/p"
KEYS = [
    "/services/web/instances/a",
    "/services/web/instances/b",
    "/services/web/health/a",
    "/services/web/settings",
    "/services/api/instances/a",
    "/services/api/x/y",
    "/services/Bad/instances/a",
    "/services/web",
    "/services//instances/a",
    "/services",
    "/other/key",
    "/top",
]
VALUES = [b'{"host": "10.0.0.1", "port": 80}', b"10.0.0.2:81", b"down", b"x", b"\xff"]

steps = st.lists(
    st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.sampled_from(VALUES)), st.booleans()),
    max_size=40,
)


def reference_compose(
    keys: Mapping[str, str], base: Mapping[str, str], keep: Collection[str]
) -> dict[str, str]:
    """``compose``'s raw keys as they were computed before the groups: by prefix."""
    prefixes = tuple(service_prefix(name) for name in keep)
    out = {k: v for k, v in keys.items() if not k.startswith(prefixes)}
    out.update((k, v) for k, v in base.items() if k.startswith(prefixes))
    return out


def assert_reads_as(keys: Mapping[str, str], expected: dict[str, str]) -> None:
    assert plain(keys) == expected
    assert dict(keys) == expected
    assert len(keys) == len(expected)
    for key in KEYS:
        assert (key in keys) == (key in expected)
        assert keys.get(key) == expected.get(key)


@settings(max_examples=300, deadline=None, database=None)
@given(steps)
def test_snapshot_keys_read_as_a_plain_dict_and_never_change(
    script: list[tuple[str, bytes | None, bool]],
) -> None:
    catalog = Catalog(P)
    reference: dict[str, str] = {}
    taken: list[tuple[Snapshot, dict[str, str]]] = []
    for revision, (key, value, take) in enumerate(script, start=1):
        if value is None:
            event = KeyEvent(kind="delete", key=P + key, mod_revision=revision)
            reference.pop(key, None)
        else:
            event = KeyEvent(kind="put", key=P + key, value=value, mod_revision=revision)
            reference[key] = value.decode("utf-8", errors="replace")
        catalog.apply(SourceEvents(revision=revision, events=(event,)))
        if take:
            taken.append((catalog.snapshot(), dict(reference)))
    taken.append((catalog.snapshot(), dict(reference)))
    for snapshot, expected in taken:
        assert_reads_as(snapshot.keys, expected)
    for (old, old_expected), (new, new_expected) in itertools.pairwise(taken):
        expected_diff = {k for k, _ in old_expected.items() ^ new_expected.items()}
        assert differing(old.keys, new.keys) == expected_diff
        assert differing(old_expected, new_expected) == expected_diff
        for keep in (["web"], ["api", "web"], ["gone"]):
            composed = compose(old, new, keep)
            assert plain(composed.keys) == reference_compose(new_expected, old_expected, keep)


def test_an_unchanged_group_is_shared_between_snapshots() -> None:
    catalog = Catalog(P)
    put = KeyEvent(kind="put", key=P + "/services/web/instances/a", value=b"x", mod_revision=1)
    other = KeyEvent(kind="put", key=P + "/services/api/instances/a", value=b"y", mod_revision=2)
    catalog.apply(SourceEvents(revision=2, events=(put, other)))
    first = catalog.snapshot().keys
    again = KeyEvent(kind="put", key=P + "/services/web/instances/a", value=b"z", mod_revision=3)
    catalog.apply(SourceEvents(revision=3, events=(again,)))
    second = catalog.snapshot().keys
    assert isinstance(first, KeyMap)
    assert isinstance(second, KeyMap)
    assert first.groups()["api"] is second.groups()["api"]
    assert first.groups()["web"] is not second.groups()["web"]
    assert first["/services/web/instances/a"] == "x"
    assert differing(first, second) == {"/services/web/instances/a"}


def test_group_of() -> None:
    assert group_of("/services/web/instances/a") == "web"
    assert group_of("/services/web/") == "web"
    assert group_of("/services/web") == ""
    assert group_of("/services//a") == ""
    assert group_of("/other/web/a") == ""


def test_with_groups_from_plain_mappings() -> None:
    keys = {"/services/web/a": "1", "/services/api/a": "2", "/x": "3"}
    base = {"/services/web/b": "4", "/x": "5"}
    composed = with_groups_from(keys, base, ["web", "api"])
    assert plain(composed) == {"/services/web/b": "4", "/x": "3"}
