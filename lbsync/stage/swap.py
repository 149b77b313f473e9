"""Swapping staged files into place: atomic rename, last-known-good backup, settle, restore.

Relative to a descriptor of the destination's directory (``fileio.atomic_write``):
temp file created ``O_EXCL|O_NOFOLLOW``, fsync, owner/mode copied, rename, fsync of the
directory (with ``settle_later``, both fsyncs wait for ``settle``, after the LB's signal).
A destination that is a symlink is refused (someone who can write to its
directory must not redirect lbsync's write to another file) unless its template sets
``follow_symlinks = true``: then the file the link leads to is replaced in its own
directory, the same way, and the operator's link is kept. Where a rename is impossible
(a bind-mounted single file gives ``EBUSY``/``EXDEV``; or no temp file can be created
next to it, as in a read-only directory) an existing file is rewritten in place
(``O_NOFOLLOW``) and fsynced. The previous bytes are kept in the ``SwapRecord`` (what
``restore`` uses) and as a file under ``backup_dir`` (last-known-good, for operators; not
fsynced, it is a convenience copy): the replaced file itself, hard-linked there before
the rename, where the filesystems allow it. ``backup_dir`` and the staging tree are
under ``state_dir``, which only lbsync may write to (``state_dir.prepare_state_dir``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from lbsync.errors import StageError
from lbsync.fileio import (
    atomic_write,
    fsync_dir,
    open_dir,
    opened_dir,
    read_bytes,
    read_bytes_and_stat,
    write_in_place,
)

log = structlog.get_logger("lbsync.stage")

DEFAULT_MODE = 0o644
# An existing file is rewritten in place when it cannot be renamed over (a bind-mounted
# single file: EBUSY/EXDEV) or no temp file can be created next to it (read-only dir).
_IN_PLACE_INSTEAD = frozenset({errno.EBUSY, errno.EXDEV, errno.EROFS, errno.EACCES, errno.EPERM})


@dataclass(frozen=True)
class SwapEntry:
    """One swapped file: what was there before (None = the file did not exist)."""

    path: Path
    previous: bytes | None
    backup: Path | None
    mode: int | None = None  # the previous file's mode, put back by restore
    # The previous file itself, hard-linked next to ``backup`` before the swap: ``settle``
    # renames it into place instead of writing the bytes again.
    previous_link: Path | None = None
    # Renamed into place before its data was fsynced (``settle_later``): ``settle`` does it.
    unsynced: bool = False


@dataclass(frozen=True)
class SwapRecord:
    """What ``swap_in`` changed, in order; ``restore`` undoes it.

    ``unsettled``: entries whose backup copy and directory fsync ``swap_in(settle_later=
    True)`` left for ``settle`` (emptied by it).
    """

    entries: tuple[SwapEntry, ...]
    backup_dir: Path
    unsettled: list[SwapEntry] = field(default_factory=list, compare=False)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(e.path for e in self.entries)


@dataclass(frozen=True)
class Seen:
    """A file's bytes as read, and the version of the file they were read from."""

    data: bytes
    version: tuple[int, ...]


def current_file(path: Path, *, follow_symlinks: bool = False) -> Seen | None:
    """``current_bytes``, with the version of the file read (for ``swap_in(seen=...)``)."""
    try:
        data, info = read_bytes_and_stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise _symlink_refused(path) from exc
        raise StageError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    return Seen(data, _version(info))


def current_bytes(path: Path, *, follow_symlinks: bool = False) -> bytes | None:
    """The file's bytes now, None if it does not exist.

    A symlink at ``path`` is refused (``StageError`` naming its target) unless
    ``follow_symlinks`` (the template's ``follow_symlinks = true``): then it is read
    through."""
    seen = current_file(path, follow_symlinks=follow_symlinks)
    return None if seen is None else seen.data


