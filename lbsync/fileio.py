"""Whole-file reads and writes with as few system calls as they need.

Python's buffered ``open()`` asks ``fstat`` twice, ``isatty`` (an ioctl) and ``lseek``
twice before it reads: nine system calls for a small file where four do. A round reads
and writes some thirty files (the rendered file, the live and staged trees for the
listen pre-check, ``/proc`` while verifying), and on a VM, where each system call costs
microseconds, that showed up in ``bench rounds``.
"""

from __future__ import annotations

import os
import stat

_CHUNK = 64 * 1024


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file (``OSError`` as ``open`` raises it). ``/proc`` files work too."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode) and info.st_size > 0
        want = info.st_size + 1 if regular else _CHUNK  # /proc files say size 0
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, want)
            if chunk:
                chunks.append(chunk)
            if not chunk or (regular and len(chunk) < want):  # a short read is EOF here
                return b"".join(chunks)
            want = _CHUNK
    finally:
        os.close(fd)


def read_tail(path: str | os.PathLike[str], offset: int, limit: int) -> bytes:
    """What was appended since ``offset``, at most the last ``limit`` bytes; from the
    start when the file is now shorter than ``offset`` (it was rotated)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        start = offset if size >= offset else 0
        start = max(start, size - limit)
        return os.pread(fd, max(0, size - start), start)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
