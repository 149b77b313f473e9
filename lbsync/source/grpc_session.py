"""The gRPC transport (pyetcd): the source's session and watch over etcd's gRPC API.

Imported only when gRPC is used (``transport = "grpc"``, or ``"auto"`` facing an
endpoint without the JSON gateway, such as etcd's gRPC proxy), so that a daemon on the
gateway never loads grpc. The watch drives the raw gRPC ``Watch`` stream with its own
request iterator: a progress request every ``silence_deadline / 3``; a stream that
answers nothing for ``silence_deadline`` is broken, unless it has never answered a
progress request (etcd's gRPC proxy ignores them): then a one-key read decides.
"""

from __future__ import annotations

import structlog
from pyetcd import etcdrpc

from lbsync.config import EtcdSettings
from lbsync.errors import SourceError, SourceUnavailable
from lbsync.model import SourceReset
from lbsync.source.client import endpoint_url, login, new_client, translated
from lbsync.source.responses import WatchResponse, from_grpc
from lbsync.source.stream import StreamEnded, WatchStream, read_pages

log = structlog.get_logger("lbsync.source")

# The longest a wait on the watch lasts before the loop looks at the stop event again:
# how late ``run`` returns after a stop that comes without ``interrupt``.
_LONGEST_WAIT = 2.0
_no_progress: set[str] = set()  # endpoints seen ignoring progress requests (logged once)


class GrpcSession:
    """A pyetcd multi-endpoint client, logged in (see ``client``)."""

    transport = "grpc"

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.client = new_client(settings)

    @property
    def endpoint(self) -> str:
        return endpoint_url(self.client)

    def connect(self) -> None:
        login(self.client, self.settings)

    def read(self, start: bytes, end: bytes, page_size: int, page_bytes: int) -> SourceReset:
        with translated(self.endpoint):
            return read_pages(self.client, start, end, page_size, page_bytes)

    def watch(self, start: bytes, end: bytes, start_revision: int) -> GrpcWatch:
        return GrpcWatch(self, start, end, start_revision)

    def close(self) -> None:
        self.client.close()


class GrpcWatch:
    """One gRPC watch: responses as ``WatchResponse``; ``check`` after ``silence_deadline``."""

    def __init__(self, session: GrpcSession, start: bytes, end: bytes, revision: int) -> None:
        self.session = session
        self.endpoint = session.endpoint
        self._start = start
        self.check_every = session.settings.silence_deadline
        self._progress_answered = False
        create = etcdrpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=revision, progress_notify=True
        )
        progress_every = max(self.check_every / 3, 0.05)
        with translated(self.endpoint):
            self._stream = WatchStream(session.client, create, progress_every=progress_every)

    def get(self, timeout: float) -> WatchResponse | None:
        try:
            with translated(self.endpoint):
                response = self._stream.get(timeout=min(timeout, _LONGEST_WAIT))
        except StreamEnded as exc:
            raise SourceUnavailable(str(exc), endpoint=self.endpoint) from exc
        if response is None:
            return None
        converted = from_grpc(response)
        if converted.is_progress:
            self._progress_answered = True
        return converted

    def check(self, revision: int) -> None:
        """Silent for ``silence_deadline``: broken if it has answered a progress request
        before; otherwise a one-key read proves the endpoint still answers."""
        deadline = self.check_every
        if self._progress_answered:
            raise SourceUnavailable(
                f"watch silent for more than {deadline:g}s", endpoint=self.endpoint
            )
        try:
            with translated(self.endpoint):
                self.session.client.get_response(self._start)
        except SourceError as exc:
            raise SourceUnavailable(
                f"watch silent for more than {deadline:g}s and a read failed: {exc.message}",
                endpoint=self.endpoint,
            ) from exc
        if self.endpoint not in _no_progress:
            _no_progress.add(self.endpoint)
            log.info(
                "source.progress_unanswered",
                endpoint=self.endpoint,
                note="the endpoint ignores watch progress requests (an etcd gRPC proxy?); "
                "an idle watch is checked with a read instead",
            )

    def wake(self) -> None:
        self._stream.wake()

    def close(self) -> None:
        self._stream.close()