def swap_in(
    rendered: Mapping[Path, bytes],
    backup_dir: Path,
    *,
    modes: Mapping[Path, int] | None = None,
    follow_symlinks: Collection[Path] = (),
    settle_later: bool = False,
    seen: Mapping[Path, Seen | None] | None = None,
) -> SwapRecord:
    """Put every rendered file in place, atomically each, all or nothing across them.

    Files whose bytes are already on disk are left alone. ``modes`` forces a mode per
    destination (the template's ``mode``); otherwise the existing file's mode is kept and a
    new file gets 0644. A destination that is a symlink is refused (``StageError``), but
    for those in ``follow_symlinks``: their link is resolved and the file it leads to is
    replaced in its own directory. If any file fails, those already swapped are put back
    and ``StageError`` is raised.

    ``settle_later``: leave the backup copies, the fsync of each new file's data and of
    its directory to ``settle(record)``, so that a caller can signal the LB first. None
    of them changes what the LB reads: the new file is complete (in the page cache)
    before its rename, so any reader sees the old or the new file, both validated, and
    an lbsync crash changes nothing about that. A power loss before ``settle`` may lose
    the new file's data on a filesystem that does not flush a file renamed over another
    (XFS; ext4 and btrfs do): docs/failure-modes.md, "Files are never half-written".

    ``seen``: what the caller read of each destination (``current_file``). Its bytes are
    taken as the previous contents (backed up, put back by ``restore``) only if the file
    at the destination is still that version; otherwise the file is read again. A round
    at 100,000 instances spared a second read of its 3.7 MB file (bench scale).
    """
    done: list[SwapEntry] = []
    backup_root = Path(backup_dir)
    for dest in sorted(rendered):
        mode = (modes or {}).get(dest)
        path = Path(os.path.realpath(dest)) if dest in follow_symlinks else dest
        try:
            known = None if seen is None else seen.get(dest)
            entry = _swap_one(
                path, rendered[dest], backup_root, mode, settle_later=settle_later, known=known
            )
        except StageError as err:
            _undo(done, err)
            raise
        if entry is not None:
            done.append(entry)
    if done:
        log.debug("stage.swapped", files=[str(e.path) for e in done])  # apply.* says it too
    unsettled = list(done) if settle_later else []
    return SwapRecord(tuple(done), backup_root, unsettled)


def settle(record: SwapRecord) -> None:
    """Fsync the new files and their directories, write the backups: what
    ``swap_in(settle_later=True)`` left.

    Runs once per record (later calls do nothing). Failures are logged, not raised: the
    swap and the reload have happened, and restore works from the record's bytes.
    """
    while record.unsettled:
        entry = record.unsettled.pop(0)
        try:
            with opened_dir(entry.path.parent) as dir_fd:
                if entry.unsynced:
                    _fsync_at(dir_fd, entry.path.name)
                if entry.backup is not None and entry.previous_link is not None:
                    os.replace(entry.previous_link, entry.backup)  # never follows either name
                elif entry.backup is not None and entry.previous is not None:
                    _write_backup_file(entry.backup, entry.previous)
                fsync_dir(dir_fd)
        except (OSError, StageError) as exc:
            log.error("stage.settle_failed", path=str(entry.path), error=str(exc))


def restore(record: SwapRecord) -> None:
    """Put the previous contents back (last swapped first); remove files that were new."""
    failures: list[StageError] = []
    for entry in reversed(record.entries):
        try:
            _restore_one(entry)
        except StageError as err:
            failures.append(err)
            log.error("stage.restore_failed", error=err)
    if failures:
        first = failures[0]
        raise StageError(
            f"could not restore {len(failures)} file(s): {first.message}", path=first.path
        ) from first
    log.info("stage.restored", files=[str(e.path) for e in record.entries])


