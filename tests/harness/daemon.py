"""The real ``lbsync.daemon.Daemon`` in a thread for integration tests, its rounds recorded."""

from __future__ import annotations

import threading
from collections.abc import Callable

from lbsync.config import Settings
from lbsync.daemon import Daemon
from lbsync.model import Snapshot
from lbsync.outcome import Outcome
from lbsync.source.writer import EtcdWriter


class RunningDaemon:
    """Runs until ``stop()``. Methods that take a target default to the daemon's only one."""

    def __init__(self, daemon: Daemon | Settings) -> None:
        self.daemon = daemon if isinstance(daemon, Daemon) else Daemon(daemon)
        self.outcomes: list[Outcome] = []  # every round of every target, in order
        for pipeline in self.daemon.pipelines:
            pipeline.apply = self._recording(pipeline.apply)  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)
        self.thread.start()

    def _recording(self, apply: Callable[[Snapshot], Outcome]) -> Callable[[Snapshot], Outcome]:
        def recorded(snapshot: Snapshot) -> Outcome:
            outcome = apply(snapshot)
            self.outcomes.append(outcome)
            return outcome

        return recorded

    def _target(self, target: str | None) -> str:
        if target is not None:
            return target
        (only,) = (p.name for p in self.daemon.pipelines)
        return only

    def latest(self, target: str | None = None) -> Outcome | None:
        return self.daemon.health.outcomes.get(self._target(target))

    def outcome(self, target: str | None = None) -> str | None:
        """The action of the target's latest round, if it had one."""
        latest = self.latest(target)
        return latest.action if latest else None

    def caught_up(self, writer: EtcdWriter, *targets: str) -> bool:
        """Every target (default: the only one) has finished a round on etcd's latest revision."""
        revision = writer.revision()
        found = [self.latest(t) for t in targets or (None,)]
        return all(o is not None and o.revision >= revision for o in found)

    def actions(self, since: int = 0, target: str | None = None) -> list[str]:
        name = self._target(target)
        return [o.action for o in self.outcomes[since:] if o.target == name]

    def stop(self) -> None:
        self.daemon.flags.stop = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "daemon did not stop"
