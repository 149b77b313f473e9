"""Where lbsync's keys come from: etcd, read consistently and watched without losing events.

The names are loaded on first use: importing ``lbsync.source.etcd`` (the daemon's source,
on the JSON gateway) must not load the writer, which needs gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lbsync.source.etcd import EtcdSource
    from lbsync.source.writer import EtcdWriter, Lease

__all__ = ["EtcdSource", "EtcdWriter", "Lease"]


def __getattr__(name: str) -> Any:
    if name == "EtcdSource":
        from lbsync.source.etcd import EtcdSource

        return EtcdSource
    if name in ("EtcdWriter", "Lease"):
        from lbsync.source import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'lbsync.source' has no attribute {name!r}")
