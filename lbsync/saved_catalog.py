"""The last applied catalog, persisted so a restart while etcd is down starts from it.

Saved as JSON in ``<state_dir>/last-applied.json``: the etcd revision, when it was saved,
where it came from (``Origin``: the prefix, the etcd endpoints, etcd's cluster id) and
every raw key under the prefix. The daemon reads etcd first and loads this file only when
etcd cannot be read at start; a file of another prefix, or from endpoints none of which
is configured any more, is discarded (``catalog.discarded``, with why), never rendered. A
file of the older format (no endpoints, no cluster id) is of an unknown cluster: with the
prefix matching it is used, as before (the LB already serves what it holds).
On load it becomes an ordinary ``SourceReset`` and goes through the catalog's validation
like any read from etcd. Writes are atomic (``fileio.atomic_write``: temp file, fsync,
rename, never through a symlink), and throttled by the daemon: losing the latest save
costs nothing but staleness (``Saver``). A symlink at the file's name is not read either
(``catalog.unreadable``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from lbsync.errors import LbsyncError, StageError
from lbsync.fileio import atomic_write, opened_dir, read_bytes
from lbsync.keymap import Buckets, as_groups
from lbsync.model import KeyValue, Snapshot, SourceReset
from lbsync.scheduler import Clock

log = structlog.get_logger("lbsync.saved_catalog")

FILENAME = "last-applied.json"
# The daemon saves once changes pause (SAVE_QUIET s without an applied round), at most
# every SAVE_EVERY s, and at least every SAVE_LATEST s while changes keep coming: a save
# is ~13 ms of CPU at 10,000 instances, and only a restart while etcd is down reads it.
SAVE_EVERY = 5.0
SAVE_QUIET = 1.0
SAVE_LATEST = 30.0


@dataclass(frozen=True)
class Origin:
    """Where a catalog came from: ``cluster_id`` 0 is unknown, empty ``endpoints`` too."""

    prefix: str
    endpoints: tuple[str, ...] = ()
    cluster_id: int = 0


@dataclass(frozen=True)
class Saved:
    reset: SourceReset
    saved_at: float
    origin: Origin

    def age(self) -> float:
        return max(0.0, time.time() - self.saved_at)


def mismatch(saved: Origin, current: Origin) -> str | None:
    """Why a catalog saved from ``saved`` must not be rendered for ``current``, or None.

    Endpoints count as the same cluster while they share one (members come and go); an
    unknown side (older format, a source that did not say) is not held against it.
    """
    if saved.prefix != current.prefix:
        return f"saved for prefix {saved.prefix!r}, lbsync watches {current.prefix!r}"
    if saved.cluster_id and current.cluster_id and saved.cluster_id != current.cluster_id:
        return (
            f"saved from etcd cluster {saved.cluster_id:x}, etcd is cluster {current.cluster_id:x}"
        )
    if saved.endpoints and current.endpoints and not set(saved.endpoints) & set(current.endpoints):
        return (
            f"saved from etcd {', '.join(saved.endpoints)}, "
            f"lbsync reads {', '.join(current.endpoints)}"
        )
    return None


class EncodedParts:
    """The JSON of each part of the keys last saved (a group, or a big group's bucket),
    so that the next save encodes only the parts that changed.

    A part a snapshot shares with the last saved one is the same object and never
    changes (``keymap``: the catalog copies a group before writing it). At 100,000 keys
    encoding them all was ~75 ms of CPU a save (py-spy: ~9% of the daemon's CPU in
    ``bench scale``); the document is byte for byte what one ``json.dumps`` makes. Holds
    the encoded keys between saves (~12 MB at 100,000 keys, 1.2 MB at 10,000).
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[Mapping[str, str], bytes]] = {}

    def keys_json(self, keys: Mapping[str, str]) -> bytes:
        """``keys`` as a JSON object, in the mapping's own order
        (group by group, bucket by bucket, as ``dict(keys)``)."""
        held: dict[int, tuple[Mapping[str, str], bytes]] = {}
        chunks: list[bytes] = []
        for part in _parts(keys):
            known = self._held.get(id(part))
            if known is None or known[0] is not part:  # the part is alive: ids are its own
                known = (part, json.dumps(part, separators=(",", ":")).encode()[1:-1])
            held[id(part)] = known
            chunks.append(known[1])
        self._held = held
        return b"{" + b",".join(chunks) + b"}"


