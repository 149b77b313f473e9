"""Snapshot keys grouped by service (``lbsync.keymap``) behave as the plain dict they replace.

A random sequence of puts and deletes goes to a ``Catalog`` and to a plain dict; after
every snapshot the snapshot's keys must read as that dict, every earlier snapshot must
still read as it did (a group shared with it is never written), and the comparisons
and compositions done group by group must equal the ones done key by key.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync import keymap
from lbsync.catalog import Catalog
from lbsync.keymap import Buckets, KeyMap, as_groups, differing, group_of, with_groups_from
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
    assert dict(keys) == expected
    assert dict(keys) == expected
    assert len(keys) == len(expected)
    for key in KEYS:
        assert (key in keys) == (key in expected)
        assert keys.get(key) == expected.get(key)


@settings(max_examples=300, deadline=None, database=None)
@given(steps, st.sampled_from([keymap.BIG_GROUP, 0, 1, 2]))
def test_snapshot_keys_read_as_a_plain_dict_and_never_change(
    script: list[tuple[str, bytes | None, bool]], big_group: int
) -> None:
    """``big_group``: groups past it are held as Buckets (4,096 keys in the daemon)."""
    catalog = Catalog(P)
    patch = pytest.MonkeyPatch()
    patch.setattr(keymap, "BIG_GROUP", big_group)
    try:
        _check_snapshot_keys(catalog, script)
    finally:
        patch.undo()


def _check_snapshot_keys(catalog: Catalog, script: list[tuple[str, bytes | None, bool]]) -> None:
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
            assert dict(composed.keys) == reference_compose(new_expected, old_expected, keep)


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
    assert dict(composed) == {"/services/web/b": "4", "/x": "3"}


BUCKET_KEYS = [f"/services/big/instances/i{n}" for n in range(40)] + ["/", "/a", "/x/yz"]


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(BUCKET_KEYS), st.one_of(st.none(), st.sampled_from("abc"))),
        max_size=80,
    )
)
def test_buckets_behave_as_a_dict_under_puts_and_deletes(
    script: list[tuple[str, str | None]],
) -> None:
    """A group held as Buckets (here from its first key) reads as the dict it replaces
    after any sequence of puts and deletes, and every earlier snapshot's version of it
    still reads as it did: the buckets a snapshot holds are never written."""
    patch = pytest.MonkeyPatch()
    patch.setattr(keymap, "BIG_GROUP", 0)
    try:
        catalog = Catalog(P)
        reference: dict[str, str] = {}
        taken: list[tuple[Mapping[str, str], dict[str, str]]] = []
        for revision, (key, value) in enumerate(script, start=1):
            if value is None:
                event = KeyEvent(kind="delete", key=P + key, mod_revision=revision)
                reference.pop(key, None)
            else:
                event = KeyEvent(
                    kind="put", key=P + key, value=value.encode(), mod_revision=revision
                )
                reference[key] = value
            catalog.apply(SourceEvents(revision=revision, events=(event,)))
            keys = catalog.snapshot().keys
            taken.append((keys, dict(reference)))
            group = as_groups(keys).get("big")
            assert group is None or isinstance(group, Buckets)
        for keys, expected in taken:
            assert_reads_as(keys, expected)
            for key in BUCKET_KEYS:
                assert keys.get(key) == expected.get(key)
                assert (key in keys) == (key in expected)
            group = as_groups(keys).get("big")
            if group is not None:
                big = {k: v for k, v in expected.items() if k.startswith("/services/big/")}
                assert dict(group.items()) == big
                assert len(group) == len(big)
                assert sorted(group) == sorted(big)
    finally:
        patch.undo()


def test_a_write_to_a_big_group_copies_one_bucket() -> None:
    catalog = Catalog(P)
    events = tuple(
        KeyEvent(kind="put", key=f"{P}/services/big/instances/i{n:05d}", value=b"10.0.0.1:80",
                 mod_revision=1)
        for n in range(keymap.BIG_GROUP + 1)
    )  # fmt: skip
    catalog.apply(SourceEvents(revision=1, events=events))
    before = as_groups(catalog.snapshot().keys)["big"]
    key = "/services/big/instances/i00042"
    put = KeyEvent(kind="put", key=P + key, value=b"10.0.0.2:80", mod_revision=2)
    catalog.apply(SourceEvents(revision=2, events=(put,)))
    after = as_groups(catalog.snapshot().keys)["big"]
    assert isinstance(before, Buckets)
    assert isinstance(after, Buckets)
    written = [
        n
        for n, (old, new) in enumerate(zip(before.buckets, after.buckets, strict=True))
        if old is not new
    ]
    assert written == [keymap.bucket_of(key)]
    assert before[key] == "10.0.0.1:80"
    assert after[key] == "10.0.0.2:80"
    assert differing(catalog.snapshot().keys, KeyMap({"big": before})) == {key}


@given(st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=2), max_size=50))
def test_buckets_of_a_mapping_put_each_key_where_bucket_of_says(keys: dict[str, str]) -> None:
    """``Buckets.of`` computes the buckets in C passes (keys of two characters or more) or
    a call per key: either way where ``bucket_of`` puts them, which reads use."""
    group = Buckets.of(keys)
    for key, value in keys.items():
        assert group.buckets[keymap.bucket_of(key)][key] == value
    assert dict(group.items()) == keys
