"""The nginx control endpoint's shared secret: a file lbsync creates and nginx's master reads.

32 random bytes as 64 hex digits and a newline, mode 0600, owned by lbsync's user.
nginx's master reads it in ``init_by_lua`` (as root, before its workers drop privileges),
so no other local user needs to read it. lbsync refuses a token file that someone else
could have planted or read: a symlink (opened with ``O_NOFOLLOW``, also for its
directory), anything but a regular file, another owner, group write or any access for
others (0640 is accepted, for setups where nginx's master runs as a group member), or
content that is not a token. It never replaces such a file: an operator must look at it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path

from lbsync.errors import DriverError

TOKEN_BYTES = 32
ALLOWED_MODE = 0o640  # owner read/write, group read at most
_TOKEN = re.compile(r"([0-9a-f]{64})\n?")
_MAX_READ = 128


def load_or_create(path: Path, *, target: str) -> str:
    """The token in ``path``; a fresh one written there (0600) if the file does not exist.

    Raises DriverError, quoting the path and what is wrong with it.
    """
    parent = _open_directory(path.parent, target)
    try:
        try:
            return _read(path, parent, target)
        except FileNotFoundError:
            pass
        try:
            return _create(path, parent, target)
        except FileExistsError:  # created meanwhile (another lbsync): use that one
            return _read(path, parent, target)
    finally:
        os.close(parent)


def _open_directory(directory: Path, target: str) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "is a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else ""
        raise _error(directory, why or (exc.strerror or str(exc)), target) from exc


def _read(path: Path, parent: int, target: str) -> str:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path.name, flags, dir_fd=parent)
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = "is a symlink" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise _error(path, why, target) from exc
    try:
        _check_file(path, os.fstat(fd), target)
        data = os.read(fd, _MAX_READ)
    except OSError as exc:
        raise _error(path, exc.strerror or str(exc), target) from exc
    finally:
        os.close(fd)
    match = _TOKEN.fullmatch(data.decode("ascii", errors="replace"))
    if match is None:
        raise _error(path, f"is not {TOKEN_BYTES * 2} lowercase hex digits", target)
    return match.group(1)


def _check_file(path: Path, info: os.stat_result, target: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _error(path, "is not a regular file", target)
    if info.st_uid != os.geteuid():
        raise _error(path, f"is owned by uid {info.st_uid}, not lbsync's {os.geteuid()}", target)
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~ALLOWED_MODE:
        raise _error(path, f"has mode {mode:04o}; at most {ALLOWED_MODE:04o} is allowed", target)


def _create(path: Path, parent: int, target: str) -> str:
    token = secrets.token_hex(TOKEN_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path.name, flags, 0o600, dir_fd=parent)
    except FileExistsError:
        raise
    except OSError as exc:
        raise _error(path, f"cannot be created: {exc.strerror or exc}", target) from exc
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path.name, dir_fd=parent)  # no half-written token left behind
        raise _error(path, f"cannot be written: {exc.strerror or exc}", target) from exc
    finally:
        os.close(fd)
    return token


def _error(path: Path, why: str, target: str) -> DriverError:
    return DriverError(f"control token file {str(path)!r} {why}; refusing it", target=target)
