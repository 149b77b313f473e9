"""The verdict writer's bookkeeping: only changed keys are written, none is lost meanwhile."""

from __future__ import annotations

import math
import time
from typing import Any, cast

import pytest

from lbsync.config import EtcdSettings
from lbsync.errors import SourceError
from lbsync.probe.writer import VerdictWriter
from lbsync.source.writer import EtcdWriter, Lease


class FakeEtcd:
    """Records puts and deletes; ``fail_on`` makes the write of that key raise once."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str, str | None]] = []
        self.fail_on: str | None = None
        self.on_write: Any = None

    def put(self, key: str, value: str, *, lease: object) -> int:
        self._maybe_fail(key)
        self.ops.append(("put", key, value))
        if self.on_write is not None:
            self.on_write(key)
        return len(self.ops)

    def delete(self, key: str) -> bool:
        self._maybe_fail(key)
        self.ops.append(("delete", key, None))
        return True

    def _maybe_fail(self, key: str) -> None:
        if key == self.fail_on:
            self.fail_on = None
            raise SourceError(f"etcd refused {key}")


def sync(writer: VerdictWriter, etcd: FakeEtcd, until: float = math.inf) -> bool:
    return writer._sync(cast(EtcdWriter, etcd), cast(Lease, object()), until)


def test_only_what_changed_is_written() -> None:
    writer, etcd = VerdictWriter(EtcdSettings(), ttl=10), FakeEtcd()
    writer.set("a", "up")
    writer.set("b", "up")
    sync(writer, etcd)
    assert sorted(etcd.ops) == [("put", "a", "up"), ("put", "b", "up")]
    etcd.ops.clear()
    writer.set("a", "up")  # the same value again: nothing to write
    writer.set("b", "down")
    writer.clear("never-written")
    sync(writer, etcd)
    assert etcd.ops == [("put", "b", "down")]
    assert writer.pending() == 0


def test_a_cleared_key_is_deleted() -> None:
    writer, etcd = VerdictWriter(EtcdSettings(), ttl=10), FakeEtcd()
    writer.set("a", "up")
    sync(writer, etcd)
    writer.clear("a")
    assert writer.pending() == 1
    sync(writer, etcd)
    assert etcd.ops[-1] == ("delete", "a", None)
    assert writer.pending() == 0


def test_a_failed_write_stays_pending_and_is_retried() -> None:
    writer, etcd = VerdictWriter(EtcdSettings(), ttl=10), FakeEtcd()
    writer.set("a", "up")
    etcd.fail_on = "a"
    with pytest.raises(SourceError):
        sync(writer, etcd)
    assert writer.pending() == 1
    sync(writer, etcd)
    assert etcd.ops == [("put", "a", "up")]
    assert writer.pending() == 0


def test_a_key_set_again_during_its_write_is_written_again() -> None:
    writer, etcd = VerdictWriter(EtcdSettings(), ttl=10), FakeEtcd()
    writer.set("a", "up")
    etcd.on_write = lambda key: writer.set(key, "down") if key == "a" else None
    sync(writer, etcd)
    assert etcd.ops == [("put", "a", "up"), ("put", "a", "down")]
    assert writer.pending() == 0


def test_a_long_backlog_yields_to_the_lease_refresh() -> None:
    writer, etcd = VerdictWriter(EtcdSettings(), ttl=10), FakeEtcd()
    writer.set("a", "up")
    assert sync(writer, etcd, until=time.monotonic() - 1) is False  # refresh due: stop
    assert etcd.ops == []
    assert writer.pending() == 1
    assert sync(writer, etcd) is True
    assert etcd.ops == [("put", "a", "up")]
