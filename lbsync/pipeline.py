"""One round for one target: render → compare → stage + validate → swap → reload → verify.

This is where the failure semantics live:

- a template error or a refused check changes nothing on disk and reloads nothing;
- an unchanged render (same bytes as on disk) writes nothing and reloads nothing;
- a membership-only change goes through the driver's runtime API when it can (files are
  still validated and written, without a reload, so a later restart agrees);
- a failed reload or verification restores the previous files and reloads again.

``render --dry-run`` uses ``plan`` and ``check`` and stops there.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from lbsync import metrics, stage
from lbsync.config import Target
from lbsync.drivers.base import Driver
from lbsync.errors import DriverError, LbsyncError, ReloadFailed, VerifyFailed
from lbsync.model import Snapshot
from lbsync.render import Renderer

log = structlog.get_logger("lbsync.pipeline")

Action = Literal["unchanged", "runtime", "reloaded", "rolled_back", "failed"]


@dataclass(frozen=True)
class Plan:
    """What a snapshot renders to for one target, and which files differ from disk."""

    target: str
    snapshot: Snapshot
    rendered: Mapping[Path, bytes]
    current: Mapping[Path, bytes | None]

    @property
    def changed(self) -> dict[Path, bytes]:
        return {p: data for p, data in self.rendered.items() if self.current[p] != data}

    def diff(self) -> str:
        """A unified diff of every changed file against what is on disk now."""
        chunks: list[str] = []
        for path, data in self.changed.items():
            before = (self.current[path] or b"").decode(errors="replace").splitlines(True)
            after = data.decode(errors="replace").splitlines(True)
            old_name = str(path) if self.current[path] is not None else "/dev/null"
            chunks.extend(difflib.unified_diff(before, after, old_name, str(path)))
        return "".join(chunks)


@dataclass(frozen=True)
class Outcome:
    target: str
    revision: int
    action: Action
    files: tuple[str, ...] = ()
    error: LbsyncError | None = None
    durations: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.action in ("unchanged", "runtime", "reloaded")


class TargetPipeline:
    """Applies snapshots to one target; remembers the last snapshot it applied."""

    def __init__(self, target: Target, driver: Driver, renderer: Renderer, state_dir: Path) -> None:
        self.target = target
        self.driver = driver
        self.renderer = renderer
        self.workdir = state_dir / "stage"
        self.staging = stage.StagingArea(target, self.workdir)
        self.backup_dir = state_dir / "backup" / target.name
        self.applied: Snapshot | None = None
        self._modes = {t.dest: t.mode for t in target.templates if t.mode is not None}
        self._follow = frozenset(t.dest for t in target.templates if t.follow_symlinks)

    @property
    def name(self) -> str:
        return self.target.name

    def plan(self, snapshot: Snapshot) -> Plan:
        """Render every template of the target (raises RenderError) and read what's on disk."""
        extra = self.driver.template_context(snapshot)
        rendered = {
            t.dest: self.renderer.render(t.src, snapshot, extra) for t in self.target.templates
        }
        current = {
            dest: stage.current_bytes(dest, follow_symlinks=dest in self._follow)
            for dest in rendered
        }
        return Plan(self.name, snapshot, rendered, current)

    def check(self, plan: Plan) -> None:
        """Validate the whole config as it would be loaded, in a staged tree. Touches nothing."""
        with self.staging.staged(plan.rendered) as tree:
            self.driver.validate(tree)

    def apply(self, snapshot: Snapshot) -> Outcome:
        """One full round. Never raises for LB-side failures: the outcome says what happened."""
        timings: dict[str, float] = {}
        try:
            with _timed(timings, "render"):
                plan = self.plan(snapshot)
            changed = plan.changed
            if not changed:
                self.applied = snapshot
                return self._report(Outcome(self.name, snapshot.revision, "unchanged"), timings)
            with _timed(timings, "validate"):
                self.check(plan)
            return self._report(self._swap_and_load(plan, changed, timings), timings)
        except LbsyncError as err:
            outcome = Outcome(self.name, snapshot.revision, "failed", error=err)
            return self._report(outcome, timings)

    def _swap_and_load(
        self, plan: Plan, changed: dict[Path, bytes], timings: dict[str, float]
    ) -> Outcome:
        files = tuple(sorted(str(p) for p in changed))
        revision = plan.snapshot.revision
        with _timed(timings, "runtime"):
            runtime_done = self.driver.runtime_update(self.applied, plan.snapshot)
        with _timed(timings, "swap"):
            # The backup copy and the directory fsync wait until the LB has its signal.
            record = stage.swap_in(
                changed,
                self.backup_dir,
                modes=self._modes,
                follow_symlinks=self._follow,
                settle_later=True,
            )
        if runtime_done:
            with _timed(timings, "settle"):
                stage.settle(record)
            self.applied = plan.snapshot
            return Outcome(self.name, revision, "runtime", files)
        try:
            try:
                with _timed(timings, "reload"):
                    ticket = self.driver.reload()
            finally:
                with _timed(timings, "settle"):
                    stage.settle(record)
            with _timed(timings, "verify"):
                self.driver.verify(ticket)
        except (ReloadFailed, VerifyFailed) as err:
            self._roll_back(record, err)
            return Outcome(self.name, revision, "rolled_back", files, error=err)
        self.applied = plan.snapshot
        return Outcome(self.name, revision, "reloaded", files)

    def _roll_back(self, record: stage.SwapRecord, cause: DriverError) -> None:
        """Put last-known-good back and reload it; an alert either way."""
        try:
            stage.restore(record)
            self.driver.verify(self.driver.reload())
        except LbsyncError as err:
            metrics.alert("rollback_failed")
            log.critical(
                "rollback.failed",
                **{**err.context(), "target": self.name, "cause": str(cause), "error": str(err)},
            )
            return
        metrics.alert("rollback")
        log.error("rollback.done", **{**cause.context(), "target": self.name, "cause": str(cause)})

    def _report(self, outcome: Outcome, timings: dict[str, float]) -> Outcome:
        outcome = Outcome(
            outcome.target,
            outcome.revision,
            outcome.action,
            outcome.files,
            outcome.error,
            {k: round(v * 1000, 3) for k, v in timings.items()},
        )
        fields = {
            "target": self.name,
            "revision": outcome.revision,
            "files": list(outcome.files),
            "ms": dict(outcome.durations),
        }
        if outcome.error is not None:
            err = outcome.error
            log.error(f"apply.{outcome.action}", **{**err.context(), **fields, "error": str(err)})
        elif outcome.action == "unchanged":
            log.debug("apply.unchanged", **fields)
        else:
            log.info(f"apply.{outcome.action}", **fields)
        return outcome


class _timed:
    """``with _timed(timings, "render"):`` adds the block's wall time under that name."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
