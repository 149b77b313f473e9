"""Whole-file reads and writes with as few system calls as they need, never through a
symlink lbsync did not expect.

Python's buffered ``open()`` asks ``fstat`` twice, ``isatty`` (an ioctl) and ``lseek``
twice before it reads: nine system calls for a small file where four do. A round reads
and writes some thirty files (the rendered file, the live and staged trees for the
listen pre-check, ``/proc`` while verifying), and on a VM, where each system call costs
microseconds, that showed up in ``bench rounds``.

Writes go relative to a directory file descriptor (``open_dir``): the directory's path
is operator config and resolved once, like any path in lbsync.toml (a symlinked
``/etc/nginx`` is fine); the file name in it is never followed (``O_NOFOLLOW``, and
``O_EXCL`` for every file created), so a symlink planted at a destination, temp or
backup name cannot redirect a write (docs/operations.md, "Files lbsync writes").
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator

_CHUNK = 64 * 1024
_TEMP_ATTEMPTS = 100  # like tempfile.mkstemp: a name taken (or planted) is skipped


def read_bytes(
    path: str | os.PathLike[str], *, dir_fd: int | None = None, follow_symlinks: bool = True
) -> bytes:
    """The whole file (``OSError`` as ``open`` raises it). ``/proc`` files work too.

    ``follow_symlinks=False``: a symlink at ``path`` fails with ``ELOOP``."""
    return read_bytes_and_stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)[0]


def read_bytes_and_stat(
    path: str | os.PathLike[str], *, dir_fd: int | None = None, follow_symlinks: bool = True
) -> tuple[bytes, os.stat_result]:
    """``read_bytes``, with the ``fstat`` of the file taken before its bytes were read
    (what a later ``stat`` compares with to tell whether the file moved since)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
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
                return b"".join(chunks), info
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


def open_dir(
    path: str | os.PathLike[str], *, create: bool = False, follow_symlinks: bool = True
) -> int:
    """A file descriptor of the directory ``path``; ``create``: made (parents too) when
    missing. ``follow_symlinks=False``: its last component must not be a symlink
    (``ENOTDIR``; for directories lbsync makes itself); the path before it is the
    operator's.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(path, exist_ok=True)
        return os.open(path, flags)


@contextlib.contextmanager
def opened_dir(
    path: str | os.PathLike[str], *, create: bool = False, follow_symlinks: bool = True
) -> Iterator[int]:
    """``open_dir`` as a context manager: the descriptor is closed on exit."""
    fd = open_dir(path, create=create, follow_symlinks=follow_symlinks)
    try:
        yield fd
    finally:
        os.close(fd)


def atomic_write(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    durable: bool = True,
    sync_dir: bool = True,
) -> bool:
    """Replace ``name`` in the directory ``dir_fd`` with ``data``, atomically.

    A new temp file next to it (``O_EXCL|O_NOFOLLOW``: a name already there, a planted
    symlink included, is skipped), written, given ``mode`` and ``owner`` (uid, gid),
    fsynced unless not ``durable``, renamed over ``name`` (which replaces a symlink there,
    never its target), then the directory fsynced when ``sync_dir``. On any ``OSError``
    the temp file is removed and the error raised: the caller sees ``errno`` (``EBUSY``,
    ``EXDEV``: a bind-mounted single file, rename impossible). Returns False when
    ``owner`` could not be given (not root), True otherwise.
    """
    fd, temp = _create_temp(dir_fd, name)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            owner_kept = _give(fd, owner)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    if sync_dir:
        fsync_dir(dir_fd)
    return owner_kept


def _create_temp(dir_fd: int, name: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TEMP_ATTEMPTS):
        temp = f".{name}.lbsync-{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temp, flags, 0o600, dir_fd=dir_fd), temp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", f".{name}.lbsync-*.tmp")


def _give(fd: int, owner: tuple[int, int] | None) -> bool:
    if owner is None:
        return True
    try:
        os.fchown(fd, *owner)
    except PermissionError:
        return False
    return True


def write_in_place(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Rewrite the file's own inode (a bind-mounted file): not atomic, but fsynced. Never
    through a symlink at ``name`` (``ELOOP``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    try:
        os.ftruncate(fd, 0)
        write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def touch(dir_fd: int, name: str, mode: int = 0o600) -> None:
    """Create ``name`` or set its mtime to now; a symlink there fails with ``ELOOP``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def fsync_dir(dir_fd: int) -> None:
    """Make renames in the directory durable (filesystems without dir fsync: a no-op)."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
