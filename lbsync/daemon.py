"""The main loop: source thread → queue → catalog → scheduler → one round per target.

Only the main thread touches the catalog and the LB; the source runs in its own thread
and hands over frozen messages through a queue. The loop sleeps until a message, a
signal or its next deadline (a round due, a retry, a hold's end, the reconcile interval,
the catalog save, systemd's watchdog): an idle daemon wakes only when there is something
to do. Signal handlers only set flags and wake the loop, which acts between rounds, so a
round (write + reload) is never cut in half:

- SIGTERM/SIGINT: finish the current round, stop the source, return.
- SIGHUP: re-read lbsync's own config and templates; a broken new config is logged and
  the old one kept; a good one takes effect and everything is re-rendered.

No round runs before the first full read of etcd (or, when etcd cannot be read within
``etcd.timeout`` of start, before the saved catalog of the same prefix and etcd is loaded):
an unreachable etcd never becomes an empty config, another cluster's saved catalog is never
rendered. Every snapshot passes the guard before it is applied; a service whose update is
held keeps its last admitted version (the others' changes apply) until ``guard.hold`` or
``lbsync confirm [--service NAME]``; an empty catalog is held whole.

Level-triggered (lbsync.reconcile): a failed round is tried again with backoff without
waiting for an etcd change (a new change starts the backoff over), and every
``reconcile.interval`` each target's live files are compared with what its last good round
left there; a difference is applied again through the normal path (``drift.repaired``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from lbsync import memory, metrics, saved_catalog, state_lock, systemd
from lbsync.catalog import Catalog
from lbsync.config import Settings
from lbsync.config_file import load_settings
from lbsync.drivers.base import DriverFactory, driver_for
from lbsync.errors import ConfigError, InvalidValue, LbsyncError, RenderError
from lbsync.guard import Guard, confirmed_at
from lbsync.health import Health, status_document
from lbsync.model import Snapshot, SourceEvents, SourceMessage, SourceReset, SourceStatus
from lbsync.outcome import Outcome
from lbsync.pipeline import TargetPipeline
from lbsync.probes import PanicWatch, policy_of
from lbsync.reconcile import RUNTIME_STATE_LOST, Backoff
from lbsync.render import Renderer
from lbsync.saved_catalog import Origin, Saver, StartFallback
from lbsync.scheduler import Clock, Scheduler
from lbsync.source.runner import Source, SourceRunner
from lbsync.wakeups import Flags, wait_budget

if TYPE_CHECKING:
    from lbsync.http import StatusServer

log = structlog.get_logger("lbsync.daemon")

SourceFactory = Callable[[Settings], Source]


def etcd_source(settings: Settings) -> Source:
    from lbsync.source.etcd import EtcdSource

    return EtcdSource(settings.etcd)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        source_factory: SourceFactory = etcd_source,
        driver_factory: DriverFactory = driver_for,
        clock: Clock = time.monotonic,
        config_path: Path | None = None,
        started_source: SourceRunner | None = None,
    ) -> None:
        """``started_source``: the source, already started (``lbsync run`` starts the first
        read before it imports the rest of the daemon); else ``run`` starts one."""
        self.settings = settings
        self.config_path = config_path
        self._source = started_source
        self.flags = Flags(self.wake)
        self.health = Health()
        self._source_factory = source_factory
        self._driver_factory = driver_factory
        self._clock = clock
        self.catalog = Catalog(
            settings.etcd.prefix, on_reject=_warn_rejected, probes=policy_of(settings.probe)
        )
        self.panics = PanicWatch()
        self.scheduler = Scheduler(settings.wait, clock)
        confirm = f"lbsync confirm -c {config_path or 'lbsync.toml'}"
        self.guard = Guard(settings.guard, clock, confirm)
        self.pipelines = build_pipelines(settings, self._driver_factory)
        self._admitted: Snapshot | None = None
        self._saver = Saver(clock)
        self._fallback: StartFallback | None = None  # set by run()
        self._cluster_id = 0  # etcd's, from its latest full read
        self._changed_at: float | None = None  # first change not yet applied
        self._settle_due = False  # a full load happened: settle memory after its round
        self._watchdog_every = systemd.watchdog_interval()
        self._watchdog_at = 0.0
        self.http_server: StatusServer | None = None
        if settings.http.listen is not None:
            metrics.enable()  # served: counted from the start (else not even imported)
        metrics.init_targets(p.name for p in self.pipelines)
        self._retry = self._backoff(settings)
        self._reconcile_at = clock() + settings.reconcile.interval

    # --- lifecycle -------------------------------------------------------------------

    def run(self, *, lock_held: bool = False) -> None:
        """Until ``flags.stop``: take source messages, run rounds when due.

        Holds the state directory's lock throughout (``state_lock``): raises
        ``StateLocked``, touching nothing, when another lbsync holds it. ``lock_held``: the
        caller holds it (``lbsync run`` takes it before it starts the first read).
        """
        if lock_held:
            self._run()
            return
        lock = state_lock.acquire(self.settings.state_dir, self.config_path)
        try:
            self._run()
        finally:
            lock.release()

    def _run(self) -> None:
        try:
            self._start_http()
        except BaseException:
            self._stop_source()  # one started before run (``lbsync run``'s)
            raise
        self._fallback = StartFallback(self._clock, self.settings.etcd.timeout)
        if self._source is None:
            self._start_source()
        log.info("daemon.started", targets=[p.name for p in self.pipelines])
        self._compile_templates()
        try:
            while not self.flags.stop:
                self.step()
        finally:
            systemd.stopping()
            self._stop_source()
            self._save_catalog(force=True)
            if self.http_server is not None:
                self.http_server.stop()
            log.info("daemon.stopped", revision=self.catalog.revision)

    def step(self) -> None:
        """One turn of the loop: wait for a message or a due round, then act."""
        self.health.last_loop = self._clock()
        self._pet_watchdog()
        if self.health.connected and self.health.synced:
            # a quiet etcd is still in sync: keep the freshness gauge moving
            metrics.set_etcd(True, self.catalog.revision, time.time())
        if self.flags.reconfigure:
            self.flags.reconfigure = False
            self.reconfigure()
        if self._source is not None:
            budget = self._wait_budget()
            self.health.asleep_until = self.health.last_loop + budget
            for message in self._source.messages(budget):
                self.handle(message)
        if self._fallback is not None and self._fallback.due(self.health.synced):
            self._load_saved_catalog()
            if not self._settle_due:  # etcd unread and nothing saved: stop holding
                memory.settle()  # the collector (``memory.hold``) for a first load
        if self.catalog.synced and (
            self.scheduler.is_due() or self._hold_may_end() or self._retry.due()
        ):
            self.run_round()
            self._settle_memory()
        elif self._admitted is not None and self._clock() >= self._reconcile_at:
            self.reconcile()
        self._save_catalog()
        for pipeline in self.pipelines:
            # drivers with runtime state check it here (rate-limited by the driver)
            pipeline.driver.tick(pipeline.applied)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self.flags.stop = True

        def hup(signum: int, _frame: FrameType | None) -> None:
            self.flags.reconfigure = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def wake(self) -> None:
        """End the loop's wait now (signal-safe): it looks at its flags at once."""
        if self._source is not None:
            self._source.wake()

    # --- the work --------------------------------------------------------------------

    def run_round(self) -> list[Outcome]:
        """Apply the current snapshot to every target, once each — if the guard admits it."""
        self.scheduler.round_done()
        snapshot = self.catalog.snapshot()
        self.panics.update(snapshot)
        decision = self.guard.admit(self._admitted, snapshot, self._confirmed_at)
        admitted = decision.snapshot
        if admitted is not None:
            self._admitted = admitted
        outcomes = [] if admitted is None else [p.apply(admitted) for p in self.pipelines]
        # The gauges wait until the LB has its reload: they change nothing that is applied.
        metrics.set_catalog(snapshot)
        metrics.set_guard(len(self.guard.holds), self.guard.holding)
        for pipeline in self.pipelines:
            metrics.guard_held(pipeline.name, len(decision.started))
        if admitted is None:
            self._schedule_retry()  # a failing target waits for its next try, not in a spin
            return []
        self._record(outcomes)
        self._schedule_retry()
        if all(o.ok for o in outcomes):
            self._saver.applied()
        if self.health.synced and not self.health.ready_notified:
            # READY after the first round from etcd whatever its outcome: a failing template
            # must not make systemd kill and restart lbsync in a loop (the LB is untouched
            # either way, and the failure is in the logs and metrics).
            self.health.ready_notified = True
            systemd.ready(f"revision {admitted.revision}, {admitted.instance_count} instances")
        return outcomes

    def reconcile(self) -> None:
        """Repair every target whose live state differs from what its last good round left
        (a file edited by hand, the LB restarted on other files) by applying the admitted
        snapshot again: validate → swap → reload, as any round."""
        assert self._admitted is not None
        self._reconcile_at = self._clock() + self.settings.reconcile.interval
        for pipeline in self.pipelines:
            kind = pipeline.drift()
            if kind is not None:
                outcome: Outcome | None = pipeline.apply(self._admitted)
            else:
                kind, outcome = RUNTIME_STATE_LOST, pipeline.repair_runtime()
            if outcome is None:
                continue
            self._record([outcome], changed=False)
            if not outcome.ok:
                self._schedule_retry()
            else:
                metrics.drift_repaired(pipeline.name, kind)
                log.warning(
                    "drift.repaired",
                    target=pipeline.name,
                    kind=kind,
                    action=outcome.action,
                    files=list(outcome.files),
                    revision=outcome.revision,
                )

    def _schedule_retry(self) -> None:
        """While a target is failing, a round is tried again after the backoff; once none
        is, the backoff starts over (a held service is not a failure: isolation retries it
        on its own timer)."""
        failing = sorted(self.health.failing_since)
        if not failing:
            self._retry.reset()
            return
        delay = self._retry.failed()
        metrics.retry_scheduled()
        log.debug("retry.scheduled", targets=failing, attempt=self._retry.failures, s=delay)

    def _record(self, outcomes: list[Outcome], *, changed: bool = True) -> None:
        changed_at = self._changed_at
        if changed:
            self._changed_at = None
        for outcome in outcomes:
            self.health.note_outcome(outcome, time.time())
            metrics.record_outcome(outcome)
            if changed and changed_at is not None and outcome.action in ("reloaded", "runtime"):
                metrics.observe_event_to_apply(self._clock() - changed_at, outcome.target)

    def handle(self, message: SourceMessage) -> None:
        if not isinstance(message, SourceStatus) and self._changed_at is None:
            self._changed_at = self._clock()
        if not isinstance(message, SourceStatus):
            self._retry.reset()  # the change brings its own round
        if isinstance(message, SourceReset):
            self.catalog.reset(message)
            self._cluster_id = message.cluster_id
            if self._fallback is not None:
                self._fallback.read(self._origin())
            self._settle_due = True
            self.health.synced = True
            self.scheduler.changed()
            log.info("catalog.reset", revision=message.revision, keys=len(message.kvs))
        elif isinstance(message, SourceEvents):
            touched = self.catalog.apply(message)
            self.scheduler.changed()
            log.debug(
                "catalog.changed",
                revision=message.revision,
                events=len(message.events),
                services=sorted(touched),
            )
        else:
            # the source logs source.connected / source.lost itself
            self.health.note_status(message, self._clock())
        self.health.revision = self.catalog.revision
        synced_at = time.time() if not isinstance(message, SourceStatus) else None
        metrics.set_etcd(self.health.connected, self.catalog.revision, synced_at)

    def reconfigure(self) -> None:
        """SIGHUP: new settings, templates and drivers, or keep the old ones if broken."""
        if self.config_path is None:
            log.warning("reconfigure.skipped", reason="no config file to re-read")
            return
        try:
            settings = load_settings(self.config_path)
            if settings.state_dir != self.settings.state_dir:
                raise ConfigError(
                    f"cannot move to {settings.state_dir} on SIGHUP: this daemon holds "
                    f"{self.settings.state_dir}'s lock; restart lbsync to change it",
                    field="state_dir",
                )
            pipelines = build_pipelines(settings, self._driver_factory)
            for pipeline in pipelines:
                for template in pipeline.target.templates:
                    pipeline.renderer.load(template.src)
            etcd_changed = settings.etcd != self.settings.etcd
            # built here so that unreadable TLS or password files reject the new config
            source = self._source_factory(settings) if etcd_changed else None
        except LbsyncError as err:
            log.error("reconfigure.rejected", error=err)
            return
        systemd.reloading()
        self.settings, self.pipelines = settings, pipelines
        self.scheduler = Scheduler(settings.wait, self._clock)
        self.guard = self.guard.with_settings(settings.guard)
        self._retry = self._backoff(settings)
        self.scheduler.changed()
        self.catalog.set_probe_policy(policy_of(settings.probe))
        if source is not None:
            self._stop_source()
            self.catalog = Catalog(
                settings.etcd.prefix, on_reject=_warn_rejected, probes=policy_of(settings.probe)
            )
            self.health.synced = False
            self._start_source(source)
        metrics.init_targets(p.name for p in pipelines)
        self.health.forget_targets_except({p.name for p in pipelines})
        log.info("reconfigure.done", targets=[p.name for p in pipelines], etcd=etcd_changed)
        systemd.ready("configuration re-read")

    # --- guard and saved catalog ----------------------------------------------------

    def _confirmed_at(self, service: str | None) -> float:
        return confirmed_at(self.settings.state_dir, service)

    def _hold_may_end(self) -> bool:
        # the confirm files are read only while something is held
        return self.guard.holding and self.guard.may_end(self._confirmed_at)

    def _load_saved_catalog(self) -> None:
        saved = saved_catalog.load(self.settings.state_dir, self._origin())
        if saved is None:
            return
        if self._fallback is not None:
            self._fallback.loaded(saved)
        self.catalog.reset(saved.reset)
        self._settle_due = True
        self._admitted = self.catalog.snapshot()
        self.health.saved_catalog_age = saved.age()
        self.health.saved_catalog_loaded_at = self._clock()
        self.scheduler.changed()

    def _save_catalog(self, *, force: bool = False) -> None:
        if self._admitted is not None and self.health.synced:
            origin = self._origin()
            self._saver.save_if_due(self.settings.state_dir, origin, self._admitted, force=force)

    def _origin(self) -> Origin:
        etcd = self.settings.etcd
        return Origin(etcd.prefix, tuple(etcd.endpoints), self._cluster_id)

    # --- what the outside world sees: /healthz, /readyz, /status, systemd -----------

    def healthy(self) -> tuple[bool, str]:
        return self.health.healthy(self._clock())

    def ready(self) -> tuple[bool, str]:
        return self.health.ready(self._clock(), self.settings.http.max_staleness)

    def status_document(self) -> dict[str, object]:
        return status_document(
            self.health,
            self.guard,
            self.catalog,
            self.pipelines,
            self._clock(),
            probe_panic=self.panics.services,
        )

    def _start_http(self) -> None:
        if self.settings.http.listen is None:
            return
        from lbsync.http import StatusServer  # http.server & co: only for a daemon that serves

        server = StatusServer(
            self.settings.http.listen,
            status=self.status_document,
            healthy=self.healthy,
            ready=self.ready,
        )
        server.start()
        self.http_server = server  # published once bound, for whoever needs its port
        log.info("http.listening", url=self.http_server.url)

    def _pet_watchdog(self) -> None:
        if self._watchdog_every is None or self.health.last_loop < self._watchdog_at:
            return
        systemd.watchdog()
        self._watchdog_at = self.health.last_loop + self._watchdog_every

    # --- helpers ---------------------------------------------------------------------

    def _wait_budget(self) -> float:
        now = self._clock()
        deadlines = [self.guard.release_at(), self._saver.due_at()]
        if self._fallback is not None:
            deadlines.append(self._fallback.due_at())
        if self._watchdog_every is not None:
            deadlines.append(self._watchdog_at)
        if self._admitted is not None:
            deadlines.append(self._reconcile_at)
        if self.catalog.synced:
            for due_in in (self.scheduler.due_in(), self._retry.due_in()):
                deadlines.append(None if due_in is None else now + due_in)
        polling = self.guard.holding or any(p.driver.ticks for p in self.pipelines)
        return wait_budget(deadlines, now, polling=polling)

    def _backoff(self, settings: Settings) -> Backoff:
        reconcile = settings.reconcile
        return Backoff(reconcile.retry_initial, reconcile.retry_max, self._clock)

    def _compile_templates(self) -> None:
        """Compile every target's templates while the source's first read is on its way
        (the main thread would wait for etcd, then compile at the first render: ~10 ms at
        start-up). A template that does not compile is left to the round, which reports
        it as it always has."""
        for pipeline in self.pipelines:
            for template in pipeline.target.templates:
                with contextlib.suppress(RenderError):
                    pipeline.renderer.load(template.src)

    def _settle_memory(self) -> None:
        """``memory.settle`` after a full load, once the round it brought has run: its full
        collection (~25 ms at 10,000 instances) would otherwise sit between the read and the
        first applied config (and so would the collections ``memory.hold`` spares it)."""
        if self._settle_due:
            self._settle_due = False
            memory.settle()

    def _start_source(self, source: Source | None = None) -> None:
        self._source = SourceRunner(source or self._source_factory(self.settings))
        self._source.start()

    def _stop_source(self) -> None:
        if self._source is not None:
            # a hung etcd call runs out its timeout; then the source returns
            self._source.stop(timeout=self.settings.etcd.timeout + 2)
        self._source = None


def _warn_rejected(err: InvalidValue) -> None:
    metrics.value_rejected()
    log.warning("value.rejected", error=err)


def build_pipelines(settings: Settings, driver_factory: DriverFactory) -> list[TargetPipeline]:
    """One pipeline per target, all sharing one renderer (its template cache)."""
    renderer = Renderer(sandbox=settings.render.sandbox)
    return [
        TargetPipeline(target, driver_factory(target), renderer, settings.state_dir)
        for target in settings.targets
    ]
