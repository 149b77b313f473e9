"""Whole-file reads and writes with few system calls: same results as ``open().read()``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lbsync.fileio import (
    atomic_write,
    open_dir,
    opened_dir,
    read_bytes,
    read_tail,
    touch,
    write_all,
    write_in_place,
)


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 370_406])
def test_read_bytes_reads_whole_files(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))

    assert read_bytes(path) == path.read_bytes()


def test_read_bytes_reads_proc_files_that_report_size_zero() -> None:
    data = read_bytes(f"/proc/{os.getpid()}/stat")

    assert os.stat(f"/proc/{os.getpid()}/stat").st_size == 0
    assert data.startswith(f"{os.getpid()} (".encode())


def test_read_bytes_raises_like_open(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        read_bytes(tmp_path)


def test_read_tail_reads_what_was_appended_bounded_and_after_rotation(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    log.write_bytes(b"old line\n")
    offset = log.stat().st_size
    with log.open("ab") as handle:
        handle.write(b"new 1\nnew 2\n")

    assert read_tail(log, offset, 1024) == b"new 1\nnew 2\n"
    assert read_tail(log, offset, 6) == b"new 2\n"
    log.write_bytes(b"rotated\n")  # shorter than the offset: read from the start
    assert read_tail(log, offset + 100, 1024) == b"rotated\n"


def test_write_all_writes_every_byte(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)

    assert (tmp_path / "out").read_bytes() == data


# --- writes relative to a directory descriptor ---------------------------------------------


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_the_name_with_mode_and_owner(tmp_path: Path) -> None:
    path = tmp_path / "f.conf"
    path.write_bytes(b"old")
    inode = path.stat().st_ino
    with opened_dir(tmp_path) as dir_fd:
        kept = atomic_write(dir_fd, "f.conf", b"new", mode=0o640, owner=(12345, 23456))

    info = path.stat()
    assert kept
    assert path.read_bytes() == b"new"
    assert info.st_ino != inode
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 12345, 23456)
    assert _temps(tmp_path) == []


def test_atomic_write_replaces_a_symlink_at_the_name_never_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    (tmp_path / "link").symlink_to(target)
    with opened_dir(tmp_path) as dir_fd:
        atomic_write(dir_fd, "link", b"new")

    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "link").read_bytes() == b"new"
    assert target.read_bytes() == b"untouched"


def test_atomic_write_removes_its_temp_file_when_the_rename_fails(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    with opened_dir(tmp_path) as dir_fd, pytest.raises(IsADirectoryError):
        atomic_write(dir_fd, "a-directory", b"new")

    assert _temps(tmp_path) == []


def test_write_in_place_keeps_the_inode_and_refuses_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "bind-mounted"
    path.write_bytes(b"a longer old content")
    inode = path.stat().st_ino
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    (tmp_path / "link").symlink_to(target)
    with opened_dir(tmp_path) as dir_fd:
        write_in_place(dir_fd, "bind-mounted", b"new", 0o600)
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            write_in_place(dir_fd, "link", b"new", 0o600)

    assert path.read_bytes() == b"new"
    assert path.stat().st_ino == inode
    assert target.read_bytes() == b"untouched"


def test_touch_creates_then_refreshes_and_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    with opened_dir(tmp_path) as dir_fd:
        touch(dir_fd, "stamp")
        os.utime(tmp_path / "stamp", (1_000_000, 1_000_000))
        touch(dir_fd, "stamp")
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            touch(dir_fd, "link")

    assert (tmp_path / "stamp").stat().st_mtime > 1_000_000
    assert not (tmp_path / "missing").exists()


def test_open_dir_creates_only_when_asked_and_can_refuse_a_symlinked_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_dir(tmp_path / "a" / "b")
    os.close(open_dir(tmp_path / "a" / "b", create=True))
    (tmp_path / "link").symlink_to(tmp_path / "a")
    os.close(open_dir(tmp_path / "link"))
    os.close(open_dir(tmp_path / "link" / "b", follow_symlinks=False))  # only the last one

    with pytest.raises(NotADirectoryError):  # O_DIRECTORY|O_NOFOLLOW on a link: ENOTDIR
        open_dir(tmp_path / "link", follow_symlinks=False)
    assert (tmp_path / "a" / "b").is_dir()


def test_read_bytes_can_refuse_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "target")

    assert read_bytes(tmp_path / "link") == b"x"
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        read_bytes(tmp_path / "link", follow_symlinks=False)
