"""Connecting to etcd: client options, TLS and password files, authentication, and the
conversion of pyetcd/gRPC exceptions into ``lbsync.errors.SourceError`` at the boundary.

Authentication is done here, not by pyetcd (see ``_authenticate``): with failover
across endpoints, the token sent as metadata (so it works without TLS as well), and a
fresh token whenever etcd rejects the old one (``--auth-token-ttl``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
import pyetcd
import structlog
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError, SourceError, SourceUnavailable
from lbsync.source.endpoints import TokenRejected, addresses, compacted, password, tls_files

log = structlog.get_logger("lbsync.source")


def _quiet_grpc_waits() -> None:
    """Let threads that wait on a gRPC call sleep until it has something for them.

    grpc's synchronous API waits on a streaming call (the watch's reader thread, the
    thread that feeds it requests) in slices of ``grpc._common.MAXIMUM_WAIT_TIMEOUT``
    (0.1 s), so that a main thread blocked there still runs its signal handlers
    (grpc/grpc#19464). Ten wake-ups a second per thread were ~10 ms of CPU per 10 s of
    an idle daemon (``python -m bench idle``). lbsync never waits on a call in its main
    thread; and there CPython (3.2+) runs signal handlers during a timed ``Condition.wait``
    anyway. Set only where grpc has the constant; a grpc without it is left alone.
    """
    import grpc._common

    if isinstance(getattr(grpc._common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        grpc._common.MAXIMUM_WAIT_TIMEOUT = _GRPC_WAIT_SLICE


_GRPC_WAIT_SLICE = 60.0
_quiet_grpc_waits()

_MAX_MESSAGE = 256 * 1024 * 1024  # a 100k-key prefix is ~11.5 MB; leave ample room

_UNAVAILABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_UNAVAILABLE_ERRORS = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
)


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


def _credentials(settings: EtcdSettings) -> Any:
    ca, key, cert = tls_files(settings)
    return grpc.ssl_channel_credentials(ca, key, cert)


def new_client(settings: EtcdSettings, *, idle_pings: bool = True) -> Any:
    """A pyetcd multi-endpoint client that fails over and retries a failed endpoint after 1 s.

    pyetcd's default locks a failed endpoint out for 300 s; ``time_retry=1`` avoids that.
    No network call happens here (channels connect lazily); ``login`` comes next. A file
    that cannot be read (a certificate being rotated) is a SourceError, so the caller
    retries instead of giving up.
    """
    try:
        found = addresses(settings)
        creds = _credentials(settings) if any(a.secure for a in found) else None
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
        for a in found
    ]
    return pyetcd.MultiEndpointEtcd3Client(endpoints, timeout=settings.timeout, failover=True)


def login(client: Any, settings: EtcdSettings) -> None:
    """With a user set, authenticate (a network call); the password file is read each time."""
    if settings.user is None:
        return
    try:
        secret = password(settings)
    except ConfigError as exc:
        raise SourceError(str(exc), endpoint=", ".join(settings.endpoints)) from exc
    if secret is not None:
        _authenticate(client, settings.user, secret, settings.timeout)


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
        with translated(everyone):
            channel = client.channel  # the endpoint in use, or the next one not failed
        url = endpoint_url(client)
        try:
            with translated(url):
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


def endpoint_url(client: Any) -> str:
    endpoint = client.endpoint_in_use
    return f"{endpoint.protocol}://{endpoint.netloc}"


@contextlib.contextmanager
def translated(endpoint: str) -> Iterator[None]:
    """Turn pyetcd/gRPC exceptions raised inside into lbsync's SourceError tree."""
    try:
        yield
    except SourceError:
        raise
    except etcd_exc.RevisionCompactedError as exc:
        raise compacted(0, exc.compacted_revision, endpoint) from exc
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
        return compacted(0, 0, endpoint)
    message = f"{code.name if code else 'gRPC error'}: {details}"
    if code in _UNAVAILABLE_CODES:
        return SourceUnavailable(message, endpoint=endpoint)
    if code is grpc.StatusCode.UNAUTHENTICATED or "auth store is old" in (details or ""):
        return TokenRejected(message, endpoint=endpoint)
    return SourceError(message, endpoint=endpoint)
