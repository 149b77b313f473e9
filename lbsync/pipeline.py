"""One round for one target: render → compare → stage + validate → swap → reload → verify.

This is where the failure semantics live:

- a template error, a structural violation (lbsync.structure), a render past the size cap
  or a refused check changes nothing on disk and reloads nothing — unless it is one
  service's change that fails on its own: then that service is held back at its last
  applied version and every other change applies in the same round (lbsync.isolation);
- an unchanged render (same bytes as on disk) writes nothing and reloads nothing;
- a membership-only change goes through the driver's runtime API when it can (files are
  still validated and written, without a reload, so a later restart agrees);
- a failed reload or verification restores the previous files and reloads again;
- a failure that repeats the previous round's error is logged at debug (the daemon retries
  a failing target with backoff; one ``apply.failed`` per distinct error is enough).

``drift`` compares the live files (and the LB's identity) with what the last good round
left there (lbsync.reconcile); the daemon repairs a difference by applying again.

``render --dry-run`` uses ``plan`` and ``check`` and stops there.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from lbsync import isolation, metrics
from lbsync.config import Target
from lbsync.drivers.base import Driver
from lbsync.errors import (
    DriverError,
    LbsyncError,
    ReloadFailed,
    RenderError,
    RenderTooLarge,
    ValidationFailed,
    VerifyFailed,
)
from lbsync.isolation import HeldService, Unattributable
from lbsync.model import Snapshot, changed_services, compose
from lbsync.outcome import Outcome
from lbsync.reconcile import DriftKind, LiveFiles
from lbsync.render import Renderer
from lbsync.stage import swap
from lbsync.stage.tree import StagingArea
from lbsync.structure import StructureCheck

log = structlog.get_logger("lbsync.pipeline")


@dataclass(frozen=True)
class Plan:
    """What a snapshot renders to for one target, and which files differ from disk."""

    target: str
    snapshot: Snapshot
    rendered: Mapping[Path, bytes]
    current: Mapping[Path, bytes | None]
    seen: Mapping[Path, swap.Seen | None] = field(default_factory=dict)  # current's versions

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


class TargetPipeline:
    """Applies snapshots to one target; remembers the last snapshot it applied."""

    def __init__(
        self,
        target: Target,
        driver: Driver,
        renderer: Renderer,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.driver = driver
        self.renderer = renderer
        self.workdir = state_dir / "stage"
        self.staging = StagingArea(target, self.workdir)
        self.backup_dir = state_dir / "backup" / target.name
        self.applied: Snapshot | None = None
        self.held: dict[str, HeldService] = {}
        self.structure = StructureCheck(renderer, target.templates, driver.line_shape())
        self._modes = {t.dest: t.mode for t in target.templates if t.mode is not None}
        self._follow = frozenset(t.dest for t in target.templates if t.follow_symlinks)
        self._clock = clock
        self.live = LiveFiles(self._follow)
        self._last_error: str | None = None  # the last round's error, to log it once

    @property
    def name(self) -> str:
        return self.target.name

    def plan(self, snapshot: Snapshot) -> Plan:
        """Render every template of the target and read what's on disk.

        Raises RenderError, RenderTooLarge past ``max_render_bytes``, StructureViolation
        when a value added structure to a render.
        """
        extra = self.driver.template_context(snapshot)
        raw = self.structure.keys(snapshot)
        rendered: dict[Path, bytes] = {}
        size = 0
        for template in self.target.templates:
            data = self.renderer.render(template.src, snapshot, extra, raw=raw)
            size += len(data)
            if size > self.target.max_render_bytes:
                cap = self.target.max_render_bytes
                raise RenderTooLarge(template=str(template.src), size=size, cap=cap)
            rendered[template.dest] = data
        self.structure.check(snapshot, extra, rendered, raw)
        seen = {
            dest: swap.current_file(dest, follow_symlinks=dest in self._follow) for dest in rendered
        }
        current = {dest: None if file is None else file.data for dest, file in seen.items()}
        return Plan(self.name, snapshot, rendered, current, seen)

    def check(self, plan: Plan) -> None:
        """Validate the whole config as it would be loaded, in a staged tree. Touches nothing.

        A driver with no checker to run gets no staged tree: writing one (~0.1 ms for one
        small file) would only delay its reload."""
        if not self.driver.checks_staged_tree:
            return
        with self.staging.staged(plan.rendered) as tree:
            self.driver.validate(tree)

    def apply(self, wanted: Snapshot) -> Outcome:
        """One full round. Never raises for LB-side failures: the outcome says what happened.

        Services held back by an earlier round stay at their applied version until their
        own data changes; a failure that one service's change causes holds that service
        back and applies the rest.
        """
        timings: dict[str, float] = {}
        retried = self._release_changed(wanted)
        snapshot = wanted
        if self.held and self.applied is not None:  # held services: as last applied
            snapshot = compose(self.applied, wanted, self.held)
        plan: Plan | None = None
        try:
            try:
                plan = self._attempt(snapshot, timings)
            except (RenderError, ValidationFailed) as err:
                if self.applied is None:
                    # No last applied version to keep a failing service at, and leaving it
                    # out could drop a service the LB serves from the files on disk.
                    raise
                with _timed(timings, "isolate"):
                    plan = self._isolate(self.applied, snapshot, err, retried)
            changed = plan.changed
            if not changed:
                self.applied = plan.snapshot
                outcome = Outcome(self.name, wanted.revision, "unchanged")
            else:
                outcome = self._swap_and_load(plan, changed, timings)
        except LbsyncError as err:
            outcome = Outcome(self.name, wanted.revision, "failed", error=err)
        self._settle_retried(retried, outcome)
        self._remember(plan if outcome.ok else None)
        return self._report(outcome, timings)

    def drift(self) -> DriftKind | None:
        """What differs between the live target and what the last good round left there
        (None: in step, or no good round yet). A few ``stat`` calls when nothing moved."""
        if not self.live.known:
            return None
        return self.live.drift(self.driver.lb_identity())

    def repair_runtime(self) -> Outcome | None:
        """Runtime state the LB reports differently from the applied snapshot, corrected over
        the runtime API, or by reloading the files on disk (ours: ``drift`` found them in
        step) when it cannot be. None: nothing differed (or no good round yet)."""
        if self.applied is None or not self.live.known:
            return None
        revision = self.applied.revision
        try:
            if not self.driver.repair_runtime(self.applied):
                return None
            return Outcome(self.name, revision, "runtime")
        except DriverError as err:
            log.warning("drift.runtime_unrepaired", target=self.name, error=err)
        try:
            self.driver.verify(self.driver.reload())
        except LbsyncError as err:
            log.error("drift.repair_failed", target=self.name, error=err)
            return Outcome(self.name, revision, "failed", error=err)
        return Outcome(self.name, revision, "reloaded")

    def _remember(self, plan: Plan | None) -> None:
        if plan is None:
            self.live.forget()
        else:
            self.live.record(plan.rendered, self.driver.lb_identity())

    def _attempt(
        self, snapshot: Snapshot, timings: dict[str, float], *, always_check: bool = False
    ) -> Plan:
        """Render and, when anything differs from disk, validate. Raises on failure."""
        with _timed(timings, "render"):
            plan = self.plan(snapshot)
        if plan.changed or always_check:
            with _timed(timings, "validate"):
                self.check(plan)
        return plan

    def _isolate(
        self,
        base: Snapshot,
        snapshot: Snapshot,
        failure: LbsyncError,
        retried: Mapping[str, HeldService],
    ) -> Plan:
        """The plan without the services whose change fails on its own; they are held back.

        Re-raises ``failure`` when the failure is nobody's in particular.
        """
        scratch: dict[str, float] = {}

        def trial(names: Iterable[str]) -> LbsyncError | None:
            keep = set(suspects).difference(names)
            # Without any change (what the LB runs) the checker must still agree: if it
            # refuses that too, the checker or the LB is at fault, not a service.
            everything_kept = len(keep) == len(suspects)
            try:
                composed = compose(base, snapshot, keep)
                self._attempt(composed, scratch, always_check=everything_kept)
            except (RenderError, ValidationFailed) as err:
                return err
            return None

        suspects = changed_services(base, snapshot)
        try:
            if not suspects:
                raise Unattributable("no service changed since the last applied round")
            culprits = isolation.find_culprits(suspects, failure, trial)
            plan = self._attempt(compose(base, snapshot, culprits), scratch)
        except (Unattributable, RenderError, ValidationFailed) as why:
            log.warning("isolate.failed", target=self.name, reason=str(why))
            raise failure from None
        for name, error in culprits.items():
            self._hold(name, base, snapshot, error, retried.get(name))
        return plan

    def _hold(
        self,
        name: str,
        base: Snapshot,
        snapshot: Snapshot,
        error: LbsyncError,
        before: HeldService | None,
    ) -> None:
        failed = snapshot.services.get(name)
        attempt = before.attempt + 1 if before is not None and before.failed is failed else 1
        retry_at = self._clock() + isolation.retry_delay(attempt)
        keys = isolation.changed_keys(base, snapshot, name)
        held = HeldService(name, failed, error, keys, snapshot.revision, attempt, retry_at)
        self.held[name] = held
        metrics.service_held(self.name, type(error).__name__)
        log.error(
            "service.held",
            target=self.name,
            service=name,
            keys=list(keys),
            revision=snapshot.revision,
            attempt=attempt,
            error=error,
        )

    def _release_changed(self, wanted: Snapshot) -> dict[str, HeldService]:
        """Stop holding the services whose data changed since they failed, or whose time
        to be tried again has come (isolation.RETRY_FIRST): retry them this round."""
        now = self._clock()
        retried = {
            name: held
            for name, held in self.held.items()
            if wanted.services.get(name) is not held.failed or now >= held.retry_at
        }
        for name in retried:
            del self.held[name]
        return retried

    def _settle_retried(self, retried: Mapping[str, HeldService], outcome: Outcome) -> None:
        """After a round that retried held services: those not held again are released,
        unless the round failed as a whole (then they stay listed, and are retried on the
        next round since their data differs from what failed)."""
        if not outcome.ok:
            self.held.update((n, h) for n, h in retried.items() if n not in self.held)
            return
        for name in retried.keys() - self.held.keys():
            log.info("service.released", target=self.name, service=name)

    def _swap_and_load(
        self, plan: Plan, changed: dict[Path, bytes], timings: dict[str, float]
    ) -> Outcome:
        files = tuple(sorted(str(p) for p in changed))
        revision = plan.snapshot.revision
        with _timed(timings, "runtime"):
            runtime_done = self.driver.runtime_update(self.applied, plan.snapshot)
        with _timed(timings, "swap"):
            # The backup copy and the fsyncs (file, directory) wait until the LB has its signal.
            record = swap.swap_in(
                changed,
                self.backup_dir,
                modes=self._modes,
                follow_symlinks=self._follow,
                settle_later=True,
                seen=plan.seen,
            )
        if runtime_done:
            with _timed(timings, "settle"):
                swap.settle(record)
            self.applied = plan.snapshot
            return Outcome(self.name, revision, "runtime", files)
        try:
            try:
                with _timed(timings, "reload"):
                    ticket = self.driver.reload()
            finally:
                with _timed(timings, "settle"):
                    swap.settle(record)
            with _timed(timings, "verify"):
                self.driver.verify(ticket)
        except (ReloadFailed, VerifyFailed) as err:
            self._roll_back(record, err)
            return Outcome(self.name, revision, "rolled_back", files, error=err)
        self.applied = plan.snapshot
        return Outcome(self.name, revision, "reloaded", files)

    def _roll_back(self, record: swap.SwapRecord, cause: DriverError) -> None:
        """Put last-known-good back and reload it; an alert either way."""
        try:
            swap.restore(record)
            self.driver.verify(self.driver.reload())
        except LbsyncError as err:
            metrics.alert("rollback_failed")
            log.critical("rollback.failed", target=self.name, cause=cause, error=err)
            return
        metrics.alert("rollback")
        log.error("rollback.done", target=self.name, cause=cause)

    def _report(self, outcome: Outcome, timings: dict[str, float]) -> Outcome:
        outcome = Outcome(
            outcome.target,
            outcome.revision,
            outcome.action,
            outcome.files,
            outcome.error,
            {k: round(v * 1000, 3) for k, v in timings.items()},
            dict(self.held),
        )
        fields = {
            "target": self.name,
            "revision": outcome.revision,
            "files": list(outcome.files),
            "ms": dict(outcome.durations),
        }
        if outcome.held:
            fields["held"] = sorted(outcome.held)
        error, self._last_error = self._last_error, None
        if outcome.error is not None:
            self._last_error = f"{outcome.action}: {outcome.error}"
            repeated = error == self._last_error
            emit = log.debug if repeated else log.error
            emit(f"apply.{outcome.action}", **fields, error=outcome.error, repeated=repeated)
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
