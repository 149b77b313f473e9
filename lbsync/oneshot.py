"""The one-shot commands behind ``lbsync render`` and ``lbsync check``.

``dry_run`` reads etcd once, renders, validates in a throw-away staging tree and reports;
it never writes a destination and never reloads. ``apply_once`` runs one full round.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbsync.catalog import Catalog
from lbsync.config import Settings
from lbsync.drivers.base import DriverFactory, driver_for
from lbsync.errors import LbsyncError
from lbsync.model import Snapshot, SourceReset
from lbsync.outcome import Outcome
from lbsync.pipeline import TargetPipeline
from lbsync.render import Renderer

ReadAll = Callable[[Settings], SourceReset]


def read_etcd(settings: Settings) -> SourceReset:
    from lbsync.source.etcd import EtcdSource

    source = EtcdSource(settings.etcd)
    try:
        return source.read_all()
    finally:
        source.close()


def read_snapshot(settings: Settings, read_all: ReadAll = read_etcd) -> Snapshot:
    catalog = Catalog(settings.etcd.prefix)
    catalog.reset(read_all(settings))
    return catalog.snapshot()


@dataclass(frozen=True)
class DryRunResult:
    target: str
    revision: int
    diff: str
    changed: tuple[str, ...]
    error: LbsyncError | None

    @property
    def verdict(self) -> str:
        return "refused" if self.error else "accepted"


def dry_run(
    settings: Settings,
    targets: Sequence[str] = (),
    *,
    read_all: ReadAll = read_etcd,
    driver_factory: DriverFactory = driver_for,
) -> list[DryRunResult]:
    """Render and validate each target against a fresh read of etcd. Writes nothing live."""
    chosen = [settings.target(name) for name in targets] or list(settings.targets)
    snapshot = read_snapshot(settings, read_all)
    renderer = Renderer(sandbox=settings.render.sandbox)
    results = []
    with tempfile.TemporaryDirectory(prefix="lbsync-dry-run-") as scratch:
        for target in chosen:
            pipeline = TargetPipeline(target, driver_factory(target), renderer, Path(scratch))
            plan = pipeline.plan(snapshot)
            error: LbsyncError | None = None
            try:
                pipeline.check(plan)
            except LbsyncError as err:
                error = err
            changed = tuple(sorted(str(p) for p in plan.changed))
            results.append(
                DryRunResult(target.name, snapshot.revision, plan.diff(), changed, error)
            )
    return results


def apply_once(
    settings: Settings,
    *,
    read_all: ReadAll = read_etcd,
    driver_factory: DriverFactory = driver_for,
) -> list[Outcome]:
    snapshot = read_snapshot(settings, read_all)
    renderer = Renderer(sandbox=settings.render.sandbox)
    return [
        TargetPipeline(target, driver_factory(target), renderer, settings.state_dir).apply(snapshot)
        for target in settings.targets
    ]


def check_config(settings: Settings) -> list[str]:
    """Compile every template and build every driver; returns what was checked."""
    renderer = Renderer(sandbox=settings.render.sandbox)
    checked = []
    for target in settings.targets:
        driver_for(target)
        for template in target.templates:
            renderer.load(template.src)
            checked.append(f"{target.name}: {template.src} -> {template.dest}")
    return checked
