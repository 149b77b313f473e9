"""The saved catalog: written atomically, never through (or read from) a symlink, and never
loaded for another prefix or etcd cluster; loaded at start only when etcd cannot be read."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from lbsync import saved_catalog
from lbsync.errors import StageError
from lbsync.keymap import Buckets, KeyMap
from lbsync.model import Snapshot, SourceReset

PREFIX = "/lbsync"
ENDPOINTS = ("http://127.0.0.1:2379", "http://127.0.0.2:2379")
ORIGIN = saved_catalog.Origin(PREFIX, ENDPOINTS, 0xABC)
SNAPSHOT = Snapshot(revision=7, keys={"/services/web/instances/a": '{"host":"10.0.0.5"}'})


def _victim(tmp_path: Path) -> tuple[Path, tuple[int, bytes]]:
    victim = tmp_path / "elsewhere" / "passwd"
    victim.parent.mkdir()
    victim.write_bytes(b"root:x:0:0\n")
    return victim, (victim.stat().st_ino, victim.read_bytes())


def test_save_then_load_round_trips_through_a_private_file(tmp_path: Path) -> None:
    state = tmp_path / "state"

    path = saved_catalog.save(state, ORIGIN, SNAPSHOT)
    saved = saved_catalog.load(state, ORIGIN)

    assert path == state / saved_catalog.FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert saved is not None
    assert saved.reset.revision == 7
    assert [kv.key for kv in saved.reset.kvs] == ["/lbsync/services/web/instances/a"]
    assert saved.origin == ORIGIN
    assert saved.reset.cluster_id == 0xABC
    assert [p.name for p in state.iterdir()] == [saved_catalog.FILENAME]


def test_a_symlink_at_the_file_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim, before = _victim(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / saved_catalog.FILENAME).symlink_to(victim)

    path = saved_catalog.save(state, ORIGIN, SNAPSHOT)

    assert not path.is_symlink()
    assert (victim.stat().st_ino, victim.read_bytes()) == before


def test_a_symlink_at_the_file_name_is_not_read(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    saved_catalog.save(elsewhere, ORIGIN, SNAPSHOT)
    state = tmp_path / "state"
    state.mkdir()
    (state / saved_catalog.FILENAME).symlink_to(elsewhere / saved_catalog.FILENAME)

    assert saved_catalog.load(elsewhere, ORIGIN) is not None
    assert saved_catalog.load(state, ORIGIN) is None


def test_a_state_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    state = tmp_path / "state"
    state.symlink_to(real)

    with pytest.raises(StageError, match="cannot save the last applied catalog"):
        saved_catalog.save(state, ORIGIN, SNAPSHOT)

    assert os.listdir(real) == []


@pytest.mark.parametrize(
    ("current", "reason"),
    [
        (saved_catalog.Origin("/other", ENDPOINTS, 0xABC), "saved for prefix '/lbsync'"),
        (saved_catalog.Origin(PREFIX, ENDPOINTS, 0xDEF), "saved from etcd cluster abc"),
        (
            saved_catalog.Origin(PREFIX, ("http://10.0.0.9:2379",), 0),
            "saved from etcd http://127.0.0.1:2379, http://127.0.0.2:2379, lbsync reads",
        ),
    ],
)
def test_a_catalog_of_another_prefix_cluster_or_etcd_is_discarded(
    tmp_path: Path, current: saved_catalog.Origin, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    saved_catalog.save(tmp_path, ORIGIN, SNAPSHOT)

    assert saved_catalog.mismatch(ORIGIN, current) is not None
    assert reason in (saved_catalog.mismatch(ORIGIN, current) or "")
    assert saved_catalog.load(tmp_path, current) is None
    assert "catalog.discarded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "current",
    [
        ORIGIN,
        saved_catalog.Origin(PREFIX, ENDPOINTS, 0),  # the cluster is not known yet
        saved_catalog.Origin(PREFIX, (ENDPOINTS[1], "http://127.0.0.3:2379"), 0xABC),  # a member
    ],
)
def test_a_catalog_of_the_same_prefix_and_cluster_is_kept(current: saved_catalog.Origin) -> None:
    assert saved_catalog.mismatch(ORIGIN, current) is None


def test_an_older_catalog_without_endpoints_or_cluster_is_of_an_unknown_cluster_and_kept(
    tmp_path: Path,
) -> None:
    older = {"revision": 3, "saved_at": 1.0, "prefix": PREFIX, "keys": {"/k": "v"}}
    (tmp_path / saved_catalog.FILENAME).write_text(json.dumps(older))

    saved = saved_catalog.load(tmp_path, ORIGIN)

    assert saved is not None
    assert saved.origin == saved_catalog.Origin(PREFIX)
    assert [kv.key for kv in saved.reset.kvs] == ["/lbsync/k"]


def test_a_catalog_with_keys_of_the_wrong_shape_is_unreadable_not_an_exception(
    tmp_path: Path,
) -> None:
    bad = {"revision": 3, "saved_at": 1.0, "prefix": PREFIX, "keys": ["not", "a", "mapping"]}
    (tmp_path / saved_catalog.FILENAME).write_text(json.dumps(bad))

    assert saved_catalog.load(tmp_path, ORIGIN) is None


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_saved_catalog_is_due_only_when_etcd_is_not_read_within_the_timeout() -> None:
    clock = _Clock()
    fallback = saved_catalog.StartFallback(clock, timeout=5.0)

    assert not fallback.due(synced=False)
    clock.now = 104.9
    assert not fallback.due(synced=False)
    clock.now = 105.0
    assert fallback.due(synced=False)
    assert not fallback.due(synced=False)  # once


def test_the_saved_catalog_is_never_due_once_etcd_was_read() -> None:
    clock = _Clock()
    fallback = saved_catalog.StartFallback(clock, timeout=5.0)

    assert not fallback.due(synced=True)
    clock.now = 200.0
    assert not fallback.due(synced=False)


def test_with_etcd_readable_the_saved_catalog_is_never_rendered(tmp_path: Path) -> None:
    from lbsync.daemon import Daemon
    from lbsync.testing import FakeDriver, FakeSource
    from tests.harness.daemon import RunningDaemon
    from tests.harness.net import wait_for
    from tests.unit.test_daemon import content, make_settings

    settings = make_settings(tmp_path)
    out = tmp_path / "out.conf"
    stale = Snapshot(revision=99, keys={"/services/web/instances/old": "10.9.9.9:80"})
    saved_catalog.save(settings.state_dir, saved_catalog.Origin(PREFIX), stale)
    source = FakeSource({"services": {"web": {"instances": {"a": "10.0.0.1:80"}}}})
    daemon = Daemon(
        settings, source_factory=lambda _s: source, driver_factory=lambda _t: FakeDriver()
    )

    run = RunningDaemon(daemon)
    try:
        wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="etcd's catalog")
    finally:
        run.stop()

    assert [o.revision for o in run.outcomes] == [source.revision]
    assert daemon.health.saved_catalog_loaded_at is None


def _served_fallback(origin: saved_catalog.Origin) -> saved_catalog.StartFallback:
    fallback = saved_catalog.StartFallback(_Clock(), timeout=0.0)
    assert fallback.due(synced=False)
    fallback.loaded(saved_catalog.Saved(SourceReset(revision=1, kvs=()), 0.0, origin))
    return fallback


def test_a_fallback_catalog_of_another_cluster_is_reported_once_etcd_is_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fallback = _served_fallback(ORIGIN)

    fallback.read(saved_catalog.Origin(PREFIX, ENDPOINTS, 0xDEF))
    fallback.read(saved_catalog.Origin(PREFIX, ENDPOINTS, 0xDEF))

    out = capsys.readouterr().out
    assert out.count("catalog.discarded") == 1
    assert "saved from etcd cluster abc, etcd is cluster def" in out


def test_a_fallback_catalog_of_the_same_cluster_is_not_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _served_fallback(ORIGIN).read(ORIGIN)
    saved_catalog.StartFallback(_Clock(), timeout=5.0).read(ORIGIN)  # nothing was served

    assert "catalog.discarded" not in capsys.readouterr().out


def _document(path: Path, snapshot: Snapshot) -> bytes:
    """What one json.dumps of the whole catalog makes, with the file's own saved_at."""
    data = {
        "revision": snapshot.revision,
        "saved_at": json.loads(path.read_bytes())["saved_at"],
        "prefix": ORIGIN.prefix,
        "endpoints": list(ORIGIN.endpoints),
        "cluster_id": ORIGIN.cluster_id,
        "keys": dict(snapshot.keys),
    }
    return json.dumps(data, separators=(",", ":")).encode()


