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
        self._changed = threading.Event()
        self.connected = False

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._wanted[key] = value
        self._changed.set()

    def clear(self, key: str) -> None:
        with self._lock:
            self._wanted.pop(key, None)
        self._changed.set()

    def pending(self) -> int:
        """Keys whose etcd value differs from the wanted one (0 when in step)."""
        with self._lock:
            wanted, written = dict(self._wanted), dict(self._written)
        return sum(1 for k in wanted.keys() | written.keys() if wanted.get(k) != written.get(k))

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
                    self._sync(writer, lease)
                    self.connected = True
                    wait = max(0.0, refreshed + self.ttl / 3 - time.monotonic())
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
        log.info("probe.lease", lease=lease.id, ttl=lease.ttl)
        return lease

    def _sync(self, writer: EtcdWriter, lease: Lease) -> None:
        with self._lock:
            wanted, written = dict(self._wanted), dict(self._written)
        for key, value in wanted.items():
            if written.get(key) != value:
                with _counted("put"):
                    writer.put(key, value, lease=lease)
                with self._lock:
                    self._written[key] = value
        for key in written.keys() - wanted.keys():
            with _counted("delete"):
                writer.delete(key)
            with self._lock:
                self._written.pop(key, None)

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
