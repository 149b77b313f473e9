"""Where a round's CPU goes: lbsync's own stages vs the driver's, in-process, by stage.

The profile behind the CPU-per-change figure of ``bench scale``. A real nginx (same layout
as the other benches) and lbsync's own ``Catalog``, ``Renderer``, ``TargetPipeline`` and
``NginxDriver``, called in this process: one change (a new port for one instance of a
100-instance service), snapshot, guard, then ``TargetPipeline.apply`` (render, stage,
validate, swap, reload, settle, verify), N times. ``--layout one``: every instance in one
service, rendered by a plain loop (see ``bench scale``). Each stage method is wrapped to add its
``time.process_time()`` (this process's CPU, all threads; the checker's own CPU is a child
process and not counted). Nested rows are part of the row above them.

No daemon around it: the source thread, log output and the periodic last-good save are
what ``bench scale`` measures on top of this.
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import env, inprocess, report
from lbsync.config import GuardSettings
from lbsync.guard import judge
from lbsync.logging import configure_logging
from lbsync.model import KeyEvent, SourceEvents
from lbsync.pipeline import TargetPipeline
from lbsync.stage import swap

# (row label, owner, object attribute path); indented labels are part of the one above.
ROWS = (
    ("catalog: apply + snapshot + guard", "lbsync"),
    ("plan (render, read current file)", "lbsync"),
    ("check (stage + driver.validate)", "lbsync+driver"),
    ("  driver.validate", "driver"),
    ("    nginx -t (spawn, wait)", "driver"),
    ("    listen pre-check", "driver"),
    ("swap + reload + settle + verify", "lbsync+driver"),
    ("  stage.swap_in", "lbsync"),
    ("  driver.reload", "driver"),
    ("  stage.settle", "lbsync"),
    ("  driver.verify", "driver"),
)


def _wrap(acc: collections.Counter[str], obj: Any, name: str, label: str) -> None:
    inner: Callable[..., Any] = getattr(obj, name)

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            acc[label] += time.process_time() - started

    setattr(obj, name, timed)


def _instrument(acc: collections.Counter[str], pipeline: TargetPipeline) -> None:
    driver = pipeline.driver
    labels = [label for label, _ in ROWS]
    _wrap(acc, pipeline, "plan", labels[1])
    _wrap(acc, pipeline, "check", labels[2])
    _wrap(acc, driver, "validate", labels[3])
    _wrap(acc, driver, "_run_check", labels[4])
    _wrap(acc, driver, "_check_new_listens", labels[5])
    _wrap(acc, pipeline, "_swap_and_load", labels[6])
    _wrap(acc, swap, "swap_in", labels[7])
    _wrap(acc, driver, "reload", labels[8])
    _wrap(acc, swap, "settle", labels[9])
    _wrap(acc, driver, "verify", labels[10])


def measure(instances: int, rounds: int, layout: str = "spread") -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-rounds-{instances}-"))
    nginx = env.Nginx(root / "front")
    try:
        nginx.configure_front({"probe": env.free_port()})
        nginx.start()
        catalog, pipeline = inprocess.nginx_pipeline(root, nginx, instances, layout)
        previous = catalog.snapshot()
        pipeline.apply(previous)
        acc: collections.Counter[str] = collections.Counter()
        _instrument(acc, pipeline)
        guard = GuardSettings()

        def one(n: int) -> None:
            nonlocal previous
            key = env.layout_change_key(layout, n, instances - 1)
            value = env.instance_value(f"10.{n % 250}.0.1", 1000 + n).encode()
            started = time.process_time()
            event = KeyEvent(kind="put", key=key, value=value, mod_revision=n + 2)
            catalog.apply(SourceEvents(revision=n + 2, events=(event,)))
            snapshot = catalog.snapshot()
            judge(guard, previous, snapshot)
            acc[ROWS[0][0]] += time.process_time() - started
            outcome = pipeline.apply(snapshot)
            if outcome.action != "reloaded":
                raise env.BenchError(f"round {n}: {outcome}")
            previous = snapshot

        for n in range(5):  # warm up
            one(n)
        acc.clear()
        started = time.process_time()
        for n in range(rounds):
            one(100 + n)
            time.sleep(0.05)  # let the old nginx workers go, as spaced changes would
        total = time.process_time() - started
        per_round = {label: acc[label] / rounds * 1000 for label, _ in ROWS}
        return {"instances": instances, "layout": layout, "rounds": rounds,
                "total_ms": total / rounds * 1000, "ms": per_round}  # fmt: skip
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)


def _indent(label: str) -> int:
    return len(label) - len(label.lstrip())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench rounds")
    parser.add_argument("--sizes", default="10,10000")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--layout", choices=env.LAYOUTS, default="spread",
        help="spread: 100 instances per service, stock template; one: one service, plain loop",
    )  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging("info", "json", stream=io.StringIO())  # rendered, as in the daemon
    sizes = [int(size) for size in args.sizes.split(",")]
    results = [measure(size, args.rounds, args.layout) for size in sizes]
    rows: list[list[Any]] = [["total (this process)", "", *(r["total_ms"] for r in results)]]
    rows += [[label, owner, *(r["ms"][label] for r in results)] for label, owner in ROWS]
    staging = [r["ms"][ROWS[2][0]] - r["ms"][ROWS[3][0]] for r in results]
    rows.insert(4, ["  staging (check - validate)", "lbsync", *staging])

    def owned(r: dict[str, Any], who: str) -> float:
        top = [label for label, owner in ROWS if owner == who and _indent(label) <= 2]
        return sum(r["ms"][label] for label in top)

    rows += [
        [
            "lbsync's stages",
            "lbsync",
            *(owned(r, "lbsync") + s for r, s in zip(results, staging, strict=True)),
        ]
    ]
    rows += [["the driver's", "driver", *(owned(r, "driver") for r in results)]]
    report.table(
        f"CPU per round by stage, in-process, layout {args.layout} (ms)",
        ["stage", "owner", *(f"{r['instances']:,} instances" for r in results)],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    report.save("rounds", data)
    return data
