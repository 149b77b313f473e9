"""lbsync's state directory: created 0750 when missing, refused when anyone else could write
there."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from lbsync.config import Settings
from lbsync.errors import ConfigError

STATE_DIR_MODE = 0o750


def prepare_state_dir(settings: Settings) -> Path:
    """Make sure ``state_dir`` is lbsync's alone before anything is written there.

    Created (parents too, as ``mkdir -p``; the directory itself 0750) when missing.
    Refused (``ConfigError``) when it is a symlink, not a directory, owned by another user
    than lbsync's effective uid, or group- or world-writable: whoever else could write
    there could plant the files lbsync writes and reads back (the staging tree, backups,
    the saved catalog, the confirm file). Symlinks in the path *before* it are the
    operator's and followed.
    """
    path = settings.state_dir
    try:
        info = _lstat_or_create(path)
    except OSError as exc:
        raise _state_dir_error(settings, f"cannot create {path}: {exc.strerror}") from exc
    euid = os.geteuid()
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = f"{path} is a symlink (to {os.readlink(path)!r}): give the real directory"
    elif not stat.S_ISDIR(info.st_mode):
        problem = f"{path} is not a directory"
    elif info.st_uid != euid:
        problem = (
            f"{path} is owned by uid {info.st_uid}, not by lbsync's user (uid {euid}): "
            f"chown it to uid {euid} or choose another state_dir"
        )
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = (
            f"{path} is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"another user could plant files lbsync writes or reads; chmod go-w {path}"
        )
    if problem is not None:
        raise _state_dir_error(settings, problem)
    return path


def _lstat_or_create(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another lbsync command made it meanwhile
            os.mkdir(path, STATE_DIR_MODE)
        return os.lstat(path)


def _state_dir_error(settings: Settings, message: str) -> ConfigError:
    return ConfigError(message, path=settings._where(), field="state_dir")
