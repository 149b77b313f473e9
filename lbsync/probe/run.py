"""The ``lbsync probe`` process: the etcd watch, the catalog, the checks, the writer, /metrics.

Three threads besides the caller's: the etcd source (the daemon's ``EtcdSource``: a full
read, then the watch, resynced after compaction), the verdict writer, and the optional
HTTP endpoint; the checks run in one asyncio loop (uvloop's) in the caller's thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import structlog
import uvloop

from lbsync import keys
from lbsync.catalog import Catalog
from lbsync.config import Settings
from lbsync.http import StatusServer
from lbsync.model import SourceEvents, SourceMessage, SourceReset
from lbsync.probe import metrics
from lbsync.probe.curl import CurlLoop
from lbsync.probe.engine import Engine
from lbsync.probe.writer import VerdictWriter
from lbsync.source.etcd import EtcdSource
from lbsync.values import PROBER_NAME

log = structlog.get_logger("lbsync.probe")

TICK = 0.5  # seconds: how often the loop looks at ``stop`` when etcd is quiet
STUCK = 30.0  # /healthz fails when the loop has not turned for this long


def prober_name(settings: Settings) -> str:
    """``[probe] name``, else the host's name (its first label, if the whole is not a safe
    name); a ``ValueError`` if neither can go into a key."""
    if settings.probe.name:
        return settings.probe.name
    host = socket.gethostname()
    for candidate in (host, host.split(".")[0]):
        if PROBER_NAME.fullmatch(candidate):
            return candidate
    raise ValueError(f"host name {host!r} cannot name a prober: set [probe] name")


class Prober:
    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.catalog = Catalog(settings.etcd.prefix)
        self.writer = VerdictWriter(settings.etcd, settings.probe.lease_ttl)
        self.source = EtcdSource(settings.etcd)
        self.connected = False
        self.last_turn = time.monotonic()
        self.engine: Engine | None = None

    def run(self, stop: threading.Event) -> None:
        """Probe until ``stop`` is set; then the lease is revoked and the verdicts vanish."""
        writer = threading.Thread(target=self.writer.run, args=(stop,), name="probe-writer")
        server = self._server()
        writer.start()
        try:
            uvloop.run(self._main(stop))
        finally:
            stop.set()
            if server is not None:
                server.stop()
            writer.join()
            self.source.close()

    async def _main(self, stop: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[SourceMessage] = asyncio.Queue()
        watch = threading.Thread(
            target=self.source.run,
            args=(lambda m: loop.call_soon_threadsafe(messages.put_nowait, m), stop),
            name="probe-source",
            daemon=True,
        )
        # The engine's semaphore bounds checks in flight (TCP ones too); each check's
        # timeout is run_check's (and libcurl's own).
        curl = CurlLoop()
        prefix = self.settings.etcd.prefix.rstrip("/")
        engine = Engine(self.settings.probe, self.name, prefix, self.writer, curl)
        self.engine = engine
        watch.start()
        log.info("probe.started", prober=self.name, prefix=self.settings.etcd.prefix)
        try:
            await self._follow(engine, messages, stop)
        finally:
            engine.stop_all()
            curl.close()
        await asyncio.to_thread(watch.join)

    async def _follow(
        self, engine: Engine, messages: asyncio.Queue[SourceMessage], stop: threading.Event
    ) -> None:
        while not stop.is_set():
            self.last_turn = time.monotonic()
            try:
                message = await asyncio.wait_for(messages.get(), TICK)
            except TimeoutError:
                continue
            touched: set[str] | None = set()
            touched = self._absorb(message, touched)
            while not messages.empty():  # a burst: one update for all of it
                touched = self._absorb(messages.get_nowait(), touched)
            if self.catalog.synced and touched != set():
                engine.update(self.catalog.snapshot(), touched)

    def _absorb(self, message: SourceMessage, touched: set[str] | None) -> set[str] | None:
        """Apply one message; the services it touched added to ``touched`` (None: all)."""
        if isinstance(message, SourceReset):
            self.catalog.reset(message)
            return None
        if isinstance(message, SourceEvents):
            changed = self.catalog.apply(self._without_verdicts(message))
            return None if touched is None else touched | changed
        self.connected = message.connected
        return touched

    def _without_verdicts(self, batch: SourceEvents) -> SourceEvents:
        """The batch without probe verdicts: the prober checks instances, it never reads
        verdicts, and each one it writes comes back on the watch (during the warm-up that
        was 10,000 echoes, each rebuilding its service for nothing)."""
        prefix = self.settings.etcd.prefix.rstrip("/")
        kept = tuple(event for event in batch.events if not _is_verdict(prefix, event.key))
        if len(kept) == len(batch.events):
            return batch
        return SourceEvents(revision=batch.revision, events=kept)

    def _server(self) -> StatusServer | None:
        listen = self.settings.probe.listen
        if listen is None:
            return None
        server = StatusServer(
            listen,
            status=self.status,
            healthy=self.healthy,
            ready=self.ready,
            registry=metrics.REGISTRY,
        )
        server.start()
        return server

    def healthy(self) -> tuple[bool, str]:
        idle = time.monotonic() - self.last_turn
        if idle > STUCK:
            return False, f"the check loop has not turned for {idle:.0f}s"
        return True, ""

    def ready(self) -> tuple[bool, str]:
        if not self.catalog.synced:
            return False, "no catalog yet: waiting for the first read of etcd"
        if not self.writer.connected:
            return False, "cannot write verdicts to etcd"
        return True, ""

    def status(self) -> dict[str, Any]:
        return {
            "prober": self.name,
            "revision": self.catalog.revision,
            "etcd": {"watching": self.connected, "writing": self.writer.connected},
            "instances": self.engine.counts() if self.engine else {},
            "unwritten_verdicts": self.writer.pending(),
        }


def _is_verdict(prefix: str, key: str) -> bool:
    if not key.startswith(prefix + "/"):
        return False
    where = keys.place(key[len(prefix) :])
    return where is not None and where[1] == "probes"
