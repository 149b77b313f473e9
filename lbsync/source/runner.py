"""A source in its own thread: the thread, the queue it fills and the event that stops it.

Only the main thread touches the catalog and the LB; the source hands over frozen
messages through the queue, which the main loop drains between rounds. The loop blocks on
that queue until its next deadline; ``wake`` (safe in a signal handler) ends the wait.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import structlog

from lbsync.model import SourceMessage

log = structlog.get_logger("lbsync.source")


class Source(Protocol):
    """What the runner needs of a source: ``lbsync.source.EtcdSource`` or a fake."""

    def run(self, emit: Callable[[SourceMessage], None], stop: threading.Event) -> None: ...

    def close(self) -> None: ...


class SourceRunner:
    """Runs one source in a daemon thread until ``stop``; one runner per source."""

    def __init__(self, source: Source) -> None:
        self.source = source
        # SimpleQueue: its put may be called from a signal handler (``wake``) that
        # interrupted a get in the same thread; Queue's lock would deadlock there.
        self._messages: queue.SimpleQueue[SourceMessage | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=source.run,
            args=(self._messages.put, self._stop),
            name="lbsync-source",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def messages(self, timeout: float) -> Iterator[SourceMessage]:
        """Block up to ``timeout`` (``math.inf``: no limit) for one message, or until
        ``wake``; then yield whatever else is queued."""
        message = self._next(timeout)
        while message is not None:
            yield message
            message = self._next(0.0)

    def wake(self) -> None:
        """End a ``messages`` wait now, with nothing to yield. Safe in a signal handler."""
        self._messages.put(None)

    def _next(self, timeout: float) -> SourceMessage | None:
        """The next message; None after ``timeout`` or for a ``wake``."""
        try:
            if timeout <= 0:
                return self._messages.get_nowait()
            return self._messages.get(timeout=None if math.isinf(timeout) else timeout)
        except queue.Empty:
            return None

    def stop(self, timeout: float) -> None:
        """Stop the thread; wait up to ``timeout`` for a hung call to run out its own.

        A thread still alive after that is left to finish on its own: its channels are
        never closed under it (gRPC crashes on that race). Messages still queued are dropped.
        """
        self._stop.set()
        interrupt = getattr(self.source, "interrupt", None)  # a source waiting in long slices
        if callable(interrupt):
            interrupt()
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            log.warning("source.stop_timeout", timeout_s=timeout)
        else:
            self.source.close()
