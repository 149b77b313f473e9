"""What the supervised watch loop carries between attempts, and how it reports them.

A warning when the connection is lost, when a run of failures starts (etcd down at
start, a refused password), and again every ``REPEAT_WARNING`` seconds while it lasts;
the attempts in between at debug. Each report is also a ``SourceStatus`` for the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from lbsync.errors import SourceError
from lbsync.model import SourceStatus

log = structlog.get_logger("lbsync.source")

REPEAT_WARNING = 30.0  # seconds between two warnings about one run of failed attempts


@dataclass
class LoopState:
    """What the supervised loop carries between attempts."""

    revision: int | None = None  # resume after this; None: a full read comes first
    cluster_id: int = 0  # etcd's cluster id as of the last full read (0: not read yet)
    connected: bool = False
    ever_connected: bool = False
    failures: int = 0  # failed attempts since the watch was last established
    warned_at: float | None = None  # when the current run of failures was last warned

    def lost(self, exc: SourceError, endpoint: str) -> SourceStatus:
        """A failed attempt: logged (see the module), and the status to emit."""
        now = time.monotonic()
        self.failures += 1
        fields = {
            "endpoint": endpoint,
            "revision": self.revision,
            "error": str(exc),
            "attempts": self.failures,
        }
        if self.connected:
            log.warning("source.lost", **fields)
            self.warned_at = now
        elif self.warned_at is None or now - self.warned_at >= REPEAT_WARNING:
            log.warning("source.unavailable", **fields)
            self.warned_at = now
        else:
            log.debug("source.unavailable", **fields)
        self.connected = False
        return SourceStatus(
            connected=False,
            endpoint=endpoint,
            error=str(exc),
            revision=self.revision or 0,
            cluster_id=self.cluster_id,
        )

    def diverged(self, header_revision: int, header_cluster_id: int) -> str | None:
        """Why a resumed watch's server is not the history followed so far, or None.

        ``header_*`` come from the watch's created response. A revision behind the one
        resumed from means etcd was restored from a snapshot (or another cluster answers
        on the endpoint): a watch from there would wait for revisions that, once reached,
        mean other changes. A changed cluster id means another cluster, whatever its revision.
        A member lagging behind the one last read from looks behind too: the resync that
        follows is needless there, but harmless (the read is linearizable).
        """
        if self.cluster_id and header_cluster_id and header_cluster_id != self.cluster_id:
            return f"etcd cluster id changed from {self.cluster_id:x} to {header_cluster_id:x}"
        if self.revision is not None and header_revision < self.revision:
            return f"etcd revision went back from {self.revision} to {header_revision}"
        return None

    def established(self, endpoint: str, revision: int) -> SourceStatus:
        """The watch is established (first time, or resumed): logged, and the status to emit."""
        event = "source.resumed" if self.ever_connected else "source.connected"
        log.info(event, endpoint=endpoint, revision=revision, failed_attempts=self.failures)
        self.connected = self.ever_connected = True
        self.failures, self.warned_at = 0, None
        return SourceStatus(
            connected=True, endpoint=endpoint, revision=revision, cluster_id=self.cluster_id
        )
