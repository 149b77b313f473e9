"""A full read's paging: pinned to the first page's revision, later pages sized by bytes."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import pytest
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from lbsync.source.stream import next_page_limit, read_pages


@dataclass
class RangeServer:
    """Answers ``get_range_response`` from sorted keys as etcd does, recording each call."""

    store: dict[bytes, bytes]
    revision: int = 77
    calls: list[tuple[int, int | None]] = field(default_factory=list)

    def get_range_response(
        self, start: bytes, end: bytes, *, limit: int, revision: int | None
    ) -> etcdrpc.RangeResponse:
        self.calls.append((limit, revision))
        keys = sorted(self.store)
        rest = keys[bisect.bisect_left(keys, start) : bisect.bisect_left(keys, end)]
        page = [
            kv_pb2.KeyValue(key=k, value=self.store[k], mod_revision=i + 2)
            for i, k in enumerate(rest[:limit])
        ]
        header = etcdrpc.ResponseHeader(revision=self.revision, cluster_id=0xC1)
        return etcdrpc.RangeResponse(
            header=header, kvs=page, more=len(rest) > limit, count=len(rest)
        )


def test_the_first_page_is_page_size_keys_and_the_next_ones_about_page_bytes() -> None:
    server = RangeServer({f"/p/k{i:03}".encode(): b"v" * 90 for i in range(200)})

    reset = read_pages(server, b"/p/", b"/p0", page_size=10, page_bytes=2_000)

    assert [kv.key for kv in reset.kvs] == [f"/p/k{i:03}" for i in range(200)]
    assert all(kv.value == b"v" * 90 for kv in reset.kvs)
    limits = [limit for limit, _ in server.calls]
    assert limits[0] == 10
    # ~100 bytes a key on the wire: about 20 keys per 2,000 bytes, never fewer than 10
    assert all(15 <= limit <= 20 for limit in limits[1:]), limits
    assert len(server.calls) <= 1 + -(-190 // 15)  # pages of 10 would take 20 requests


def test_every_page_after_the_first_is_pinned_to_the_first_pages_revision() -> None:
    server = RangeServer({f"/p/k{i:02}".encode(): b"x" for i in range(30)})

    reset = read_pages(server, b"/p/", b"/p0", page_size=4, page_bytes=1)

    assert reset.revision == 77
    assert reset.cluster_id == 0xC1
    assert server.calls[0] == (4, None)
    assert server.calls[1:] == [(4, 77)] * (len(server.calls) - 1)
    assert len(server.calls) == 8
    assert len(reset.kvs) == 30


def test_a_key_that_is_not_utf8_is_skipped_and_the_rest_is_kept() -> None:
    server = RangeServer({b"/p/a": b"1", b"/p/\xff": b"2", b"/p/b": b"3"})

    reset = read_pages(server, b"/p/", b"/p0", page_size=2, page_bytes=1)

    assert [(kv.key, kv.value) for kv in reset.kvs] == [("/p/a", b"1"), ("/p/b", b"3")]


def test_an_empty_range_is_one_request() -> None:
    server = RangeServer({b"/other": b"1"})

    reset = read_pages(server, b"/p/", b"/p0", page_size=5, page_bytes=1_000)

    assert reset.kvs == ()
    assert server.calls == [(5, None)]


@pytest.mark.parametrize(
    ("keys", "size", "expected"),
    [
        (5_000, 575_000, 145_888),  # 115 bytes a key: 16 MiB // 115
        (5_000, 5_000 * 100_000, 5_000),  # 100 kB values: never below page_size
        (0, 0, 5_000),
    ],
)
def test_next_page_limit(keys: int, size: int, expected: int) -> None:
    assert next_page_limit(5_000, 16 * 1024 * 1024, keys, size) == expected
