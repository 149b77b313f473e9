"""etcd as lbsync's source: consistent paged reads, a supervised watch, and a small writer.

This is the only module that imports the etcd client (``pyetcd``, from
``etcd-sdk-python``) or gRPC, so the client can be swapped here alone. Everything it
raises is an ``lbsync.errors.SourceError``; pyetcd and gRPC objects never leave it.

The watch drives the raw gRPC ``Watch`` stream instead of pyetcd's ``Watcher`` thread,
which hides progress requests and swallows the end of a stream. Owning the request
iterator lets the loop ask for a progress notification every ``silence_deadline / 3``
and treat a stream that answers nothing for ``silence_deadline`` as broken (a stalled
server otherwise hangs a watch forever). etcd's gRPC proxy ignores progress requests, so
a stream that has never answered one is checked with a one-key read instead.

Authentication is done here too, not by pyetcd (see ``_authenticate``): with failover
across endpoints, the token sent as metadata (so it works without TLS as well), and a
fresh token whenever etcd rejects the old one (``--auth-token-ttl``).
"""

from __future__ import annotations

import contextlib
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
import structlog
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.utils import prefix_range_end

from lbsync.config import EtcdSettings
from lbsync.errors import (
    ConfigError,
    LeaseExpired,
    RevisionCompacted,
    SourceError,
    SourceUnavailable,
)
from lbsync.model import (
    KeyEvent,
    KeyValue,
    SourceEvents,
    SourceMessage,
    SourceReset,
    SourceStatus,
)

log = structlog.get_logger("lbsync.source")

PAGE_SIZE = 5000
DEFAULT_PORT = 2379
BACKOFF_INITIAL = 0.1
# Low on purpose: a restarted etcd must be found within ~1 s (issue 4 asks convergence
# within 2 s of etcd being healthy). With a 5 s cap, an 8 s outage converged in up to
# 4.1 s; with 1 s, in at most 0.8 s. At many LB hosts, put a gRPC proxy in between.
BACKOFF_CAP = 1.0
# How often blocking loops look at the stop event; bounds how late run() returns
# (and costs a wake-up each time, even when idle: see daemon._TICK).
_POLL = 0.5
_MAX_MESSAGE = 256 * 1024 * 1024  # a 100k-key prefix is ~11.5 MB; leave ample room
_REPEAT_WARNING = 30.0  # seconds between two warnings about one run of failed attempts

_UNAVAILABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_UNAVAILABLE_ERRORS = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
)


# --- the client ------------------------------------------------------------------------