def _parts(keys: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """The non-empty dicts ``keys`` is made of, in order."""
    for group in as_groups(keys).values():
        for part in group.buckets if isinstance(group, Buckets) else (group,):
            if part:
                yield part if isinstance(part, dict) else dict(part)


def save(
    state_dir: Path, origin: Origin, snapshot: Snapshot, parts: EncodedParts | None = None
) -> Path:
    """Write the catalog; ``parts``: the encoding of the last save, to reuse (``Saver``)."""
    path = state_dir / FILENAME
    data = {
        "revision": snapshot.revision,
        "saved_at": time.time(),
        "prefix": origin.prefix,
        "endpoints": list(origin.endpoints),
        "cluster_id": origin.cluster_id,
    }
    # dumps, not dump: dump to a file goes through the pure-Python encoder (12.7 vs
    # 9.5 ms for 10,000 instances, every few seconds while changes flow).
    head = json.dumps(data, separators=(",", ":")).encode()[:-1]
    keys = (parts or EncodedParts()).keys_json(snapshot.keys)
    encoded = b"".join((head, b',"keys":', keys, b"}"))
    try:
        with opened_dir(state_dir, create=True, follow_symlinks=False) as dir_fd:
            atomic_write(dir_fd, FILENAME, encoded, mode=0o600, sync_dir=False)
    except OSError as exc:
        raise StageError(
            f"cannot save the last applied catalog: {exc.strerror}", path=str(path)
        ) from exc
    return path


def load(state_dir: Path, current: Origin) -> Saved | None:
    """The saved catalog, or None when there is none, it is unreadable, or ``mismatch``es."""
    path = state_dir / FILENAME
    try:
        data = json.loads(read_bytes(path, follow_symlinks=False))  # a symlink: ELOOP
        revision, saved_at, keys = int(data["revision"]), float(data["saved_at"]), data["keys"]
        origin = Origin(
            str(data["prefix"]),
            tuple(str(e) for e in data.get("endpoints", ())),
            int(data.get("cluster_id", 0)),
        )
        pairs = sorted((str(key), str(value)) for key, value in keys.items())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("catalog.unreadable", path=str(path), error=str(exc))
        return None
    why = mismatch(origin, current)
    if why is not None:
        log.warning("catalog.discarded", path=str(path), revision=revision, reason=why)
        return None
    kvs = tuple(
        KeyValue(key=current.prefix + key, value=value.encode(), mod_revision=revision)
        for key, value in pairs
    )
    reset = SourceReset(revision=revision, kvs=kvs, cluster_id=origin.cluster_id)
    saved = Saved(reset, saved_at, origin)
    log.info(
        "catalog.loaded",
        revision=revision,
        keys=len(kvs),
        age_s=round(saved.age(), 1),
        cluster_id=f"{origin.cluster_id:x}" if origin.cluster_id else "unknown",
    )
    return saved


def save_due(now: float, saved_at: float, applied_at: float) -> bool:
    """Whether an unsaved catalog should be saved now (see ``SAVE_*``)."""
    since_save = now - saved_at
    if since_save >= SAVE_LATEST:
        return True
    return since_save >= SAVE_EVERY and now - applied_at >= SAVE_QUIET


class StartFallback:
    """etcd first: the saved catalog is due only when etcd was not read within ``timeout``.

    Rendering the saved catalog at once, as lbsync used to, served a fresh cluster's LB the
    previous cluster's instances for a round (and the guard then held the real catalog).
    """

    def __init__(self, clock: Clock, timeout: float) -> None:
        self._clock = clock
        self._deadline: float | None = clock() + timeout
        self._served: Origin | None = None  # the saved catalog's, once loaded

    def due(self, synced: bool) -> bool:
        """True once, when the deadline passes with etcd still unread; then always False."""
        if self._deadline is None or (not synced and self._clock() < self._deadline):
            return False
        self._deadline = None
        return not synced

    def due_at(self) -> float | None:
        """When ``due`` may next say True (the daemon's loop sleeps until then)."""
        return self._deadline

    def loaded(self, saved: Saved) -> None:
        self._served = saved.origin

    def read(self, current: Origin) -> None:
        """etcd was read at last: say so if the saved catalog served meanwhile was not its
        (only the cluster id can tell, and only now); etcd's read replaces it either way."""
        served, self._served = self._served, None
        why = None if served is None else mismatch(served, current)
        if why is not None:
            log.warning("catalog.discarded", reason=why, note="served while etcd was unreadable")


class Saver:
    """Saves the daemon's applied catalog when ``save_due`` says so, or on stop (``force``)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._unsaved = False
        self._saved_at = self._applied_at = clock()
        self._parts = EncodedParts()

    def applied(self) -> None:
        """A round applied a new catalog to every target."""
        self._unsaved, self._applied_at = True, self._clock()

    def due_at(self) -> float | None:
        """When ``save_due`` turns true for the unsaved catalog; None: nothing to save."""
        if not self._unsaved:
            return None
        quiet = max(self._saved_at + SAVE_EVERY, self._applied_at + SAVE_QUIET)
        return min(self._saved_at + SAVE_LATEST, quiet)

    def save_if_due(
        self, state_dir: Path, origin: Origin, snapshot: Snapshot, *, force: bool = False
    ) -> None:
        """Save ``snapshot`` if it is time; a failed save waits for the next applied round."""
        if not self._unsaved:
            return
        if not (force or save_due(self._clock(), self._saved_at, self._applied_at)):
            return
        try:
            save(state_dir, origin, snapshot, self._parts)
        except LbsyncError as err:
            log.error("catalog.save_failed", error=err)
        self._unsaved = False
        self._saved_at = self._clock()
