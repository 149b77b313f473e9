"""Writing to etcd (``lbsync register``/``mark``, tests, benches): puts, deletes, leases."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from lbsync.config import EtcdSettings
from lbsync.errors import LeaseExpired
from lbsync.source.client import endpoint_url, login, new_client, translated
from lbsync.source.endpoints import TokenRejected, check_settings

log = structlog.get_logger("lbsync.source")

_T = TypeVar("_T")


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
                client = new_client(self.settings, idle_pings=False)
                try:
                    login(client, self.settings)
                except BaseException:
                    client.close()
                    raise
                self._client = client
            client = self._client
            try:
                with translated(endpoint_url(client)):
                    return fn(client)
            except TokenRejected as exc:
                self.close()
                if attempt:
                    raise
                log.debug("writer.reauthenticate", endpoint=exc.endpoint, error=str(exc))
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
        return endpoint_url(client) if client is not None else ", ".join(self.settings.endpoints)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> EtcdWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
