"""etcd endpoints and the files behind them (TLS, password), shared by both transports.

No gRPC here: the JSON gateway transport must be usable without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError, RevisionCompacted, SourceError, SourceUnavailable

log = structlog.get_logger("lbsync.source")

DEFAULT_PORT = 2379


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    secure: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"


def parse_endpoint(url: str, *, tls_default: bool) -> Address:
    """``http://h:p``, ``https://h:p``, ``h:p`` or ``h``; no scheme means TLS iff a CA is set."""
    parts = urlsplit(url if "://" in url else f"{'https' if tls_default else 'http'}://{url}")
    if parts.hostname is None:
        raise ConfigError(f"{url!r} has no host", field="etcd.endpoints")
    return Address(parts.hostname, parts.port or DEFAULT_PORT, parts.scheme == "https")


def read_file(path: Any, field: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=field) from exc


def password(settings: EtcdSettings) -> str | None:
    if settings.password_file is None:
        return None
    raw = read_file(settings.password_file, "etcd.password_file")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ConfigError("the password file is not UTF-8", field="etcd.password_file") from exc


def addresses(settings: EtcdSettings) -> list[Address]:
    tls_default = settings.ca_file is not None
    found = [parse_endpoint(url, tls_default=tls_default) for url in settings.endpoints]
    tls_files = settings.ca_file or settings.cert_file
    if tls_files and (plain := [a.url for a in found if not a.secure]):
        raise ConfigError(
            f"{', '.join(plain)} is plain HTTP but TLS files are set: use https://",
            field="etcd.endpoints",
        )
    return found


def tls_files(settings: EtcdSettings) -> tuple[bytes | None, bytes | None, bytes | None]:
    """The CA, client key and client certificate (PEM bytes), each None when not set."""
    ca = read_file(settings.ca_file, "etcd.ca_file") if settings.ca_file else None
    key = read_file(settings.key_file, "etcd.key_file") if settings.key_file else None
    cert = read_file(settings.cert_file, "etcd.cert_file") if settings.cert_file else None
    return ca, key, cert


def check_settings(settings: EtcdSettings) -> None:
    """Parse the endpoints and read every TLS and password file once; raises ConfigError.

    Run where lbsync starts, so a typo fails at once instead of in the retry loop (which
    re-reads the files on every reconnect, so that rotated certificates are picked up).
    """
    if any(a.secure for a in addresses(settings)):
        tls_files(settings)
    password(settings)
    if settings.user is not None and not any(a.secure for a in addresses(settings)):
        log.warning(
            "source.auth_without_tls",
            user=settings.user,
            reason="the password and token cross the network in clear text",
        )


class TokenRejected(SourceError):
    """etcd no longer accepts our auth token (expired, or the auth store changed under it).

    A new client authenticates afresh: the writer does it and retries once, the source's
    loop rebuilds its client after any failure anyway (pitfall 7 of the client notes).
    """


class GatewayNotServed(SourceUnavailable):
    """The endpoint answers HTTP but not etcd's JSON gateway (``/v3/...`` is a 404, as on
    an etcd gRPC proxy): with ``transport = "auto"`` the source falls back to gRPC."""


def compacted(revision: int, compact_revision: int, endpoint: str) -> RevisionCompacted:
    return RevisionCompacted(revision, compact_revision, endpoint=endpoint)
