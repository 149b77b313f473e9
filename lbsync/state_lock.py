"""One lbsync per state_dir: an exclusive ``flock`` on ``<state_dir>/lock``.

Two daemons on one state directory (one per LB with the default ``/var/lib/lbsync``, or a
test and a prod prefix) overwrite each other's saved catalog, staging tree and backups.
``lbsync run`` holds the lock for its life, ``render --once`` for its one round; a second
one fails at once with one line naming the holder (its PID and config, written into the
file after the lock is taken). The kernel drops a ``flock`` with its holder's last file
descriptor, so a killed daemon leaves no stale lock: the file stays, its next holder
rewrites it. The file is opened relative to the state directory's descriptor, never
through a symlink (``O_NOFOLLOW``), and must be a regular file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from lbsync.errors import StageError, StateLocked
from lbsync.fileio import opened_dir, write_all

LOCK_FILE = "lock"
_HOLDER_MAX = 512  # bytes of the holder line shown; it is lbsync's own, but bounded anyway


class StateLock:
    """A held lock; ``release`` (or leaving the ``with`` block) lets the next holder in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def acquire(state_dir: Path, config: Path | None) -> StateLock:
    """Take the lock without waiting; raises ``StateLocked`` naming the holder if held."""
    path = state_dir / LOCK_FILE
    fd = _open(state_dir, create=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_line(fd)
        os.close(fd)
        raise StateLocked(
            f"{state_dir} is in use by {holder}: one lbsync per state_dir "
            "(stop it, or give this one another state_dir)",
            path=str(path),
            holder=holder,
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StageError(
            f"cannot lock the state directory: {exc.strerror}", path=str(path)
        ) from exc
    try:
        os.ftruncate(fd, 0)
        write_all(fd, f"lbsync pid {os.getpid()} (config {config or 'none'})\n".encode())
    except OSError as exc:
        os.close(fd)
        raise StageError(f"cannot write the lock file: {exc.strerror}", path=str(path)) from exc
    return StateLock(path, fd)


def holder(state_dir: Path) -> str | None:
    """Who holds the lock (its line), or None when no lbsync does.

    Probes with a shared lock, dropped at once: a daemon starting in that instant fails
    and says so, it is never silently doubled.
    """
    try:
        fd = _open(state_dir, create=False)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_line(fd)
        return None
    finally:
        os.close(fd)


def _open(state_dir: Path, *, create: bool) -> int:
    path = state_dir / LOCK_FILE
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
        with opened_dir(state_dir, create=create, follow_symlinks=False) as dir_fd:
            fd = os.open(LOCK_FILE, flags, 0o600, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StageError("the lock file is a symlink: refused", path=str(path)) from exc
        raise StageError(f"cannot open the lock file: {exc.strerror}", path=str(path)) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StageError("the lock file is not a regular file: refused", path=str(path))
    return fd


def _holder_line(fd: int) -> str:
    raw = os.pread(fd, _HOLDER_MAX, 0).decode("utf-8", "replace").strip()
    text = "".join(c if c.isprintable() else "?" for c in raw)
    return text or "another lbsync (it has not written its PID yet)"
