"""The saved catalog: written atomically and never through (or read from) a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lbsync import saved_catalog
from lbsync.errors import StageError
from lbsync.model import Snapshot

PREFIX = "/lbsync"
SNAPSHOT = Snapshot(revision=7, keys={"/services/web/instances/a": '{"host":"10.0.0.5"}'})


def _victim(tmp_path: Path) -> tuple[Path, tuple[int, bytes]]:
    victim = tmp_path / "elsewhere" / "passwd"
    victim.parent.mkdir()
    victim.write_bytes(b"root:x:0:0\n")
    return victim, (victim.stat().st_ino, victim.read_bytes())


def test_save_then_load_round_trips_through_a_private_file(tmp_path: Path) -> None:
    state = tmp_path / "state"

    path = saved_catalog.save(state, PREFIX, SNAPSHOT)
    saved = saved_catalog.load(state, PREFIX)

    assert path == state / saved_catalog.FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert saved is not None
    assert saved.reset.revision == 7
    assert [kv.key for kv in saved.reset.kvs] == ["/lbsync/services/web/instances/a"]
    assert [p.name for p in state.iterdir()] == [saved_catalog.FILENAME]


def test_a_symlink_at_the_file_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim, before = _victim(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / saved_catalog.FILENAME).symlink_to(victim)

    path = saved_catalog.save(state, PREFIX, SNAPSHOT)

    assert not path.is_symlink()
    assert (victim.stat().st_ino, victim.read_bytes()) == before


def test_a_symlink_at_the_file_name_is_not_read(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    saved_catalog.save(elsewhere, PREFIX, SNAPSHOT)
    state = tmp_path / "state"
    state.mkdir()
    (state / saved_catalog.FILENAME).symlink_to(elsewhere / saved_catalog.FILENAME)

    assert saved_catalog.load(elsewhere, PREFIX) is not None
    assert saved_catalog.load(state, PREFIX) is None


def test_a_state_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    state = tmp_path / "state"
    state.symlink_to(real)

    with pytest.raises(StageError, match="cannot save the last applied catalog"):
        saved_catalog.save(state, PREFIX, SNAPSHOT)

    assert os.listdir(real) == []
