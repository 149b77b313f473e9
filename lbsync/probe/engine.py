"""The check loop: which instances to check, when, and what a run of results means.

Instances come from the catalog built from the daemon's own etcd watch (so only values the
schema accepted are ever probed). Each instance has one asyncio task: a first wait drawn
at random within the interval, then check and count, the next check starting ``interval``
less up to ``jitter`` after this one started (never later, so the ``fall``-th failing check
starts within ``fall`` x ``interval`` of a failure, however long checks take). A verdict is
reached HAProxy's way (``rise`` successes in a row → up, ``fall`` failures → down) and
written only when it changes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from lbsync import keys
from lbsync.config import CheckSettings, ProbeSettings
from lbsync.model import Instance, Snapshot, State
from lbsync.probe import metrics
from lbsync.probe.checks import CheckResult, run_check
from lbsync.probe.curl import CurlLoop
from lbsync.probe.writer import VerdictWriter

log = structlog.get_logger("lbsync.probe")


@dataclass
class RiseFall:
    """One instance's verdict (None until the first is reached) and its current streak."""

    verdict: State | None = None
    ok_streak: int = 0
    fail_streak: int = 0

    def observe(self, ok: bool, rise: int, fall: int) -> State | None:
        """Count one result; the new verdict when it changes, else None."""
        self.ok_streak, self.fail_streak = (
            (self.ok_streak + 1, 0) if ok else (0, self.fail_streak + 1)
        )
        if self.verdict is not State.UP and self.ok_streak >= rise:
            self.verdict = State.UP
            return State.UP
        if self.verdict is not State.DOWN and self.fail_streak >= fall:
            self.verdict = State.DOWN
            return State.DOWN
        return None


def wait_after(check: CheckSettings, started: float, now: float) -> float:
    """Seconds until the next check of an instance whose last one started at ``started``:
    ``interval`` from start to start, shortened at random by up to ``jitter`` x ``interval``
    and never lengthened, so the cadence holds however long a check takes (a slow backend,
    a busy host, a wait for a free slot); no wait when the check took longer than that."""
    spread = check.interval * check.jitter
    return max(0.0, started + check.interval - random.uniform(0.0, spread) - now)


@dataclass(frozen=True)
class Target:
    service: str
    instance: Instance
    check: CheckSettings

    @property
    def what(self) -> tuple[str, int, CheckSettings]:
        """What the task checks: a new Instance with the same address needs no restart."""
        return self.instance.host, self.instance.port, self.check


def targets(
    snapshot: Snapshot, settings: ProbeSettings, only: Iterable[str] | None = None
) -> dict[tuple[str, str], Target]:
    """Every instance of every probed service (of those in ``only``), by (service, id)."""
    names = snapshot.services.keys() if only is None else set(only) & snapshot.services.keys()
    out: dict[tuple[str, str], Target] = {}
    for name in names:
        service = snapshot.services[name]
        check = settings.services.get(name)
        if check is None:
            if not settings.all_services:
                continue
            check = settings.check
        for instance in service.instances:
            out[name, instance.id] = Target(name, instance, check)
    return out


@dataclass
class Engine:
    settings: ProbeSettings
    name: str
    prefix: str
    writer: VerdictWriter
    curl: CurlLoop
    _tasks: dict[tuple[str, str], tuple[Target, asyncio.Task[None]]] = field(default_factory=dict)
    _verdicts: dict[tuple[str, str], State | None] = field(default_factory=dict)
    _tally: Counter[State | None] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.max_connections)

    def key(self, service: str, iid: str) -> str:
        return keys.probe_key(self.prefix, service, iid, self.name)

    def update(self, snapshot: Snapshot, touched: set[str] | None = None) -> None:
        """Start, restart or stop checks so they match the catalog; with ``touched``, only
        for those services (a verdict the prober wrote comes back on the watch: one service
        to look at again, not 10,000 instances)."""
        wanted = targets(snapshot, self.settings, touched)
        current = {w for w in self._tasks if touched is None or w[0] in touched}
        for where in current - wanted.keys():
            self._stop(where)
            self.writer.clear(self.key(*where))
        for where, target in wanted.items():
            running = self._tasks.get(where)
            if running is not None and running[0].what == target.what:
                continue
            if running is not None:
                self._stop(where)
            task = asyncio.get_running_loop().create_task(self._loop(where, target))
            self._tasks[where] = (target, task)
            self._set_verdict(where, None)
        self._count()

    def stop_all(self) -> None:
        for where in list(self._tasks):
            self._stop(where)

    def counts(self) -> dict[str, int]:
        """Instances by verdict; kept as a running tally, since every transition updates
        the gauges (recounting 10,000 verdicts each time made the warm-up quadratic)."""
        return {
            "up": self._tally[State.UP],
            "down": self._tally[State.DOWN],
            "unknown": self._tally[None],
        }

    def _stop(self, where: tuple[str, str]) -> None:
        _target, task = self._tasks.pop(where)
        task.cancel()
        if where in self._verdicts:
            self._tally[self._verdicts.pop(where)] -= 1

    def _set_verdict(self, where: tuple[str, str], verdict: State | None) -> None:
        if where in self._verdicts:
            self._tally[self._verdicts[where]] -= 1
        self._verdicts[where] = verdict
        self._tally[verdict] += 1

    def _count(self) -> None:
        for verdict, count in self.counts().items():
            metrics.INSTANCES.labels(verdict).set(count)

    async def _loop(self, where: tuple[str, str], target: Target) -> None:
        check, state = target.check, RiseFall()
        clock = asyncio.get_running_loop().time
        await asyncio.sleep(random.uniform(0, check.interval))
        while True:
            started = clock()
            result = await self._check(target)
            verdict = state.observe(result.ok, check.rise, check.fall)
            if verdict is not None:
                self._report(where, verdict, result)
            await asyncio.sleep(wait_after(check, started, clock()))

    async def _check(self, target: Target) -> CheckResult:
        async with self._slots:
            started = time.perf_counter()
            result = await run_check(self.curl, target.instance, target.check)
            metrics.CHECK_SECONDS.observe(time.perf_counter() - started)
        metrics.CHECKS.labels(target.service, "ok" if result.ok else "fail").inc()
        return result

    def _report(self, where: tuple[str, str], verdict: State, result: CheckResult) -> None:
        value = {"status": verdict.value, "reason": result.reason, "since": int(time.time())}
        self.writer.set(self.key(*where), json.dumps(value))
        self._set_verdict(where, verdict)
        self._count()
        event = "probe.down" if verdict is State.DOWN else "probe.up"
        log.info(event, service=where[0], instance=where[1], reason=result.reason)
