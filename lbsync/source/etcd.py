"""etcd as lbsync's source: a consistent paged read, then a supervised watch that resumes.

This package is the only place that imports the etcd client (``pyetcd``, from
``etcd-sdk-python``) or gRPC, so the client can be swapped here alone (``client`` builds
it and converts its exceptions, ``stream`` reads and watches, ``writer`` writes).
Everything raised is an ``lbsync.errors.SourceError``; pyetcd and gRPC objects never
leave the package.

The watch drives the raw gRPC ``Watch`` stream instead of pyetcd's ``Watcher`` thread,
which hides progress requests and swallows the end of a stream. Owning the request
iterator lets the loop ask for a progress notification every ``silence_deadline / 3``
and treat a stream that answers nothing for ``silence_deadline`` as broken (a stalled
server otherwise hangs a watch forever). etcd's gRPC proxy ignores progress requests, so
a stream that has never answered one is checked with a one-key read instead.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

from lbsync.config import EtcdSettings
from lbsync.errors import HistoryDiverged, RevisionCompacted, SourceError, SourceUnavailable
from lbsync.model import SourceEvents, SourceMessage, SourceReset
from lbsync.source.attempts import LoopState
from lbsync.source.client import (
    TokenRejected,
    check_settings,
    compacted,
    endpoint_url,
    login,
    new_client,
    translated,
)
from lbsync.source.stream import (
    StreamEnded,
    WatchStream,
    key_events,
    read_pages,
    watch_prefix,
)

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
# The longest a wait on the watch lasts before it looks at the stop event (and the silence
# deadline) again: how late ``run`` returns after a stop that comes without ``interrupt``.
# SourceRunner.stop interrupts, so the daemon's stop does not wait for it; an idle watch
# wakes 5 times per 10 s for it (it was 20 with a 0.5 s poll).
_LONGEST_WAIT = 2.0


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
        self._lock = threading.Lock()
        self._client: Any = None
        self._closed = False
        self._stop: threading.Event | None = None
        self._stream: WatchStream | None = None  # the watch being consumed, for interrupt
        self._no_progress: set[str] = set()  # endpoints seen ignoring progress requests

    # -- connection --

    @property
    def endpoint(self) -> str:
        """The endpoint in use, or every configured one before the first connection."""
        client = self._client
        return endpoint_url(client) if client is not None else ", ".join(self.settings.endpoints)

    def _connect(self) -> Any:
        with self._lock:
            if self._closed or (self._stop is not None and self._stop.is_set()):
                raise SourceUnavailable("the source is stopping", endpoint=self.endpoint)
            if self._client is not None:
                return self._client
            client = self._client = new_client(self.settings)
        try:
            login(client, self.settings)  # outside the lock: a stop can cancel it meanwhile
        except BaseException:
            self._disconnect()
            raise
        return client

    def _disconnect(self) -> None:
        """Drop the client: the next call gets fresh channels and, with auth, a fresh token."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def interrupt(self) -> None:
        """After ``stop`` is set: wake the watch's wait so that ``run`` returns now, not
        at the silence deadline. Safe from any thread."""
        stream = self._stream
        if stream is not None:
            stream.wake()

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
            client = self._connect()
            endpoint = endpoint_url(client)
            try:
                with translated(endpoint):
                    return read_pages(
                        client,
                        self._prefix,
                        prefix_range_end(self._prefix),
                        self.page_size,
                        self.page_bytes,
                    )
            except (RevisionCompacted, TokenRejected) as exc:
                if attempt:
                    raise
                if isinstance(exc, TokenRejected):
                    self._disconnect()
        raise AssertionError("unreachable")  # pragma: no cover

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
        client = self._connect()
        endpoint = endpoint_url(client)
        create = etcdrpc.WatchCreateRequest(
            key=self._prefix,
            range_end=prefix_range_end(self._prefix),
            start_revision=state.revision + 1,
            progress_notify=True,
        )
        progress_every = max(self.settings.silence_deadline / 3, 0.05)
        with translated(endpoint):
            stream = WatchStream(client, create, progress_every=progress_every)
        try:
            with translated(endpoint):
                yield from self._consume(
                    client, stream, endpoint=endpoint, emit=emit, stop=stop, state=state
                )
        finally:
            self._stream = None
            stream.close()

    def _consume(
        self,
        client: Any,
        stream: WatchStream,
        *,
        endpoint: str,
        emit: Callable[[SourceMessage], None],
        stop: threading.Event,
        state: LoopState,
    ) -> Iterator[int]:
        """Apply responses until stop; a silent stream raises SourceUnavailable.

        Silence means no response at all for ``silence_deadline``. On a stream that has
        answered a progress request before, that is a broken stream. On one that never
        has, the endpoint may simply not answer them (etcd's gRPC proxy ignores progress
        requests): a small read on the same connection decides, and while reads succeed
        the watch is kept.
        """
        assert state.revision is not None
        revision = state.revision
        deadline = self.settings.silence_deadline
        last_seen = time.monotonic()
        progress_answered = False
        self._stream = stream
        while not stop.is_set():
            silent_for = time.monotonic() - last_seen
            try:
                response = stream.get(timeout=min(max(deadline - silent_for, 0.01), _LONGEST_WAIT))
            except StreamEnded as exc:
                raise SourceUnavailable(str(exc), endpoint=endpoint) from exc
            if response is None:
                if time.monotonic() - last_seen > deadline:
                    if progress_answered:
                        raise SourceUnavailable(
                            f"watch silent for more than {deadline:g}s", endpoint=endpoint
                        )
                    self._probe(client, endpoint, deadline)
                    last_seen = time.monotonic()
                continue
            last_seen = time.monotonic()
            if response.created and not (response.canceled or response.compact_revision):
                header = response.header
                reason = state.diverged(int(header.revision), int(header.cluster_id))
                if reason is not None:
                    raise HistoryDiverged(reason, endpoint=endpoint)
                emit(state.established(endpoint, revision))
            elif not (response.events or response.canceled or response.compact_revision):
                progress_answered = True
            revision = self._apply(response, revision, endpoint, emit)
            yield revision

    def _probe(self, client: Any, endpoint: str, deadline: float) -> None:
        """A one-key read: proves the endpoint (and, through a proxy, etcd) still answers."""
        try:
            with translated(endpoint):
                client.get_response(self._prefix)
        except SourceError as exc:
            raise SourceUnavailable(
                f"watch silent for more than {deadline:g}s and a read failed: {exc.message}",
                endpoint=endpoint,
            ) from exc
        if endpoint not in self._no_progress:
            self._no_progress.add(endpoint)
            log.info(
                "source.progress_unanswered",
                endpoint=endpoint,
                note="the endpoint ignores watch progress requests (an etcd gRPC proxy?); "
                "an idle watch is checked with a read instead",
            )

    @staticmethod
    def _apply(
        response: Any, revision: int, endpoint: str, emit: Callable[[SourceMessage], None]
    ) -> int:
        """Emit one watch response's events; returns the new resume revision.

        Progress notifications carry no events and leave the revision alone: only an
        event's mod_revision is a safe place to resume from (a header revision is not).
        """
        if response.compact_revision:
            raise compacted(revision + 1, int(response.compact_revision), endpoint)
        if response.canceled:
            reason = response.cancel_reason or "no reason given"
            raise SourceError(f"watch canceled by the server: {reason}", endpoint=endpoint)
        if not response.events:
            return revision
        revision = int(response.events[-1].kv.mod_revision)
        events = key_events(response.events)
        if events:
            emit(SourceEvents(revision=revision, events=tuple(events)))
        return revision