def _swap_one(
    path: Path,
    data: bytes,
    backup_dir: Path,
    mode: int | None,
    *,
    settle_later: bool = False,
    known: Seen | None = None,
) -> SwapEntry | None:
    """Swap one file, everything relative to its directory's descriptor: the name is
    looked at once (``lstat``), read (unless ``known`` is its version) and replaced
    without ever following a symlink."""
    with _directory_of(path) as dir_fd:
        old = _lstat_regular(dir_fd, path)
        if old is None:
            previous = None
        elif known is not None and known.version == _version(old):
            previous = known.data
        else:
            previous = _read_at(dir_fd, path)
        if previous == data:
            return None
        old_mode = None if old is None else stat.S_IMODE(old.st_mode)
        link = None
        backup: Path | None
        if settle_later and previous is not None:
            backup = _backup_path(backup_dir, path)  # put in place by settle()
            link = _link_previous(dir_fd, path, backup)
        else:
            backup = _write_backup(backup_dir, path, previous)
        renamed = _replace_at(dir_fd, path, data, mode, old, durable=not settle_later)
    if link is not None and not renamed:  # written in place: the link holds the new bytes
        _unlink_quietly(link)
        link = None
    return SwapEntry(path, previous, backup, old_mode, link, unsynced=settle_later and renamed)


@contextlib.contextmanager
def _directory_of(path: Path) -> Iterator[int]:
    """The descriptor of ``path``'s directory (created when missing). The directory's
    path is operator config, resolved like any path in lbsync.toml; only the file name in
    it is never followed."""
    try:
        dir_fd = open_dir(path.parent, create=True)
    except OSError as exc:
        raise StageError(
            f"cannot open the directory: {exc.strerror}", path=str(path.parent)
        ) from exc
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def _lstat_regular(dir_fd: int, path: Path) -> os.stat_result | None:
    """The file at ``path`` (None if there is none); a symlink there is refused."""
    try:
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StageError(f"cannot stat: {exc.strerror}", path=str(path)) from exc
    if stat.S_ISLNK(info.st_mode):
        raise _symlink_refused(path, dir_fd)
    return info


