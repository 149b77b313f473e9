"""The staging tree: the LB's config as it would be loaded, with the new files in place.

Staging: the LB's checker must see the *whole* config as it would be loaded, with the new
files in place and without touching a live file. We mirror the directory of the target's
main config (``/etc/nginx``) into a fresh directory (hard links where possible, copies
where a path must change), write the rendered files into it, and rewrite absolute paths
in every text file of the mirror so that an ``include /etc/nginx/conf.d/*.conf;`` reads
the staged fragments, not the live ones.
Destinations outside that directory are staged under ``<staged>/.lbsync-external/<abs
path>`` and references to them (exact, or through a glob such as
``include /srv/lb/*.conf``) are rewritten the same way.

Symlinks in the staged copy are followed the way the LB would follow them: absolute links
that point into the live tree are re-pointed into the staged copy.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import re
import shutil
import stat
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import structlog

from lbsync.errors import StageError
from lbsync.fileio import (
    write_all,
)
from lbsync.stage.swap import DEFAULT_MODE

log = structlog.get_logger("lbsync.stage")

EXTERNAL_DIR = ".lbsync-external"
_GLOB_CHARS = frozenset("*?[")
# An absolute path token in a config file: starts with "/" at the start of a word, after a
# quote, "=", ":" or an opening bracket, and runs to whitespace or config punctuation.
# "http://host/etc/nginx/x" is not a match (the token found there starts with "//").
_PATH_TOKEN = re.compile(rb"""(?<![^\s'"=:(,{;])/[^\s;'"{}(),]*""")


@dataclass(frozen=True)
class StagedConfig:
    """A staged copy of a target's config tree, with the new files in place.

    ``main`` is where the target's main config (``config`` in lbsync.toml) sits in the
    staged tree, rewritten so that it reads staged files, never live ones; ``files`` maps
    each destination path to its staged copy, and ``contents`` each staged copy to the
    bytes written there (so a driver need not read back what was just written).
    """

    root: Path
    main: Path | None
    files: Mapping[Path, Path]
    contents: Mapping[Path, bytes] = field(default_factory=dict)

    def live_paths(self, text: str, live_dir: str) -> str:
        """``text`` (a checker's report) with staged paths named as the operator knows
        them: the staged tree is ``live_dir`` (the main config's directory), and a file
        staged from outside it is under ``EXTERNAL_DIR`` by its absolute path."""
        root = str(self.root)
        text = text.replace(f"{root}/{EXTERNAL_DIR}/", "/")
        return text.replace(root, live_dir)


class StagedTarget(Protocol):
    """What staging reads of a target's settings (every ``config.Target`` has both)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> Path | None:
        """The main config whose directory is mirrored; None: the rendered files only."""


def stage_files(
    target: StagedTarget, rendered: Mapping[Path, bytes], workdir: Path
) -> StagedConfig:
    """Build a staged copy of ``target``'s config tree with ``rendered`` in place.

    ``target.config`` (may be None, as for the command driver) names the main config
    whose directory is copied. The caller removes
    the staged tree (``staged()`` does it for you).
    """
    return _new_tree(target, rendered, workdir)[0]


def _new_tree(
    target: StagedTarget, rendered: Mapping[Path, bytes], workdir: Path
) -> tuple[StagedConfig, _Stager]:
    config = target.config
    workdir = Path(os.path.abspath(workdir))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        stage_dir = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=workdir))
    except OSError as exc:
        raise StageError(
            f"cannot create a staging directory: {exc.strerror}", path=str(workdir)
        ) from exc
    try:
        tree, stager = _build(stage_dir, config, rendered)
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    log.debug("stage.built", root=str(stage_dir), files=len(rendered))
    return tree, stager


@contextlib.contextmanager
def staged(
    target: StagedTarget, rendered: Mapping[Path, bytes], workdir: Path
) -> Iterator[StagedConfig]:
    """``stage_files`` as a context manager: the staged tree is removed on exit."""
    tree = stage_files(target, rendered, workdir)
    try:
        yield tree
    finally:
        shutil.rmtree(tree.root, ignore_errors=True)


class StagingArea:
    """One target's staged tree, kept from round to round and rebuilt only when needed.

    Building a tree costs a directory or an inode per live file: ~9 ms for a Debian-like
    ``/etc/nginx`` on an ext4 VM disk (~0.7 ms per mkdir or create), paid on every round
    before. Now each round first compares the live tree with what the staged copy was
    built from (one ``lstat`` per entry: inode, mode, size, mtime, ctime; the rendered
    destinations themselves excluded) and, when nothing else changed, only rewrites the
    rendered files whose bytes differ from the last ones staged. Any change in the live
    tree, a re-pointed symlinked destination, or a destination outside the config
    directory (staged with mirrored globs) means a fresh tree, exactly as ``staged()``
    builds it. The tree is removed by ``close()``, or when the area is collected/at exit.
    """

    def __init__(self, target: StagedTarget, workdir: Path) -> None:
        self.target = target
        self.workdir = workdir
        self._tree: StagedConfig | None = None
        self._stager: _Stager | None = None
        self._fingerprint: object = None
        self._written: dict[Path, bytes] = {}
        self._remove: weakref.finalize[Any, Any] | None = None

    @contextlib.contextmanager
    def staged(self, rendered: Mapping[Path, bytes]) -> Iterator[StagedConfig]:
        fingerprint = self._live_fingerprint(rendered)
        tree = self._tree
        reusable = tree is not None and fingerprint is not None and self._intact(tree)
        if tree is None or not reusable or fingerprint != self._fingerprint:
            tree = self._rebuild(rendered, fingerprint)
        else:
            self._rewrite(rendered)
        assert self._stager is not None
        yield replace(tree, contents=MappingProxyType(dict(self._stager.contents)))

    def _rebuild(self, rendered: Mapping[Path, bytes], before: object) -> StagedConfig:
        self.close()
        tree, self._stager = _new_tree(self.target, rendered, self.workdir)
        self._tree = tree
        self._remove = weakref.finalize(self, shutil.rmtree, tree.root, True)
        self._written = dict(rendered)
        # Hard-linking a live file changes its ctime: remember the tree as it is after the
        # build, unless something but ctimes changed while building (then: rebuild next).
        after = self._live_fingerprint(rendered)
        self._fingerprint = after if _sans_ctime(after) == _sans_ctime(before) else None
        return tree

    @staticmethod
    def _intact(tree: StagedConfig) -> bool:
        """The staged tree is still there (nobody cleaned the state directory under us)."""
        return os.path.isdir(tree.root) and (tree.main is None or os.path.lexists(tree.main))

    def _rewrite(self, rendered: Mapping[Path, bytes]) -> None:
        assert self._stager is not None
        try:
            for dest, data in rendered.items():
                if self._written.get(dest) != data:
                    self._written.pop(dest, None)
                    self._stager.overwrite_rendered(dest, data)
                    self._written[dest] = data
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the staged tree (the next round builds a fresh one)."""
        if self._remove is not None:
            self._remove()
        self._tree = self._stager = self._remove = self._fingerprint = None
        self._written = {}

    def _live_fingerprint(self, rendered: Mapping[Path, bytes]) -> object:
        """What the staged tree depends on, cheaply; None: do not reuse (always rebuild)."""
        config = self.target.config
        dests = tuple(sorted((os.path.abspath(d), os.path.realpath(d)) for d in rendered))
        if config is None:
            return ("", dests, ())  # the tree holds the rendered files only
        root = os.path.dirname(os.path.abspath(config))
        real_root = os.path.realpath(root)
        if not all(_is_within(real, root) or _is_within(real, real_root) for _, real in dests):
            return None
        skip = {path for pair in dests for path in pair}
        try:
            return (real_root, dests, _tree_stamp(root, skip))
        except OSError:
            return None


def _tree_stamp(root: str, skip: set[str]) -> tuple[tuple[object, ...], ...]:
    """Every entry under ``root`` (but ``skip``), one lstat each, in a fixed order.

    Directories: (path, inode, mode); their mtimes change with every swap. Everything
    else, symlinks included: (path, inode, mode, size, mtime, ctime).
    """
    info = os.lstat(root)
    entries: list[tuple[object, ...]] = [(root, info.st_ino, info.st_mode)]
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as listing:
            found = sorted(listing, key=lambda entry: entry.name)
        for entry in found:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                entries.append((entry.path, info.st_ino, info.st_mode))
                pending.append(entry.path)
            elif entry.path not in skip:
                stamp = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                entries.append((entry.path, info.st_ino, info.st_mode, *stamp))
    return tuple(entries)


def _sans_ctime(fingerprint: object) -> object:
    """A fingerprint without the files' ctimes (the last item of a file's entry)."""
    if not (isinstance(fingerprint, tuple) and len(fingerprint) == 3):
        return fingerprint
    real_root, dests, entries = fingerprint
    return real_root, dests, tuple(e[:-1] if len(e) == 6 else e for e in entries)


def _build(
    stage_dir: Path, config: Path | None, rendered: Mapping[Path, bytes]
) -> tuple[StagedConfig, _Stager]:
    root = None if config is None else Path(os.path.abspath(config)).parent
    if root is not None:
        _check_root(root, stage_dir)
    stager = _Stager(stage_dir, root, rendered)
    if root is not None:
        stager.mirror_tree()
    files = {dest: stager.write_rendered(dest, data) for dest, data in rendered.items()}
    main = None if config is None else stage_dir / Path(os.path.abspath(config)).name
    contents = MappingProxyType(dict(stager.contents))
    return StagedConfig(root=stage_dir, main=main, files=files, contents=contents), stager


def _check_root(root: Path, stage_dir: Path) -> None:
    if not root.is_dir():
        raise StageError("the config directory does not exist", path=str(root))
    if root == Path("/"):
        raise StageError("a main config at the filesystem root cannot be staged", path=str(root))
    real_root = os.path.realpath(root)
    if _is_within(os.path.realpath(stage_dir), real_root):
        raise StageError(
            f"the staging directory {stage_dir} is inside the LB's config directory "
            "(the LB could include it); move lbsync's state_dir elsewhere",
            path=str(root),
        )


class _Stager:
    """Builds one staged tree: live files mirrored, paths rewritten, rendered files added.

    Live files that need no rewriting are hard-linked when the filesystem allows it
    (creating inodes is what staging spends its time on), else copied. So a staged file
    may share its inode with a live one: nothing here ever opens an existing staged file
    for writing; files are only ever created (``O_EXCL``) or replaced (unlink + create).
    """

    def __init__(self, stage_dir: Path, root: Path | None, rendered: Mapping[Path, bytes]) -> None:
        self.stage_dir = stage_dir
        self.root = root
        # The live root under every name it has (a symlinked /etc/nginx counts twice).
        self.roots: list[str] = []
        if root is not None:
            self.roots = sorted({str(root), os.path.realpath(root)}, key=len, reverse=True)
        # Rendered destinations outside the root: live path (as given and resolved) → staged.
        self.external: dict[str, Path] = {}
        for dest in rendered:
            real = os.path.realpath(dest)
            if self._under_root(real) is None:
                self.external[str(dest)] = self.external[real] = self._external_path(real)
        needles = [r.encode() for r in self.roots]
        for live in self.external:
            needles += [live.encode(), os.path.dirname(live).encode()]
        self.needles = tuple(needles)
        self.hardlinks = True
        self.contents: dict[Path, bytes] = {}  # staged rendered file → the bytes in it
        # destination → (staged path, device, inode) of the file write_rendered created
        self._own: dict[Path, tuple[Path, int, int]] = {}

    # --- paths -------------------------------------------------------------------------

    def staged_dest(self, dest: Path) -> Path:
        """Where a rendered destination goes in the staged tree (symlinks resolved)."""
        real = os.path.realpath(dest)
        inside = self._under_root(real)
        return self.stage_dir / inside if inside is not None else self.external[real]

    def map(self, live: str) -> str | None:
        """The staged counterpart of an absolute live path, or None to leave it alone."""
        for root in self.roots:
            if live == root or live.startswith(root + "/"):
                return str(self.stage_dir) + live[len(root) :]  # keeps a trailing "/"
        if live in self.external:
            return str(self.external[live])
        return None

    def _external_path(self, live: str) -> Path:
        return self.stage_dir / EXTERNAL_DIR / live.lstrip("/")

    def _under_root(self, path: str) -> str | None:
        """``path`` relative to the live root ("" for the root itself), None if outside."""
        for root in self.roots:
            if path == root:
                return ""
            if path.startswith(root + "/"):
                return path[len(root) + 1 :]
        return None

    # --- building ----------------------------------------------------------------------

    def mirror_tree(self) -> None:
        assert self.root is not None
        for dirpath, dirs, names in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            here = self.stage_dir if rel == "." else self.stage_dir / rel
            try:
                here.mkdir(exist_ok=True)
            except OSError as exc:
                raise StageError(f"cannot create: {exc.strerror}", path=str(here)) from exc
            # os.walk lists a symlink to a directory among ``dirs`` (and does not enter it).
            linked_dirs = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
            for name in [*names, *linked_dirs]:
                self.stage_entry(os.path.join(dirpath, name), here / name)

    def stage_entry(self, live: str, staged: Path) -> None:
        """Mirror one live file or symlink at ``staged`` (sockets, fifos: skipped)."""
        try:
            if os.path.islink(live):
                os.symlink(self._link_target(live), staged)
            elif os.path.isfile(live):
                self._stage_file(live, staged)
        except OSError as exc:
            raise StageError(f"cannot stage: {exc.strerror}", path=live) from exc

    def write_rendered(self, dest: Path, data: bytes) -> Path:
        path = self.staged_dest(dest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not _is_within(os.path.realpath(path.parent), os.path.realpath(self.stage_dir)):
                # Never write through a link that leads out of the staging tree (a live file).
                raise StageError("staged path leads out of the staging directory", path=str(path))
            path.unlink(missing_ok=True)  # may be a hard link to the live file: replace it
            self.contents.pop(path, None)
            self._own.pop(dest, None)
            new = self.rewrite(data)
            device, inode = _create(path, new, DEFAULT_MODE)
            self.contents[path] = new
            self._own[dest] = (path, device, inode)
        except OSError as exc:
            raise StageError(
                f"cannot write the staged file: {exc.strerror}", path=str(path)
            ) from exc
        return path

    def overwrite_rendered(self, dest: Path, data: bytes) -> None:
        """Rewrite a staged rendered file in place when it is this tree's own inode.

        ``write_rendered`` made it (unlink + create: the mirror may have hard-linked the live
        file there) and noted its device and inode; the file opened here is written over
        only if it is still that inode with one link: ours alone, so writing over it cannot
        touch a live file, whatever happened to the path. That saves creating an inode per
        round, and resolving the path (a ``realpath`` is an lstat per component). Anything
        else goes through ``write_rendered``.
        """
        own = self._own.get(dest)
        try:
            fd = -1 if own is None else os.open(own[0], os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if own is None or fd < 0:
            self.write_rendered(dest, data)
            return
        path = own[0]
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != own[1:] or info.st_nlink != 1:
                os.close(fd)
                fd = -1
                self.write_rendered(dest, data)
                return
            new = self.rewrite(data)
            self.contents.pop(path, None)
            write_all(fd, new)
            if os.fstat(fd).st_size > len(new):  # only then: a truncate costs a journal write
                os.ftruncate(fd, len(new))
            self.contents[path] = new
        except OSError as exc:
            raise StageError(
                f"cannot write the staged file: {exc.strerror}", path=str(path)
            ) from exc
        finally:
            if fd >= 0:
                os.close(fd)

    def _stage_file(self, live: str, staged: Path) -> None:
        with open(live, "rb") as handle:
            data = handle.read()
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        new = self.rewrite(data)
        if new is data and self.hardlinks:
            try:
                os.link(live, staged, follow_symlinks=False)  # never a link's target
                return
            except OSError as exc:  # another filesystem, protected_hardlinks, ...: copy
                log.debug("stage.no_hardlinks", path=live, reason=exc.strerror)
                self.hardlinks = False
        _create(staged, new, mode)

    def _link_target(self, live: str) -> str:
        """What a staged twin of the live symlink ``live`` should point at."""
        target = os.readlink(live)
        live_target = os.path.normpath(os.path.join(os.path.dirname(live), target))
        if not os.path.isabs(target) and self._under_root(live_target) is not None:
            return target  # relative and staying inside the tree: right as it is
        return self.map(live_target) or live_target

    # --- rewriting ---------------------------------------------------------------------

    def rewrite(self, data: bytes) -> bytes:
        """``data`` with live paths pointed at the staged tree; ``data`` itself if none."""
        if b"\0" in data[:8192] or b"/" not in data or not any(n in data for n in self.needles):
            # binary, or nothing to rewrite: the common case, kept cheap. "/" first: one
            # memchr, where each needle is a slower substring search (0.2 ms on 370 KB)
            return data
        new = _PATH_TOKEN.sub(self._replace, data)
        return data if new == data else new

    def _replace(self, match: re.Match[bytes]) -> bytes:
        token = match.group().decode(errors="surrogateescape")
        mapped = self.map(token)
        if mapped is None and _GLOB_CHARS.intersection(token):
            mapped = self._mirror_glob(token)
        return match.group() if mapped is None else mapped.encode(errors="surrogateescape")

    def _mirror_glob(self, pattern: str) -> str | None:
        """An outside glob (``/srv/lb/*.conf``) that matches a rendered destination.

        The files it matches live are mirrored next to the staged destination and the
        pattern is pointed there, so the checker sees the same set with the new file.
        """
        if not any(fnmatch.fnmatchcase(live, pattern) for live in self.external):
            return None
        directory, name = os.path.split(pattern)
        if _GLOB_CHARS.intersection(directory):
            log.warning("stage.glob_not_mirrored", pattern=pattern)
            return None
        mirror = self._external_path(directory)
        mirror.mkdir(parents=True, exist_ok=True)
        for live in glob.glob(pattern):
            staged = mirror / os.path.basename(live)
            if not os.path.lexists(staged) and not os.path.isdir(live):
                self.stage_entry(live, staged)
        return str(mirror / name)


def _create(path: Path, data: bytes, mode: int) -> tuple[int, int]:
    """A new file (never an existing inode: it may be shared with a live file); returns
    its device and inode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)
        info = os.fstat(fd)
        return info.st_dev, info.st_ino
    finally:
        os.close(fd)


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")
