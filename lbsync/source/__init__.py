"""Where lbsync's keys come from: etcd, read consistently and watched without losing events."""

from lbsync.source.etcd import EtcdSource
from lbsync.source.writer import EtcdWriter, Lease

__all__ = ["EtcdSource", "EtcdWriter", "Lease"]
