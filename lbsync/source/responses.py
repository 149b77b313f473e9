"""A watch response as both transports hand it to the loop, and the JSON gateway's
documents (ranges, watch lines) decoded into it.

Everything here reads what a server sent: a malformed document, a bad base64 field or
a number that is not one becomes a ``SourceError``; a key that is not UTF-8 is skipped
with a warning (as on the gRPC path). No gRPC here.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any

from lbsync.errors import SourceError
from lbsync.model import KeyEvent
from lbsync.source.stream import RangePage, decode_key, key_events


@dataclass(frozen=True, slots=True)
class WatchResponse:
    """One watch response, whichever transport carried it."""

    header_revision: int = 0
    cluster_id: int = 0
    created: bool = False
    canceled: bool = False
    cancel_reason: str = ""
    compact_revision: int = 0
    events: tuple[KeyEvent, ...] = ()  # the readable ones (keys that are UTF-8)
    last_revision: int = 0  # the last event's mod_revision, readable or not; 0: no events

    @property
    def is_progress(self) -> bool:
        """A progress notification: nothing but a header."""
        return not (self.created or self.canceled or self.compact_revision or self.last_revision)


def from_grpc(response: Any) -> WatchResponse:
    """A pyetcd ``WatchResponse`` message as a ``WatchResponse``."""
    events = response.events
    return WatchResponse(
        header_revision=int(response.header.revision),
        cluster_id=int(response.header.cluster_id),
        created=bool(response.created),
        canceled=bool(response.canceled),
        cancel_reason=str(response.cancel_reason),
        compact_revision=int(response.compact_revision),
        events=tuple(key_events(events)) if events else (),
        last_revision=int(events[-1].kv.mod_revision) if events else 0,
    )


class _Malformed(Exception):
    """A field of a gateway document that is not what etcd sends (internal)."""


def parse_document(raw: bytes, what: str, endpoint: str) -> dict[str, Any]:
    """One JSON object from the gateway; anything else is a SourceError quoting its start."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{what}: not JSON ({exc}): {raw[:80]!r}", endpoint=endpoint) from exc
    if not isinstance(doc, dict):
        raise SourceError(f"{what}: not a JSON object: {raw[:80]!r}", endpoint=endpoint)
    return doc


def _int(doc: dict[str, Any], name: str) -> int:
    """An int64 field: proto3 JSON writes it as a string, and leaves it out when 0."""
    value = doc.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Malformed(f"{name} is {value!r}")
    if isinstance(value, str) and not (value.isascii() and value.lstrip("-").isdigit()):
        raise _Malformed(f"{name} is {value!r}")
    number = int(value)
    if not -(2**63) <= number < 2**64:  # int64, or uint64 (cluster_id)
        raise _Malformed(f"{name} is out of range: {value!r}")
    return number


