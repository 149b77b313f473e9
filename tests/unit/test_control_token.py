"""The nginx control token file: created 0600, and refused when anyone could have planted
or read it."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from lbsync.drivers.nginx.control_token import load_or_create
from lbsync.errors import DriverError

GOOD = "ab" * 32


def test_a_missing_file_is_created_0600_with_a_fresh_token(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    old_umask = os.umask(0)  # a careless umask must not widen the mode
    try:
        token = load_or_create(path, target="web")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"{token}\n"
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert load_or_create(path, target="web") == token  # read back, not replaced
    assert load_or_create(tmp_path / "other.token", target="web") != token


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_an_existing_private_token_is_used(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "control.token"
    path.write_text(GOOD + "\n")
    path.chmod(mode)
    assert load_or_create(path, target="web") == GOOD


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o604, 0o4600, 0o700])
def test_a_file_with_wider_permissions_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "control.token"
    path.write_text(GOOD)
    path.chmod(mode)
    with pytest.raises(DriverError, match=f"has mode {mode:04o}") as caught:
        load_or_create(path, target="web")
    assert str(path) in str(caught.value)
    assert path.read_text() == GOOD  # never replaced


def test_a_symlink_is_refused_even_to_a_good_token(tmp_path: Path) -> None:
    real = tmp_path / "real.token"
    real.write_text(GOOD)
    real.chmod(0o600)
    link = tmp_path / "control.token"
    link.symlink_to(real)
    with pytest.raises(DriverError, match="is a symlink"):
        load_or_create(link, target="web")
    dangling = tmp_path / "dangling.token"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DriverError, match="is a symlink"):
        load_or_create(dangling, target="web")
    assert not (tmp_path / "nowhere").exists()  # not created through the link


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(DriverError, match="symlink or not a directory"):
        load_or_create(tmp_path / "linked" / "control.token", target="web")
    assert list((tmp_path / "real").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    path.write_text(GOOD)
    path.chmod(0o600)
    os.chown(path, 65534, -1)
    with pytest.raises(DriverError, match="owned by uid 65534"):
        load_or_create(path, target="web")


def test_a_directory_or_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.token").mkdir(mode=0o700)
    with pytest.raises(DriverError, match="not a regular file"):
        load_or_create(tmp_path / "dir.token", target="web")
    os.mkfifo(tmp_path / "fifo.token", 0o600)
    with pytest.raises(DriverError, match="not a regular file"):
        load_or_create(tmp_path / "fifo.token", target="web")


@pytest.mark.parametrize(
    "content", ["", "ab" * 31, "ab" * 33, "AB" * 32, GOOD + "\n\n", GOOD + " ", "zz" * 32]
)
def test_content_that_is_not_a_token_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "control.token"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(DriverError, match="64 lowercase hex digits"):
        load_or_create(path, target="web")


def test_a_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="control token file") as caught:
        load_or_create(tmp_path / "absent" / "control.token", target="web")
    assert "absent" in str(caught.value)
