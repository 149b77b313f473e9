"""etcd as lbsync's source: a consistent paged read, then a supervised watch that resumes.

Two transports (``[etcd] transport``): etcd's JSON gateway over HTTP/1.1 (``gateway``:
standard library only, one blocked socket when idle) and gRPC (``grpc_session``, through
pyetcd, imported only when used). With ``auto`` each new connection tries the gateway
first and falls back to gRPC on an endpoint that does not serve it (etcd's gRPC proxy),
and full reads go over gRPC on a client closed after each (``_reader``).
Both hand the loop the same ``WatchResponse``; everything raised is an
``lbsync.errors.SourceError``, and no pyetcd, gRPC or HTTP object leaves the package.

Liveness: a watch quiet for its ``check_every`` is checked (``Watch.check``): on gRPC,
progress requests answer within ``silence_deadline`` or the stream is broken; on the
gateway, which cannot carry them, a cheap read every ``silence_deadline / 3`` proves the
server answers and that no put was missed, and TCP keepalive catches a dead peer.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import structlog

from lbsync.config import EtcdSettings
from lbsync.errors import HistoryDiverged, RevisionCompacted, SourceError, SourceUnavailable
from lbsync.model import SourceEvents, SourceMessage, SourceReset
from lbsync.source.attempts import LoopState
from lbsync.source.endpoints import GatewayNotServed, TokenRejected, check_settings, compacted
from lbsync.source.responses import WatchResponse
from lbsync.source.stream import prefix_end, watch_prefix

log = structlog.get_logger("lbsync.source")

# The first page of a full read, in keys; the next pages are sized to about PAGE_BYTES
# (``stream.next_page_limit``): 16 MiB is 1/16 of the gRPC receive limit, so a prefix
# whose later keys are 16 times bigger than its first ones still fits.
PAGE_SIZE = 5000
PAGE_BYTES = 16 * 1024 * 1024
BACKOFF_INITIAL = 0.1
# Low on purpose: a restarted etcd must be found within ~1 s (issue 4 asks convergence
# within 2 s of etcd being healthy). With a 5 s cap, an 8 s outage converged in up to
# 4.1 s; with 1 s, in at most 0.8 s. At many LB hosts, put a gRPC proxy in between.
BACKOFF_CAP = 1.0


class Watch(Protocol):
    """One open watch of either transport."""

    endpoint: str
    check_every: float  # how long the watch may be quiet before ``check``

    def get(self, timeout: float) -> WatchResponse | None: ...

    def check(self, revision: int) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class Session(Protocol):
    """A connection to etcd over either transport (``GatewaySession``, ``GrpcSession``)."""

    transport: str

    @property
    def endpoint(self) -> str: ...

    def connect(self) -> None: ...

    def read(self, start: bytes, end: bytes, page_size: int, page_bytes: int) -> SourceReset: ...

    def watch(self, start: bytes, end: bytes, start_revision: int) -> Watch: ...

    def close(self) -> None: ...


class _Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling to cap."""

    def __init__(self, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_CAP) -> None:
        self.initial = initial
        self.cap = cap
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self._attempt)
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class EtcdSource:
    """Reads and watches one prefix of etcd; see ``run`` for the supervised loop.

    Not thread-safe: use one instance from one thread (``close`` may come from another).
    """

    def __init__(
        self, settings: EtcdSettings, *, page_size: int = PAGE_SIZE, page_bytes: int = PAGE_BYTES
    ) -> None:
        """Raises ConfigError at once for unusable endpoints or unreadable TLS/password files."""
        if page_size < 1 or page_bytes < 1:
            raise ValueError("page_size and page_bytes must be at least 1")
        check_settings(settings)
        self.settings = settings
        self.page_size = page_size
        self.page_bytes = page_bytes
        self._prefix = watch_prefix(settings.prefix)
        self._range_end = prefix_end(self._prefix)
        self._lock = threading.Lock()
        self._session: Session | None = None
        self._closed = False
        self._stop: threading.Event | None = None
        self._watch_open: Watch | None = None  # the watch being consumed, for interrupt
        self._transport_logged: tuple[str, str] | None = None

    # -- connection --

    @property
    def endpoint(self) -> str:
        """The endpoint in use, or every configured one before the first connection."""
        session = self._session
        return session.endpoint if session is not None else ", ".join(self.settings.endpoints)

    def _connect(self) -> Session:
        with self._lock:
            self._refuse_if_stopping()
            if self._session is not None:
                return self._session
        session = self._open_session()  # outside the lock: a stop can cancel it meanwhile
        with self._lock:
            if self._closed:
                session.close()
                raise SourceUnavailable("the source is stopping", endpoint=self.endpoint)
            self._session = session
        return session

    def _refuse_if_stopping(self) -> None:
        if self._closed or (self._stop is not None and self._stop.is_set()):
            raise SourceUnavailable("the source is stopping", endpoint=self.endpoint)

    def _open_session(self) -> Session:
        """A connected session: the gateway unless ``transport`` is grpc, or auto meets an
        endpoint without it. Logs ``source.transport`` when the choice changes."""
        choice = self.settings.transport
        reason = f"transport = {choice!r}"
        if choice != "grpc":
            from lbsync.source.gateway import GatewaySession

            gateway = GatewaySession(self.settings)
            try:
                gateway.connect()
            except GatewayNotServed as exc:
                gateway.close()
                if choice == "http":
                    raise
                reason = f"auto: {exc.endpoint} does not serve the JSON gateway ({exc.message})"
            except BaseException:
                gateway.close()
                raise
            else:
                self._log_transport(gateway, reason)
                return gateway
        session = self._connected_grpc()
        self._log_transport(session, reason)
        return session

    def _connected_grpc(self) -> Session:
        """A new gRPC client, connected (logged in with a user); closed if that fails."""
        from lbsync.source.grpc_session import GrpcSession

        session = GrpcSession(self.settings)
        try:
            session.connect()
        except BaseException:
            session.close()
            raise
        return session

    def _log_transport(self, session: Session, reason: str) -> None:
        if self._transport_logged != (session.transport, reason):
            self._transport_logged = (session.transport, reason)
            log.info(
                "source.transport",
                transport=session.transport,
                endpoint=session.endpoint,
                reason=reason,
            )

    def _disconnect(self) -> None:
        """Drop the session: the next call connects afresh and, with auth, gets a new token."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def interrupt(self) -> None:
        """After ``stop`` is set: wake the watch's wait so that ``run`` returns now, not
        at the silence deadline. Safe from any thread."""
        watch = self._watch_open
        if watch is not None:
            watch.wake()

    def close(self) -> None:
        """Close the client for good; a ``run`` in another thread returns without a status."""
        with self._lock:
            self._closed = True
        self._disconnect()

    # -- reading --

    def read_all(self) -> SourceReset:
        """A consistent read of every key under the prefix, paged at one pinned revision.

        If the pinned revision is compacted between pages, the read starts over once; if
        the auth token has expired, it starts over once with a fresh client.
        """
        for attempt in range(2):
            reader = self._reader()
            own_client = reader is not self._session
            try:
                return reader.read(self._prefix, self._range_end, self.page_size, self.page_bytes)
            except (RevisionCompacted, TokenRejected) as exc:
                if attempt:
                    raise
                if isinstance(exc, TokenRejected):
                    self._disconnect()
            finally:
                if own_client:
                    reader.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _reader(self) -> Session:
        """Where a full read goes: with ``auto``, over gRPC even when the watch uses the
        gateway, on a client of its own closed right after the read.

        etcd's gateway marshals JSON ~4x slower than gRPC's protobuf (10,000 keys: 80-90 ms
        to the first byte, against ~20 ms for the whole read over gRPC; 100,000: ~1.5 s
        against 0.5), which was start-up's etcd read; once the client is closed, gRPC's
        threads exit and the idle daemon wakes as on ``http`` (docs/benchmarks.md). The
        gateway is not connected first: the watch that follows connects it (or finds it
        not served), so that its connection is not on start-up's path to the first read."""
        if self.settings.transport != "auto":
            return self._connect()
        session = self._session
        if session is not None and session.transport == "grpc":
            return session
        with self._lock:
            self._refuse_if_stopping()
        return self._connected_grpc()

    # -- the supervised loop --

    def run(self, emit: Callable[[SourceMessage], None], stop: threading.Event) -> None:
        """Read, watch, reconnect and resync until ``stop`` is set. Meant for its own thread.

        Emits a ``SourceReset`` for every full read, ``SourceEvents`` per watch response,
        and ``SourceStatus`` whenever the watch is established or an attempt fails. After
        a loss it resumes from the last event's revision + 1, so no event is lost or
        repeated; when that revision has been compacted, or the server's history is not the
        one followed (its revision behind ours, another cluster id), it emits a fresh
        ``SourceReset``.
        A failure never produces a reset. An exception raised by ``emit`` propagates.

        After ``stop`` it returns within ``settings.timeout`` even when a call is hung: the
        call runs out. Channels are never closed from another thread to cut it short:
        gRPC's core crashes (SIGSEGV) when a channel is closed while a stub is created on it.
        """
        self._stop = stop
        try:
            self._supervise(emit, stop)
        finally:
            self._disconnect()
            self._stop = None

    def _supervise(self, emit: Callable[[SourceMessage], None], stop: threading.Event) -> None:
        backoff = _Backoff()
        state = LoopState()
        while not (stop.is_set() or self._closed):
            try:
                if state.revision is None:
                    state.revision = self._reset(emit, state)
                for revision in self._watch(state, emit, stop):
                    state.revision = revision
                    backoff.reset()
            except HistoryDiverged as exc:
                log.warning(
                    "source.resync", endpoint=exc.endpoint, revision=state.revision, error=str(exc)
                )
                state.revision = None
            except RevisionCompacted as exc:
                if state.revision is not None:
                    log.warning(
                        "source.resync",
                        endpoint=exc.endpoint,
                        revision=state.revision,
                        error=str(exc),
                    )
                    state.revision = None
                    continue
                self._lost(exc, emit, state)  # even a fresh read was compacted: back off
                stop.wait(backoff.next())
            except SourceError as exc:
                if stop.is_set() or self._closed:
                    return
                self._lost(exc, emit, state)
                stop.wait(backoff.next())

    def _reset(self, emit: Callable[[SourceMessage], None], state: LoopState) -> int:
        reset = self.read_all()
        state.cluster_id = reset.cluster_id
        log.info(
            "source.read",
            endpoint=self.endpoint,
            revision=reset.revision,
            keys=len(reset.kvs),
            resync=state.ever_connected,
        )
        emit(reset)
        return reset.revision

    def _lost(
        self, exc: SourceError, emit: Callable[[SourceMessage], None], state: LoopState
    ) -> None:
        status = state.lost(exc, exc.endpoint or self.endpoint)
        self._disconnect()
        emit(status)

    def _watch(
        self, state: LoopState, emit: Callable[[SourceMessage], None], stop: threading.Event
    ) -> Iterator[int]:
        """Watch from ``state.revision`` + 1; yields the resume revision after each response.

        Returns only when ``stop`` is set; raises SourceUnavailable on loss, silence or
        the stream's end, RevisionCompacted when ``state.revision`` + 1 is gone.
        """
        assert state.revision is not None
        session = self._connect()
        watch = session.watch(self._prefix, self._range_end, state.revision + 1)
        try:
            yield from self._consume(watch, emit=emit, stop=stop, state=state)
        finally:
            self._watch_open = None
            watch.close()

    def _consume(
        self,
        watch: Watch,
        *,
        emit: Callable[[SourceMessage], None],
        stop: threading.Event,
        state: LoopState,
    ) -> Iterator[int]:
        """Apply responses until stop; a watch quiet for its ``check_every`` is checked
        (``Watch.check`` raises SourceUnavailable when it is broken)."""
        assert state.revision is not None
        revision = state.revision
        endpoint = watch.endpoint
        last_seen = time.monotonic()
        self._watch_open = watch
        while not stop.is_set():
            wait = watch.check_every - (time.monotonic() - last_seen)
            if wait <= 0:
                watch.check(revision)
                last_seen = time.monotonic()
                continue
            response = watch.get(timeout=wait)
            if response is None:
                continue
            last_seen = time.monotonic()
            if response.created and not (response.canceled or response.compact_revision):
                reason = state.diverged(response.header_revision, response.cluster_id)
                if reason is not None:
                    raise HistoryDiverged(reason, endpoint=endpoint)
                emit(state.established(endpoint, revision))
            revision = self._apply(response, revision, endpoint, emit)
            yield revision

    @staticmethod
    def _apply(
        response: WatchResponse, revision: int, endpoint: str, emit: Callable[[SourceMessage], None]
    ) -> int:
        """Emit one watch response's events; returns the new resume revision.

        Progress notifications carry no events and leave the revision alone: only an
        event's mod_revision is a safe place to resume from (a header revision is not).
        """
        if response.compact_revision:
            raise compacted(revision + 1, response.compact_revision, endpoint)
        if response.canceled:
            reason = response.cancel_reason or "no reason given"
            error = TokenRejected if "Unauthenticated" in reason else SourceError
            raise error(f"watch canceled by the server: {reason}", endpoint=endpoint)
        if not response.last_revision:
            return revision
        if response.events:
            emit(SourceEvents(revision=response.last_revision, events=response.events))
        return response.last_revision
