"""The body of the gateway's watch answer: HTTP/1.1 chunked framing around
newline-separated JSON lines. Bytes go in as they arrive; whole lines come out.

The framing is checked (hex sizes, CRLF after each chunk, bounded sizes): anything
else is a SourceError, and the loop reconnects.
"""

from __future__ import annotations

import re

from lbsync.errors import SourceError, SourceUnavailable

MAX_LINE = 256 * 1024 * 1024  # as gRPC's receive limit: one watch response at most
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:;[^\r\n]*)?")


class ChunkedLines:
    """De-chunks the stream and splits it into lines; a state machine over a buffer."""

    def __init__(self, initial: bytes = b"") -> None:
        self._raw = bytearray(initial)  # framed bytes not yet de-chunked
        self._data = bytearray()  # de-chunked bytes not yet returned as a line
        self._left = 0  # bytes of the current chunk still to come
        self._need_crlf = False  # the CRLF after a chunk's data is due
        self._ended = False

    def feed(self, data: bytes, endpoint: str) -> None:
        self._raw += data
        self._dechunk(endpoint)

    def _dechunk(self, endpoint: str) -> None:
        while self._raw and not self._ended:
            if self._left:
                take = min(self._left, len(self._raw))
                self._data += self._raw[:take]
                del self._raw[:take]
                self._left -= take
                self._need_crlf = self._left == 0
                continue
            if self._need_crlf:
                if len(self._raw) < 2:
                    return
                if self._raw[:2] != b"\r\n":
                    raise SourceError("watch stream: bad chunk framing", endpoint=endpoint)
                del self._raw[:2]
                self._need_crlf = False
                continue
            end = self._raw.find(b"\r\n")
            if end < 0:
                if len(self._raw) > 1024:
                    raise SourceError("watch stream: bad chunk size line", endpoint=endpoint)
                return
            match = _SIZE_LINE.fullmatch(bytes(self._raw[:end]))
            if match is None:
                line = bytes(self._raw[:40])
                raise SourceError(f"watch stream: bad chunk size {line!r}", endpoint=endpoint)
            del self._raw[: end + 2]
            self._left = int(match.group(1), 16)
            if self._left == 0:
                self._ended = True
        if len(self._data) > MAX_LINE:
            raise SourceError(f"watch stream: a line past {MAX_LINE} bytes", endpoint=endpoint)

    def next_line(self, endpoint: str) -> bytes | None:
        """The next whole line (without its newline), or None until more bytes come.
        Raises SourceUnavailable once the stream has ended and no line is left."""
        self._dechunk(endpoint)
        end = self._data.find(b"\n")
        if end >= 0:
            line = bytes(self._data[:end])
            del self._data[: end + 1]
            return line
        if self._ended:
            raise SourceUnavailable("the watch stream ended", endpoint=endpoint)
        return None

    @staticmethod
    def raw_body(framed: bytes) -> bytes:
        """What a chunked error body holds so far (best effort, for the error message)."""
        lines = ChunkedLines(framed)
        try:
            lines._dechunk("")
        except SourceError:
            return framed
        return bytes(lines._data)
