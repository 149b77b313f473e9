"""The prober's verdict keys in etcd, all under one lease of its own, kept alive.

The engine says what each key should hold (``set``/``clear``, from any thread); a thread
here makes etcd match, retrying after a failure. When the lease is lost (etcd down longer
than its TTL) a new one is granted and every verdict written again under it; when the
prober stops the lease is revoked, so its verdicts vanish at once rather than after the TTL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from lbsync.config import EtcdSettings
from lbsync.errors import SourceError
from lbsync.probe import metrics
from lbsync.source.writer import EtcdWriter, Lease

log = structlog.get_logger("lbsync.probe")

RETRY = 1.0  # seconds between attempts while etcd refuses


class VerdictWriter:
    def __init__(self, settings: EtcdSettings, ttl: float) -> None:
        self.settings = settings
        self.ttl = ttl
        self._lock = threading.Lock()
        self._wanted: dict[str, str] = {}
        self._written: dict[str, str] = {}
        self._dirty: set[str] = set()  # keys whose etcd value may differ from the wanted one
        self._changed = threading.Event()
        self.connected = False

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._wanted[key] = value
            self._dirty.add(key)
        self._changed.set()

    def clear(self, key: str) -> None:
        with self._lock:
            self._wanted.pop(key, None)
            self._dirty.add(key)
        self._changed.set()

    def pending(self) -> int:
        """Keys whose etcd value differs from the wanted one (0 when in step)."""
        with self._lock:
            return sum(1 for k in self._dirty if self._wanted.get(k) != self._written.get(k))

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: keep the lease alive and etcd in step; then revoke the lease."""
        writer = EtcdWriter(self.settings)
        lease: Lease | None = None
        refreshed = 0.0
        try:
            while not stop.is_set():
                try:
                    if lease is None:
                        lease, refreshed = self._new_lease(writer), time.monotonic()
                    elif time.monotonic() - refreshed >= self.ttl / 3:
                        lease.refresh()
                        refreshed = time.monotonic()
                    refresh_at = refreshed + self.ttl / 3
                    in_step = self._sync(writer, lease, until=refresh_at)
                    self.connected = True
                    wait = max(0.0, refresh_at - time.monotonic()) if in_step else 0.0
                except SourceError as err:  # LeaseExpired among them: start afresh
                    log.warning("probe.etcd_failed", error=str(err), endpoint=writer.endpoint)
                    self.connected, lease = False, None
                    wait = RETRY
                self._changed.wait(wait)
                self._changed.clear()
        finally:
            self._revoke(writer, lease)
            writer.close()

    def _new_lease(self, writer: EtcdWriter) -> Lease:
        lease = writer.lease(self.ttl)
        with self._lock:
            self._written.clear()  # whatever was under the old lease is gone with it
            self._dirty = set(self._wanted)
        log.info("probe.lease", lease=lease.id, ttl=lease.ttl)
        return lease

    def _sync(self, writer: EtcdWriter, lease: Lease, until: float) -> bool:
        """Write the keys marked dirty, one at a time: only what changed is looked at (not
        every verdict on every wake-up), and a key set again meanwhile stays dirty. Stops
        at ``until`` (the lease's refresh is due: 10,000 first verdicts take longer than its
        TTL, and it expired under them); True when etcd is in step."""
        while time.monotonic() < until:
            todo = self._next_dirty()
            if todo is None:
                return True
            key, value = todo
            if value is None:
                with _counted("delete"):
                    writer.delete(key)
            else:
                with _counted("put"):
                    writer.put(key, value, lease=lease)
            with self._lock:
                if value is None:
                    self._written.pop(key, None)
                else:
                    self._written[key] = value
                if self._wanted.get(key) == value:
                    self._dirty.discard(key)
        return self._next_dirty() is None

    def _next_dirty(self) -> tuple[str, str | None] | None:
        """A key to write and its wanted value (None: delete it); None when etcd is in step."""
        with self._lock:
            while self._dirty:
                key = next(iter(self._dirty))
                value = self._wanted.get(key)
                if value != self._written.get(key):
                    return key, value
                self._dirty.discard(key)
            return None

    def _revoke(self, writer: EtcdWriter, lease: Lease | None) -> None:
        if lease is None:
            return
        try:
            lease.revoke()
            log.info("probe.lease_revoked", lease=lease.id)
        except SourceError as err:
            log.warning("probe.revoke_failed", lease=lease.id, error=str(err))


@contextmanager
def _counted(op: str) -> Iterator[None]:
    try:
        yield
    except SourceError:
        metrics.ETCD_WRITES.labels(op, "failed").inc()
        raise
    metrics.ETCD_WRITES.labels(op, "ok").inc()
