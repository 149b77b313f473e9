"""Whole-file reads and writes with few system calls: same results as ``open().read()``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lbsync.fileio import read_bytes, read_tail, write_all


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
