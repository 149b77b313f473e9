"""The JSON gateway's answers that are not a 200 become the SourceError subclasses the
gRPC path raises; the chunked watch body is de-framed whatever the read sizes."""

from __future__ import annotations

import json

import pytest

from lbsync.errors import RevisionCompacted, SourceError, SourceUnavailable
from lbsync.source.endpoints import GatewayNotServed, TokenRejected
from lbsync.source.gateway import error_from
from lbsync.source.watchbody import ChunkedLines

E = "http://127.0.0.1:2379"


def _body(code: int, message: str) -> bytes:
    return json.dumps({"error": message, "message": message, "code": code}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, _body(11, "mvcc: required revision has been compacted"), RevisionCompacted),
        (401, _body(16, "etcdserver: invalid auth token"), TokenRejected),
        (400, _body(9, "etcdserver: revision of auth store is old"), TokenRejected),
        (503, _body(14, "etcdserver: request timed out"), SourceUnavailable),
        (504, _body(4, "context deadline exceeded"), SourceUnavailable),
        (404, b"Not Found\n", GatewayNotServed),
        (400, b"CommonName of client sending a request against gateway", GatewayNotServed),
        (502, b"<html>bad gateway</html>", SourceUnavailable),
    ],
)  # fmt: skip
def test_error_answers_map_to_the_grpc_paths_errors(
    status: int, body: bytes, expected: type[SourceError]
) -> None:
    error = error_from(status, body, E, "POST /v3/kv/range")
    assert type(error) is expected
    assert error.endpoint == E


def test_permission_denied_is_a_plain_source_error_quoting_etcd() -> None:
    error = error_from(403, _body(7, "etcdserver: permission denied"), E, "POST /v3/kv/range")
    assert type(error) is SourceError
    assert str(error) == f"etcd {E}: PERMISSION_DENIED: etcdserver: permission denied"


def test_a_compaction_is_not_retried_as_unavailable() -> None:
    error = error_from(400, _body(11, "required revision has been compacted"), E, "x")
    assert not isinstance(error, SourceUnavailable)


def test_chunks_split_anywhere_give_the_same_lines() -> None:
    lines = [b'{"result":{"created":true}}', b'{"result":{"events":[]}}', b"{}"]
    framed = b"".join(b"%x\r\n%s\n\r\n" % (len(line) + 1, line) for line in lines) + b"0\r\n\r\n"
    for step in (1, 2, 3, 7, len(framed)):
        body = ChunkedLines()
        got = []
        for start in range(0, len(framed), step):
            body.feed(framed[start : start + step], E)
            while True:
                try:
                    line = body.next_line(E)
                except SourceUnavailable:  # the final 0-size chunk: the stream ended
                    line = None
                    got.append(b"<end>")
                if line is None:
                    break
                got.append(line)
        assert got[:3] == lines, step
        assert got[-1] == b"<end>"


@pytest.mark.parametrize("framed", [b"zz\r\n", b"3\r\nabcXY", b"1" * 2000])
def test_bad_framing_is_a_source_error(framed: bytes) -> None:
    with pytest.raises(SourceError, match="watch stream"):
        ChunkedLines().feed(framed, E)