def _bool(doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise _Malformed(f"{name} is {value!r}")
    return value


def _dict(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise _Malformed(f"{name} is {type(value).__name__}, not an object")
    return value


def _list(doc: dict[str, Any], name: str) -> list[Any]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise _Malformed(f"{name} is {type(value).__name__}, not a list")
    return value


def _bytes(doc: dict[str, Any], name: str) -> bytes:
    """A bytes field (base64, strict: characters outside the alphabet are an error)."""
    value = doc.get(name, "")
    if not isinstance(value, str):
        raise _Malformed(f"{name} is {value!r}")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise _Malformed(f"{name} is not base64: {value[:40]!r}") from exc


def _key_value(kv: Any) -> tuple[bytes, bytes, int]:
    if not isinstance(kv, dict):
        raise _Malformed(f"a key-value is {type(kv).__name__}, not an object")
    return _bytes(kv, "key"), _bytes(kv, "value"), _int(kv, "mod_revision")


def _careful_kvs(kvs: list[Any]) -> list[tuple[str, bytes, int]]:
    out = []
    for kv in kvs:
        raw_key, value, revision = _key_value(kv)
        key = decode_key(raw_key)
        if key is not None:
            out.append((key, value, revision))
    return out


def _range_kvs(kvs: list[Any]) -> list[tuple[str, bytes, int]]:
    """The page's keys as ``SourceReset`` input: one comprehension for a page of well-formed
    keys (most of a full read's CPU is here), the careful loop for a page that has a bad one."""
    a2b = binascii.a2b_base64
    try:
        return [
            (
                a2b(kv["key"], strict_mode=True).decode(),
                a2b(kv.get("value", ""), strict_mode=True),
                int(kv["mod_revision"]),
            )
            for kv in kvs
        ]
    except (KeyError, TypeError, ValueError, binascii.Error):
        return _careful_kvs(kvs)


def range_page(doc: dict[str, Any], endpoint: str) -> RangePage:
    """A ``/v3/kv/range`` answer; raises SourceError if it is not one."""
    try:
        header = _dict(doc, "header")
        kvs = _list(doc, "kvs")
        decoded = _range_kvs(kvs)
        last_key = _key_value(kvs[-1])[0] if kvs else b""
        return RangePage(
            revision=_int(header, "revision"),
            cluster_id=_int(header, "cluster_id"),
            kvs=decoded,
            count=len(kvs),
            last_key=last_key,
            more=_bool(doc, "more"),
            size=sum(len(key) + len(value) + 40 for key, value, _ in decoded),
        )
    except _Malformed as exc:
        raise SourceError(f"malformed range answer: {exc}", endpoint=endpoint) from exc


def _event(event: Any) -> tuple[KeyEvent | None, int]:
    """One watch event, and its mod_revision (None for a key that is not UTF-8)."""
    if not isinstance(event, dict):
        raise _Malformed(f"an event is {type(event).__name__}, not an object")
    kind = event.get("type", "PUT")  # proto3 JSON leaves the default (PUT) out
    if kind not in ("PUT", "DELETE"):
        raise _Malformed(f"event type is {kind!r}")
    raw_key, value, revision = _key_value(_dict(event, "kv"))
    key = decode_key(raw_key)
    if key is None:
        return None, revision
    if kind == "DELETE":
        return KeyEvent(kind="delete", key=key, mod_revision=revision), revision
    return KeyEvent(kind="put", key=key, value=value, mod_revision=revision), revision


def watch_response(raw: bytes, endpoint: str) -> WatchResponse:
    """One line of the gateway's watch stream: ``{"result": {...}}`` or ``{"error": {...}}``.

    An ``error`` line is the gateway telling that the gRPC stream under it failed; it is
    raised as a SourceError like any malformed line (the loop reconnects).
    """
    doc = parse_document(raw, "watch stream", endpoint)
    if "error" in doc:
        raise SourceError(f"watch stream error: {str(doc['error'])[:200]}", endpoint=endpoint)
    try:
        result = doc["result"]
        if not isinstance(result, dict):
            raise _Malformed(f"result is {type(result).__name__}, not an object")
        header = _dict(result, "header")
        events: list[KeyEvent] = []
        last_revision = 0
        for item in _list(result, "events"):
            event, last_revision = _event(item)
            if event is not None:
                events.append(event)
        reason = result.get("cancel_reason", "")
        if not isinstance(reason, str):
            raise _Malformed(f"cancel_reason is {reason!r}")
        return WatchResponse(
            header_revision=_int(header, "revision"),
            cluster_id=_int(header, "cluster_id"),
            created=_bool(result, "created"),
            canceled=_bool(result, "canceled"),
            cancel_reason=reason,
            compact_revision=_int(result, "compact_revision"),
            events=tuple(events),
            last_revision=last_revision,
        )
    except (_Malformed, KeyError) as exc:
        raise SourceError(f"malformed watch line: {exc}: {raw[:80]!r}", endpoint=endpoint) from exc
