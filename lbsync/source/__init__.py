"""Where lbsync's keys come from: etcd, read consistently and watched without losing events."""

from lbsync.source.etcd import EtcdSource, EtcdWriter, Lease

__all__ = ["EtcdSource", "EtcdWriter", "Lease"]
