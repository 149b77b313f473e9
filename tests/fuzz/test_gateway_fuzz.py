"""The JSON gateway's watch stream is untrusted input: arbitrary bytes and arbitrary JSON
fed through the chunked framing and the line decoder never escape as anything but a
``SourceError``, and well-formed events round-trip (keys, values, revisions, kinds).

Bounded for CI: ``LBSYNC_FUZZ_EXAMPLES`` (default 80) examples per test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbsync.errors import SourceError
from lbsync.model import KeyEvent
from lbsync.source.responses import WatchResponse, range_page, watch_response
from lbsync.source.watchbody import ChunkedLines

EXAMPLES = int(os.environ.get("LBSYNC_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
E = "http://127.0.0.1:2379"

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["result", "header", "events", "kv", "key", "value", "mod_revision", "type", "created",
     "canceled", "compact_revision", "cancel_reason", "revision", "cluster_id", "error"]
)  # fmt: skip
# JSON shaped like the gateway's, with any value in any field
GATEWAY_LIKE = st.recursive(
    JSON, lambda inner: st.dictionaries(FIELDS, inner, max_size=5), max_leaves=30
)


def _lines_of(stream: bytes, chunk_at: list[int]) -> list[bytes | Exception]:
    """Feed ``stream`` in pieces; decode every whole line; collect results or errors."""
    lines = ChunkedLines()
    out: list[bytes | Exception] = []
    cuts = sorted({c % (len(stream) + 1) for c in chunk_at} | {len(stream)})
    start = 0
    for cut in cuts:
        try:
            lines.feed(stream[start:cut], E)
            while (line := lines.next_line(E)) is not None:
                out.append(line)
        except SourceError as exc:
            out.append(exc)
            return out
        start = cut
    return out


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes_through_the_framing_and_decoder_raise_only_source_errors(
    raw: bytes, cuts: list[int]
) -> None:
    for item in _lines_of(raw, cuts):
        if isinstance(item, bytes):
            with contextlib.suppress(SourceError):
                watch_response(item, E)


@FUZZ
@given(GATEWAY_LIKE)
def test_arbitrary_json_lines_raise_only_source_errors(doc: object) -> None:
    raw = json.dumps(doc).encode()
    for decode in (watch_response, _range_page_of):
        with contextlib.suppress(SourceError):
            decode(raw, E)


def _range_page_of(raw: bytes, endpoint: str) -> object:
    parsed = json.loads(raw)
    if not isinstance(parsed, dict):
        raise SourceError("not an object", endpoint=endpoint)
    return range_page(parsed, endpoint)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete"]),
        st.text(min_size=1, max_size=20),
        st.binary(max_size=40),
    ),
    min_size=1,
    max_size=8,
)


def _framed(lines: list[bytes], sizes: list[int]) -> bytes:
    """The lines as the gateway frames them: chunks of arbitrary sizes (hex, CRLF)."""
    body = b"".join(line + b"\n" for line in lines)
    out, start = bytearray(), 0
    for size in [*sizes, len(body)]:
        piece = body[start : start + max(size, 1)]
        if not piece:
            break
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        start += len(piece)
    return bytes(out)


@FUZZ
@given(EVENTS, st.integers(1, 2**62), st.lists(st.integers(1, 300), max_size=5))
def test_well_formed_events_round_trip_through_any_chunking(
    events: list[tuple[str, str, bytes]], first_revision: int, sizes: list[int]
) -> None:
    result_events = []
    expected = []
    for offset, (kind, key, value) in enumerate(events):
        revision = first_revision + offset
        kv = {"key": _b64(key.encode()), "mod_revision": str(revision)}
        if kind == "put":
            kv["value"] = _b64(value)
            result_events.append({"kv": kv})  # proto3 JSON leaves type PUT out
            expected.append(KeyEvent(kind="put", key=key, value=value, mod_revision=revision))
        else:
            result_events.append({"type": "DELETE", "kv": kv})
            expected.append(KeyEvent(kind="delete", key=key, mod_revision=revision))
    created = {"result": {"header": {"revision": "9", "cluster_id": "18446744073709551615"},
                          "created": True}}  # fmt: skip
    line = json.dumps({"result": {"header": {"revision": "9"}, "events": result_events}})
    items = _lines_of(_framed([json.dumps(created).encode(), line.encode()], sizes), sizes)

    assert len(items) == 2, items
    assert all(isinstance(i, bytes) for i in items), items
    first, second = (watch_response(i, E) for i in items if isinstance(i, bytes))
    assert first == WatchResponse(header_revision=9, cluster_id=2**64 - 1, created=True)
    assert second.events == tuple(expected)
    assert second.last_revision == first_revision + len(events) - 1