def _version(info: os.stat_result) -> tuple[int, ...]:
    """What changes with any write of the file: a rename gives another inode, a write in
    place moves the change time (``st_ctime_ns``; the size and mtime too, mostly)."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _read_at(dir_fd: int, path: Path) -> bytes | None:
    try:
        return read_bytes(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a symlink since the lstat
            raise _symlink_refused(path, dir_fd) from exc
        raise StageError(f"cannot read: {exc.strerror}", path=str(path)) from exc


def _symlink_refused(path: Path, dir_fd: int | None = None) -> StageError:
    try:
        target = os.readlink(path.name if dir_fd is not None else path, dir_fd=dir_fd)
    except OSError:
        return StageError("too many levels of symbolic links", path=str(path))
    return StageError(
        f"the destination is a symlink (to {target!r}); lbsync does not write through "
        "a symlink unless the template sets follow_symlinks = true",
        path=str(path),
    )


def _link_previous(dir_fd: int, path: Path, backup: Path) -> Path | None:
    """Hard-link the file about to be replaced next to its backup; None where impossible
    (another filesystem, protected_hardlinks): ``settle`` then copies the bytes. A link
    writes no data: no 370 KB copy per round (bench rounds). The link is made from the
    name in ``dir_fd`` without following it; its new name is in lbsync's own state_dir.

    One ``link`` call when the backup directory exists and no link is left over (every
    round but the first: ``settle`` renames the link away); the directory is made, or a
    link left over from a crash removed, only when that call says so."""
    link = backup.with_name(f".{backup.name}.lbsync-previous")
    try:
        try:
            _link_at(dir_fd, path, link)
        except FileNotFoundError:  # no backup directory yet (or the file just went)
            backup.parent.mkdir(parents=True, exist_ok=True)
            _link_at(dir_fd, path, link)
        except FileExistsError:  # left over from a crash
            _unlink_quietly(link)
            _link_at(dir_fd, path, link)
    except OSError as exc:
        log.debug("stage.backup_not_linked", path=str(path), reason=exc.strerror)
        return None
    return link


def _link_at(dir_fd: int, path: Path, link: Path) -> None:
    os.link(path.name, link, src_dir_fd=dir_fd, follow_symlinks=False)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _restore_one(entry: SwapEntry) -> None:
    path = entry.path
    with _directory_of(path) as dir_fd:
        if entry.previous is not None:
            _replace_at(dir_fd, path, entry.previous, entry.mode, _lstat_regular(dir_fd, path))
            return
        try:
            os.unlink(path.name, dir_fd=dir_fd)
            fsync_dir(dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StageError(f"cannot remove: {exc.strerror}", path=str(path)) from exc


def _undo(done: list[SwapEntry], cause: StageError) -> None:
    for entry in reversed(done):
        try:
            _restore_one(entry)
        except StageError as err:
            log.critical("stage.undo_failed", cause=cause, error=err)


def _backup_path(backup_dir: Path, dest: Path) -> Path:
    return backup_dir / str(dest).lstrip("/")


def _write_backup(backup_dir: Path, dest: Path, previous: bytes | None) -> Path | None:
    """Keep the previous bytes as ``<backup_dir>/<abs dest>``; away from any include glob."""
    backup = _backup_path(backup_dir, dest)
    if previous is None:
        try:
            backup.unlink(missing_ok=True)  # a stale copy would claim a file that wasn't there
        except OSError as exc:
            raise StageError(f"cannot write the backup: {exc.strerror}", path=str(backup)) from exc
        return None
    _write_backup_file(backup, previous)
    return backup


def _write_backup_file(backup: Path, previous: bytes) -> None:
    """A convenience copy for operators: atomic, not fsynced, readable by lbsync only."""
    try:
        with opened_dir(backup.parent, create=True, follow_symlinks=False) as dir_fd:
            atomic_write(dir_fd, backup.name, previous, mode=0o600, durable=False, sync_dir=False)
    except OSError as exc:
        raise StageError(f"cannot write the backup: {exc.strerror}", path=str(backup)) from exc


def _replace_at(
    dir_fd: int,
    path: Path,
    data: bytes,
    mode: int | None,
    old: os.stat_result | None,
    *,
    durable: bool = True,
) -> bool:
    """Atomically replace ``path`` (``old``: what is there now) with ``data``; in-place
    write where rename is impossible (always fsynced). ``durable``: the data is fsynced
    before the rename and the directory after it (what makes the rename itself durable);
    otherwise ``settle`` does both. True if renamed, False if written in place."""
    final_mode = mode if mode is not None else stat.S_IMODE(old.st_mode) if old else DEFAULT_MODE
    owner = None if old is None else (old.st_uid, old.st_gid)
    try:
        owner_kept = atomic_write(
            dir_fd,
            path.name,
            data,
            mode=final_mode,
            owner=owner,
            durable=durable,
            sync_dir=durable,
        )
    except OSError as exc:
        if old is None or exc.errno not in _IN_PLACE_INSTEAD:
            raise StageError(f"cannot replace: {exc.strerror or exc}", path=str(path)) from exc
        _in_place(dir_fd, path, data, final_mode, exc)
        return False
    if not owner_kept and owner is not None:
        # Not root: the new file is ours. Worth a warning, not a failed round.
        log.warning("stage.owner_not_kept", path=str(path), uid=owner[0], gid=owner[1])
    return True


def _fsync_at(dir_fd: int, name: str) -> None:
    """fsync the file ``name`` in ``dir_fd``: never through a symlink, never blocking on a
    FIFO that would have taken its place."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_place(dir_fd: int, path: Path, data: bytes, mode: int, why: OSError) -> None:
    log.info("stage.in_place", path=str(path), reason=errno.errorcode.get(why.errno or 0, "?"))
    try:
        write_in_place(dir_fd, path.name, data, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_refused(path, dir_fd) from exc
        raise StageError(f"cannot write in place: {exc.strerror}", path=str(path)) from exc