def test_saves_reusing_the_parts_encoded_before_write_the_whole_catalog(tmp_path: Path) -> None:
    """Groups and buckets shared with the last save are not encoded again; the file is
    byte for byte the catalog's JSON after changes, removals and an emptied group."""
    big = {f"/services/big/instances/i{n:05d}": f'{{"port":{n}}}' for n in range(5000)}
    web = {"/services/web/instances/a": '{"host":"10.0.0.5","note":"\\u00e9 \\"q\\""}'}
    big_buckets = Buckets.of(big)
    groups: dict[str, Mapping[str, str]] = {"": {"/other": "x"}, "big": big_buckets}
    groups["web"] = web
    snapshots = [KeyMap(dict(groups))]
    groups["web"] = {**web, "/services/web/instances/b": "ü"}  # a changed group
    snapshots.append(KeyMap(dict(groups)))
    buckets = list(big_buckets.buckets)
    buckets[3] = {}  # one bucket emptied, the others shared
    groups["big"] = Buckets(buckets)
    del groups[""]
    snapshots.append(KeyMap(dict(groups)))
    parts = saved_catalog.EncodedParts()
    for revision, keys in enumerate(snapshots, start=1):
        snapshot = Snapshot.model_construct(revision=revision, services={}, keys=keys)
        path = saved_catalog.save(tmp_path, ORIGIN, snapshot, parts)
        assert path.read_bytes() == _document(path, snapshot)
        saved = saved_catalog.load(tmp_path, ORIGIN)
        assert saved is not None
        assert len(saved.reset.kvs) == len(dict(keys))
