"""Level-triggered reconciliation: what a target's live files hold vs what lbsync last
applied there, and when a failed round is tried again.

Events make lbsync fast; this makes it right when something happens between events: a
file edited by hand, an LB restarted by its supervisor on other files, a round that failed
because of the environment (a missing include file, the LB down for a moment).

``LiveFiles`` answers "did anything change behind our back?" cheaply enough to ask every
``reconcile.interval`` at 10,000 instances: one ``stat`` per destination file compared
with the (inode, size, mtime_ns) lbsync left there; the bytes are read only when that
fingerprint moved, and compared with what lbsync rendered (kept by reference, no hash).

``Backoff`` is the retry timer of failed rounds: capped exponential, with jitter so that
many lbsync hosts failing on the same cause don't retry in lockstep.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lbsync.errors import LbsyncError
from lbsync.stage import swap

DriftKind = str
"""What differed, as logged by ``drift.repaired`` and counted by its metric:
``file_edited`` (a destination file no longer holds what lbsync wrote), ``lb_restarted``
(the same, and the LB process changed too: restarted on other files),
``runtime_state_lost`` (the files are ours but the LB's runtime state is not what they and
the applied snapshot say: HAProxy servers set to maint behind lbsync's back)."""

FILE_EDITED: DriftKind = "file_edited"
LB_RESTARTED: DriftKind = "lb_restarted"
RUNTIME_STATE_LOST: DriftKind = "runtime_state_lost"


@dataclass(frozen=True)
class Fingerprint:
    """Identifies one version of a file without reading it: any write changes one field
    (a rename: the inode; an in-place edit: the mtime, almost always the size)."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, *, follow_symlinks: bool) -> Fingerprint | None:
        """The file's fingerprint now; None when it is missing or unreadable."""
        try:
            st = os.stat(path, follow_symlinks=follow_symlinks)
        except OSError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Written:
    data: bytes  # what lbsync rendered for this file (the plan's own bytes object)
    seen: Fingerprint | None  # the file's fingerprint once it held ``data``


class LiveFiles:
    """What lbsync last left in each destination file of one target, and the LB's identity
    (``Driver.lb_identity``) at that moment."""

    def __init__(self, follow_symlinks: Collection[Path] = ()) -> None:
        self._follow = frozenset(follow_symlinks)
        self._written: dict[Path, _Written] = {}
        self._identity: Hashable | None = None

    @property
    def known(self) -> bool:
        """True once a round left the files in step (nothing to compare with before)."""
        return bool(self._written)

    def record(self, rendered: Mapping[Path, bytes], identity: Hashable | None) -> None:
        """After a round that left every file holding ``rendered``."""
        self._written = {
            path: _Written(data, Fingerprint.of(path, follow_symlinks=path in self._follow))
            for path, data in rendered.items()
        }
        self._identity = identity

    def forget(self) -> None:
        """After a failed round: what is on disk is not known to be ours (the retry timer,
        not the comparison, owns a failing target)."""
        self._written = {}
        self._identity = None

    def drift(self, identity: Hashable | None) -> DriftKind | None:
        """What differs from the last ``record``, or None. A file whose fingerprint moved
        but which still holds our bytes (touched, copied back) is re-fingerprinted; an LB
        restarted on the very files we wrote is in step and only remembered."""
        edited = self.edited()
        restarted = identity is not None and identity != self._identity
        self._identity = identity if identity is not None else self._identity
        if not edited:
            return None
        return LB_RESTARTED if restarted else FILE_EDITED

    def edited(self) -> list[Path]:
        """Destination files that no longer hold what lbsync wrote there."""
        edited = []
        for path, written in list(self._written.items()):
            follow = path in self._follow
            now = Fingerprint.of(path, follow_symlinks=follow)
            if now is not None and now == written.seen:
                continue
            try:
                data = swap.current_bytes(path, follow_symlinks=follow)
            except LbsyncError:
                data = None  # a symlink put in its place, unreadable: not ours any more
            if data is not None and data == written.data:
                self._written[path] = _Written(written.data, now)
            else:
                edited.append(path)
        return edited


class Backoff:
    """When a failing target is tried again: ``initial`` doubling up to ``maximum``, each
    delay drawn in [delay/2, delay] ("equal jitter": never sooner than half, never in
    lockstep with the other hosts that fail for the same reason)."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        clock: Callable[[], float],
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self._clock = clock
        self._rng = rng
        self.failures = 0
        self.due_at: float | None = None

    def failed(self) -> float:
        """One more failure: schedule the next try; returns its delay."""
        ceiling = min(self.initial * 2.0 ** min(self.failures, 32), self.maximum)
        delay = ceiling / 2 + self._rng() * ceiling / 2
        self.failures += 1
        self.due_at = self._clock() + delay
        return delay

    def reset(self) -> None:
        """A success, or a new etcd change (which brings its own round): start over."""
        self.failures = 0
        self.due_at = None

    def due(self) -> bool:
        return self.due_at is not None and self._clock() >= self.due_at

    def due_in(self) -> float | None:
        return None if self.due_at is None else max(0.0, self.due_at - self._clock())