def _channel_options(*, idle_pings: bool) -> list[tuple[str, int]]:
    """Keepalive that notices a dead or stalled server in seconds, and room for big ranges.

    The keepalive interval stays at etcd's default ``--grpc-keepalive-min-time`` (5 s):
    pinging more often earns a GOAWAY "too_many_pings". So does pinging a connection with
    no call open (measured: after ~15 s idle), hence ``idle_pings`` only for the watch,
    which always has its stream open. Reconnect backoff is capped low so a restarted
    etcd is found again within about a second.
    """
    return [
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_timeout_ms", 3000),
        ("grpc.http2.ping_timeout_ms", 3000),
        ("grpc.keepalive_permit_without_calls", int(idle_pings)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


@dataclass(frozen=True)
class _Address:
    host: str
    port: int
    secure: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"


def _parse_endpoint(url: str, *, tls_default: bool) -> _Address:
    """``http://h:p``, ``https://h:p``, ``h:p`` or ``h``; no scheme means TLS iff a CA is set."""
    parts = urlsplit(url if "://" in url else f"{'https' if tls_default else 'http'}://{url}")
    if parts.hostname is None:
        raise ConfigError(f"{url!r} has no host", field="etcd.endpoints")
    return _Address(parts.hostname, parts.port or DEFAULT_PORT, parts.scheme == "https")


def _read_file(path: Any, field: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=field) from exc


def _credentials(settings: EtcdSettings) -> Any:
    ca = _read_file(settings.ca_file, "etcd.ca_file") if settings.ca_file else None
    key = _read_file(settings.key_file, "etcd.key_file") if settings.key_file else None
    cert = _read_file(settings.cert_file, "etcd.cert_file") if settings.cert_file else None
    return grpc.ssl_channel_credentials(ca, key, cert)


def _password(settings: EtcdSettings) -> str | None:
    if settings.password_file is None:
        return None
    raw = _read_file(settings.password_file, "etcd.password_file")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ConfigError("the password file is not UTF-8", field="etcd.password_file") from exc


def _addresses(settings: EtcdSettings) -> list[_Address]:
    tls_default = settings.ca_file is not None
    addresses = [_parse_endpoint(url, tls_default=tls_default) for url in settings.endpoints]
    tls_files = settings.ca_file or settings.cert_file
    if tls_files and (plain := [a.url for a in addresses if not a.secure]):
        raise ConfigError(
            f"{', '.join(plain)} is plain HTTP but TLS files are set: use https://",
            field="etcd.endpoints",
        )
    return addresses


def check_settings(settings: EtcdSettings) -> None:
    """Parse the endpoints and read every TLS and password file once; raises ConfigError.

    Run where lbsync starts, so a typo fails at once instead of in the retry loop (which
    re-reads the files on every reconnect, so that rotated certificates are picked up).
    """
    if any(a.secure for a in _addresses(settings)):
        _credentials(settings)
    _password(settings)
    if settings.user is not None and not any(a.secure for a in _addresses(settings)):
        log.warning(
            "etcd_auth_without_tls",
            user=settings.user,
            reason="the password and token cross the network in clear text",
        )


def _new_client(settings: EtcdSettings, *, idle_pings: bool = True) -> Any:
    """A pyetcd multi-endpoint client that fails over and retries a failed endpoint after 1 s.

    pyetcd's default locks a failed endpoint out for 300 s; ``time_retry=1`` avoids that.
    No network call happens here (channels connect lazily); ``_login`` comes next. A file
    that cannot be read (a certificate being rotated) is a SourceError, so the caller
    retries instead of giving up.
    """
    try:
        addresses = _addresses(settings)
        creds = _credentials(settings) if any(a.secure for a in addresses) else None
    except ConfigError as exc:
        raise SourceError(str(exc), endpoint=", ".join(settings.endpoints)) from exc
    options = _channel_options(idle_pings=idle_pings)
    endpoints = [
        pyetcd.Endpoint(
            a.host,
            a.port,
            secure=a.secure,
            creds=creds if a.secure else None,
            time_retry=1,
            opts=options,
        )
        for a in addresses
    ]
    return pyetcd.MultiEndpointEtcd3Client(endpoints, timeout=settings.timeout, failover=True)


def _login(client: Any, settings: EtcdSettings) -> None:
    """With a user set, authenticate (a network call); the password file is read each time."""
    if settings.user is None:
        return
    try:
        password = _password(settings)
    except ConfigError as exc:
        raise SourceError(str(exc), endpoint=", ".join(settings.endpoints)) from exc
    if password is not None:
        _authenticate(client, settings.user, password, settings.timeout)


def _authenticate(client: Any, user: str, password: str, timeout: float) -> None:
    """Get a token from the first endpoint that answers and attach it to every call.

    Done here rather than by pyetcd, which asks one randomly chosen endpoint with no
    failover, and sends the token as gRPC *call credentials*, which gRPC refuses to
    send over a plain-text channel. The token goes as plain ``token`` metadata instead,
    as etcd's own Go client sends it.
    """
    request = etcdrpc.AuthenticateRequest(name=user, password=password)
    everyone = ", ".join(f"{e.protocol}://{e.netloc}" for e in client.endpoints.values())
    last: SourceError | None = None
    for _ in client.endpoints:
        with _translated(everyone):
            channel = client.channel  # the endpoint in use, or the next one not failed
        url = _endpoint_url(client)
        try:
            with _translated(url):
                try:
                    response = etcdrpc.AuthStub(channel).Authenticate(request, timeout)
                except grpc.RpcError as exc:
                    error = _from_rpc_error(exc, url)
                    if isinstance(error, SourceUnavailable):
                        raise error from exc
                    details = exc.details() if callable(getattr(exc, "details", None)) else exc
                    raise SourceError(
                        f"authentication as {user!r} failed: {details}", endpoint=url
                    ) from exc
        except SourceUnavailable as exc:
            client.endpoint_in_use.fail()  # the next round, and the client, move on
            last = exc
            continue
        client.metadata = (("token", response.token),)
        client.call_credentials = None
        return
    assert last is not None
    raise last


def _endpoint_url(client: Any) -> str:
    endpoint = client.endpoint_in_use
    return f"{endpoint.protocol}://{endpoint.netloc}"


# --- errors at the boundary ------------------------------------------------------------


@contextlib.contextmanager
def _translated(endpoint: str) -> Iterator[None]:
    """Turn pyetcd/gRPC exceptions raised inside into lbsync's SourceError tree."""
    try:
        yield
    except SourceError:
        raise
    except etcd_exc.RevisionCompactedError as exc:
        raise _compacted(0, exc.compacted_revision, endpoint) from exc
    except _UNAVAILABLE_ERRORS as exc:
        raise SourceUnavailable(_describe(exc), endpoint=endpoint) from exc
    except grpc.RpcError as exc:
        raise _from_rpc_error(exc, endpoint) from exc
    except etcd_exc.Etcd3Exception as exc:
        raise SourceError(_describe(exc), endpoint=endpoint) from exc
    except ValueError as exc:
        # pyetcd: "Trying to use a failed node"; gRPC: "Cannot invoke RPC on closed channel!"
        if not any(text in str(exc) for text in ("failed node", "closed channel")):
            raise
        raise SourceUnavailable(str(exc), endpoint=endpoint) from exc


def _describe(exc: BaseException) -> str:
    """pyetcd replaces gRPC errors with bare ones ("etcd connection failed"): add the cause."""
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if isinstance(cause, grpc.RpcError) and callable(getattr(cause, "details", None)):
        return f"{text} ({cause.details()})"
    return text


def _from_rpc_error(exc: Any, endpoint: str) -> SourceError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in (details or ""):
        return _compacted(0, 0, endpoint)
    message = f"{code.name if code else 'gRPC error'}: {details}"
    if code in _UNAVAILABLE_CODES:
        return SourceUnavailable(message, endpoint=endpoint)
    if code is grpc.StatusCode.UNAUTHENTICATED or "auth store is old" in (details or ""):
        return _TokenRejected(message, endpoint=endpoint)
    return SourceError(message, endpoint=endpoint)


class _TokenRejected(SourceError):
    """etcd no longer accepts our auth token (expired, or the auth store changed under it).

    A new client authenticates afresh: the writer does it and retries once, the source's
    loop rebuilds its client after any failure anyway (pitfall 7 of the client notes).
    """


def _compacted(revision: int, compact_revision: int, endpoint: str) -> RevisionCompacted:
    return RevisionCompacted(revision, compact_revision, endpoint=endpoint)


# --- reading ---------------------------------------------------------------------------


def _watch_prefix(prefix: str) -> bytes:
    """Keys *under* the prefix: ``/lbsync`` watches ``/lbsync/``, not ``/lbsync-other``."""
    return prefix.encode() if prefix.endswith("/") else f"{prefix}/".encode()


def _decode_key(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("etcd_key_skipped", key=repr(raw), reason="key is not UTF-8")
        return None


def _key_values(kvs: Any) -> list[KeyValue]:
    out = []
    for kv in kvs:
        key = _decode_key(kv.key)
        if key is not None:
            out.append(KeyValue(key=key, value=bytes(kv.value), mod_revision=kv.mod_revision))
    return out


def _key_events(events: Any) -> list[KeyEvent]:
    out = []
    for event in events:
        key = _decode_key(event.kv.key)
        if key is None:
            continue
        revision = int(event.kv.mod_revision)
        if event.type == kv_pb2.Event.DELETE:
            out.append(KeyEvent(kind="delete", key=key, mod_revision=revision))
        else:
            out.append(
                KeyEvent(kind="put", key=key, value=bytes(event.kv.value), mod_revision=revision)
            )
    return out


def _read_pages(client: Any, start: bytes, end: bytes, page_size: int) -> SourceReset:
    """Page through [start, end) with every page pinned to the first page's revision."""
    kvs: list[KeyValue] = []
    revision: int | None = None
    while True:
        resp = client.get_range_response(start, end, limit=page_size, revision=revision)
        if revision is None:
            revision = int(resp.header.revision)
        kvs.extend(_key_values(resp.kvs))
        if not resp.more or not resp.kvs:
            return SourceReset(revision=revision, kvs=tuple(kvs))
        start = bytes(resp.kvs[-1].key) + b"\0"


# --- the watch stream ------------------------------------------------------------------


class _StreamEnded(Exception):
    """The server closed the watch stream without an error (pitfall 6)."""


_END = object()
_T = TypeVar("_T")


class _WatchStream:
    """One gRPC Watch call on one prefix: our own request iterator, a reader thread.

    The request iterator sends the create request, then a progress request every
    ``progress_every`` seconds until closed. The reader thread moves responses (and the
    final error or end) into a queue, so the caller can wait with a timeout.
    """

    def __init__(self, client: Any, create: Any, *, progress_every: float) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self._progress_every = progress_every
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(client.channel)
        self._call = stub.Watch(
            self._request_iter(),
            credentials=client.call_credentials,
            metadata=client.metadata,
        )
        self._reader = threading.Thread(target=self._read, name="lbsync-etcd-watch", daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[Any]:
        progress = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())
        while True:
            try:
                request = self._requests.get(timeout=self._progress_every)
            except queue.Empty:
                request = progress
            if request is None:
                return
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except Exception as exc:  # handed to the caller's thread, which translates it
            self._responses.put(exc)

    def get(self, timeout: float) -> Any | None:
        """The next response, or None after ``timeout``. Raises the stream's error or end."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            raise _StreamEnded("the watch stream ended")
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join(timeout=5)


# --- the source ------------------------------------------------------------------------


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

    def __init__(self, settings: EtcdSettings, *, page_size: int = PAGE_SIZE) -> None:
        """Raises ConfigError at once for unusable endpoints or unreadable TLS/password files."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        check_settings(settings)
        self.settings = settings
        self.page_size = page_size
        self._prefix = _watch_prefix(settings.prefix)
        self._lock = threading.Lock()
        self._client: Any = None
        self._closed = False
        self._stop: threading.Event | None = None
        self._no_progress: set[str] = set()  # endpoints seen ignoring progress requests

    # -- connection --

    @property
    def endpoint(self) -> str:
        """The endpoint in use, or every configured one before the first connection."""
        client = self._client
        return _endpoint_url(client) if client is not None else ", ".join(self.settings.endpoints)

    def _connect(self) -> Any:
        with self._lock:
            if self._closed or (self._stop is not None and self._stop.is_set()):
                raise SourceUnavailable("the source is stopping", endpoint=self.endpoint)
            if self._client is not None:
                return self._client
            client = self._client = _new_client(self.settings)
        try:
            _login(client, self.settings)  # outside the lock: a stop can cancel it meanwhile
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
            endpoint = _endpoint_url(client)
            try:
                with _translated(endpoint):
                    return _read_pages(
                        client, self._prefix, prefix_range_end(self._prefix), self.page_size
                    )
            except (RevisionCompacted, _TokenRejected) as exc:
                if attempt:
                    raise
                if isinstance(exc, _TokenRejected):
                    self._disconnect()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the supervised loop --

    def run(self, emit: Callable[[SourceMessage], None], stop: threading.Event) -> None:
        """Read, watch, reconnect and resync until ``stop`` is set. Meant for its own thread.

        Emits a ``SourceReset`` for every full read, ``SourceEvents`` per watch response,
        and ``SourceStatus`` whenever the watch is established or an attempt fails. After
        a loss it resumes from the last event's revision + 1, so no event is lost or
        repeated; when that revision has been compacted it emits a fresh ``SourceReset``.
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
        state = _LoopState()
        while not (stop.is_set() or self._closed):
            try:
                if state.revision is None:
                    state.revision = self._reset(emit, state)
                for revision in self._watch(state, emit, stop):
                    state.revision = revision
                    backoff.reset()
            except RevisionCompacted as exc:
                if state.revision is not None:
                    log.warning(
                        "etcd_resync",
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

    def _reset(self, emit: Callable[[SourceMessage], None], state: _LoopState) -> int:
        reset = self.read_all()
        log.info(
            "etcd_read",
            endpoint=self.endpoint,
            revision=reset.revision,
            keys=len(reset.kvs),
            resync=state.ever_connected,
        )
        emit(reset)
        return reset.revision

    def _lost(
        self, exc: SourceError, emit: Callable[[SourceMessage], None], state: _LoopState
    ) -> None:
        """Report a failed attempt: a warning when the connection is lost, when a run of
        failures starts (etcd down at start, a refused password), and again every
        ``_REPEAT_WARNING`` seconds while it lasts; the attempts in between at debug."""
        endpoint = exc.endpoint or self.endpoint
        now = time.monotonic()
        state.failures += 1
        fields = {
            "endpoint": endpoint,
            "revision": state.revision,
            "error": str(exc),
            "attempts": state.failures,
        }
        if state.connected:
            log.warning("etcd_lost", **fields)
            state.warned_at = now
        elif state.warned_at is None or now - state.warned_at >= _REPEAT_WARNING:
            log.warning("etcd_unavailable", **fields)
            state.warned_at = now
        else:
            log.debug("etcd_unavailable", **fields)
        state.connected = False
        self._disconnect()
        emit(
            SourceStatus(
                connected=False, endpoint=endpoint, error=str(exc), revision=state.revision or 0
            )
        )

    def _watch(
        self, state: _LoopState, emit: Callable[[SourceMessage], None], stop: threading.Event
    ) -> Iterator[int]:
        """Watch from ``state.revision`` + 1; yields the resume revision after each response.

        Returns only when ``stop`` is set; raises SourceUnavailable on loss, silence or
        the stream's end, RevisionCompacted when ``state.revision`` + 1 is gone.
        """
        assert state.revision is not None
        client = self._connect()
        endpoint = _endpoint_url(client)
        create = etcdrpc.WatchCreateRequest(
            key=self._prefix,
            range_end=prefix_range_end(self._prefix),
            start_revision=state.revision + 1,
            progress_notify=True,
        )
        progress_every = max(self.settings.silence_deadline / 3, 0.05)
        with _translated(endpoint):
            stream = _WatchStream(client, create, progress_every=progress_every)
        try:
            with _translated(endpoint):
                yield from self._consume(
                    client, stream, endpoint=endpoint, emit=emit, stop=stop, state=state
                )
        finally:
            stream.close()

    def _consume(
        self,
        client: Any,
        stream: _WatchStream,
        *,
        endpoint: str,
        emit: Callable[[SourceMessage], None],
        stop: threading.Event,
        state: _LoopState,
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
        while not stop.is_set():
            try:
                response = stream.get(timeout=_POLL)
            except _StreamEnded as exc:
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
                self._established(endpoint, revision, emit, state)
            elif not (response.events or response.canceled or response.compact_revision):
                progress_answered = True
            revision = self._apply(response, revision, endpoint, emit)
            yield revision

    def _probe(self, client: Any, endpoint: str, deadline: float) -> None:
        """A one-key read: proves the endpoint (and, through a proxy, etcd) still answers."""
        try:
            with _translated(endpoint):
                client.get_response(self._prefix)
        except SourceError as exc:
            raise SourceUnavailable(
                f"watch silent for more than {deadline:g}s and a read failed: {exc.message}",
                endpoint=endpoint,
            ) from exc
        if endpoint not in self._no_progress:
            self._no_progress.add(endpoint)
            log.info(
                "etcd_progress_unanswered",
                endpoint=endpoint,
                note="the endpoint ignores watch progress requests (an etcd gRPC proxy?); "
                "an idle watch is checked with a read instead",
            )

    def _established(
        self,
        endpoint: str,
        revision: int,
        emit: Callable[[SourceMessage], None],
        state: _LoopState,
    ) -> None:
        event = "etcd_resumed" if state.ever_connected else "etcd_connected"
        log.info(event, endpoint=endpoint, revision=revision, failed_attempts=state.failures)
        state.connected = state.ever_connected = True
        state.failures, state.warned_at = 0, None
        emit(SourceStatus(connected=True, endpoint=endpoint, revision=revision))

    @staticmethod
    def _apply(
        response: Any, revision: int, endpoint: str, emit: Callable[[SourceMessage], None]
    ) -> int:
        """Emit one watch response's events; returns the new resume revision.

        Progress notifications carry no events and leave the revision alone: only an
        event's mod_revision is a safe place to resume from (a header revision is not).
        """
        if response.compact_revision:
            raise _compacted(revision + 1, int(response.compact_revision), endpoint)
        if response.canceled:
            reason = response.cancel_reason or "no reason given"
            raise SourceError(f"watch canceled by the server: {reason}", endpoint=endpoint)
        if not response.events:
            return revision
        revision = int(response.events[-1].kv.mod_revision)
        events = _key_events(response.events)
        if events:
            emit(SourceEvents(revision=revision, events=tuple(events)))
        return revision


@dataclass
class _LoopState:
    """What the supervised loop carries between attempts."""

    revision: int | None = None  # resume after this; None: a full read comes first
    connected: bool = False
    ever_connected: bool = False
    failures: int = 0  # failed attempts since the watch was last established
    warned_at: float | None = None  # when the current run of failures was last warned


# --- writing ---------------------------------------------------------------------------


class Lease:
    """A granted etcd lease. Keys put with it vanish when it expires or is revoked."""

    def __init__(self, writer: EtcdWriter, lease_id: int, ttl: int) -> None:
        self._writer = writer
        self.id = lease_id
        self.ttl = ttl

    def refresh(self) -> int:
        """Keep the lease alive; returns the new TTL. Raises LeaseExpired if it is gone."""
        return self._writer._refresh(self.id)

    def revoke(self) -> None:
        """End the lease now; its keys are deleted."""
        self._writer._revoke(self.id)


class EtcdWriter:
    """Puts, deletes, leases and compaction through the same client factory as the source.

    A call that etcd refuses because the auth token has expired is retried once with a
    fresh client (which authenticates again); every other failure is raised.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        """Raises ConfigError at once for unusable endpoints or unreadable TLS/password files."""
        check_settings(settings)
        self.settings = settings
        self._client: Any = None

    def _call(self, fn: Callable[[Any], _T]) -> _T:
        for attempt in range(2):
            if self._client is None:
                client = _new_client(self.settings, idle_pings=False)
                try:
                    _login(client, self.settings)
                except BaseException:
                    client.close()
                    raise
                self._client = client
            client = self._client
            try:
                with _translated(_endpoint_url(client)):
                    return fn(client)
            except _TokenRejected as exc:
                self.close()
                if attempt:
                    raise
                log.debug("etcd_reauthenticate", endpoint=exc.endpoint, error=str(exc))
        raise AssertionError("unreachable")  # pragma: no cover

    def put(
        self, key: str, value: str | bytes, ttl: float | None = None, *, lease: Lease | None = None
    ) -> int:
        """Write ``key``; returns the revision of the write.

        ``ttl`` attaches a fresh lease nobody refreshes (the key vanishes after it);
        ``lease`` attaches an existing one.
        """
        if ttl is not None and lease is not None:
            raise ValueError("give ttl or lease, not both")
        lease_id = self.lease(ttl).id if ttl is not None else (lease.id if lease else None)
        return self._call(lambda c: int(c.put(key, value, lease=lease_id).header.revision))

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        return self._call(lambda c: bool(c.delete(key)))

    def get(self, key: str) -> bytes | None:
        value, _meta = self._call(lambda c: c.get(key))
        return None if value is None else bytes(value)

    def lease(self, ttl: float) -> Lease:
        """Grant a lease of ``ttl`` seconds (rounded up; etcd may raise it to its minimum)."""
        granted = self._call(lambda c: c.lease(max(1, math.ceil(ttl))))
        return Lease(self, int(granted.id), int(granted.ttl))

    def _refresh(self, lease_id: int) -> int:
        responses = self._call(lambda c: list(c.refresh_lease(lease_id)))
        ttl = int(responses[-1].TTL) if responses else 0
        if ttl <= 0:
            raise LeaseExpired(lease_id, endpoint=self.endpoint)
        return ttl

    def _revoke(self, lease_id: int) -> None:
        self._call(lambda c: c.revoke_lease(lease_id))

    def compact(self, revision: int) -> None:
        """Drop history before ``revision``; waits until the compaction is applied."""
        self._call(lambda c: c.compact(revision, physical=True))

    def revision(self, key: str | None = None) -> int:
        """The store's current revision, from a count of ``key``: with etcd RBAC, name a key
        the user may read (the default, the key NUL, is readable only with a wide grant)."""
        probe = b"\0" if key is None else key.encode()
        return self._call(lambda c: int(c.get_response(probe, count_only=True).header.revision))

    @property
    def endpoint(self) -> str:
        """The endpoint in use, or every configured one before the first call."""
        client = self._client
        return _endpoint_url(client) if client is not None else ", ".join(self.settings.endpoints)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> EtcdWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
