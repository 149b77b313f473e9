"""Validation overhead: lbsync's stage + validate vs plain ``nginx -t`` on the same config.

In-process, lbsync's own code (``TargetPipeline.check``: the staged copy of the whole
config tree with the rendered file in place, ``nginx -t`` on it, the listen pre-check)
against ``nginx -t -q`` run by ``subprocess.run`` from the same process on the live tree,
which holds the same rendered bytes. As in the daemon, every check sees a rendered file
that differs from the previous one (two plans alternate, one comment line apart), so the
staged file is rewritten each time. Same layout as the other benches (a Debian-like
``/etc/nginx`` copy). The runs interleave, so drift and other load hit both alike; the
overhead is the median of the per-rep ratios (lbsync check / plain ``nginx -t``); the
table shows medians. "stage" is the staging alone (``StagingArea.staged``), "listen" the
listen pre-check alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import env, inprocess, report
from lbsync.drivers.nginx.driver import NginxDriver
from lbsync.logging import configure_logging
from lbsync.pipeline import Plan, TargetPipeline

TARGET_OVERHEAD = 0.20


def build(root: Path, instances: int) -> tuple[env.Nginx, TargetPipeline, Plan]:
    nginx = env.Nginx(root / "front")
    nginx.configure_front({"probe": env.free_port()})
    catalog, pipeline = inprocess.nginx_pipeline(root, nginx, instances)
    plan = pipeline.plan(catalog.snapshot())
    for dest, data in plan.rendered.items():
        dest.write_bytes(data)  # the live tree holds the same bytes: same config for both
    pipeline.workdir.mkdir(parents=True, exist_ok=True)
    return nginx, pipeline, plan


def measure(instances: int, reps: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-validation-{instances}-"))
    try:
        nginx, pipeline, plan = build(root, instances)
        plain_argv = nginx.argv("-t", "-q")
        driver = pipeline.driver
        assert isinstance(driver, NginxDriver)

        def plain() -> None:
            subprocess.run(
                plain_argv, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
            )

        dest = next(iter(plan.rendered))
        other = dataclasses.replace(plan, rendered={dest: plan.rendered[dest] + b"# next\n"})
        plans = [plan, other]
        turn = [0]

        def next_plan() -> Plan:
            turn[0] += 1
            return plans[turn[0] % 2]

        def check() -> None:
            pipeline.check(next_plan())

        def stage_only() -> None:
            with pipeline.staging.staged(next_plan().rendered):
                pass

        def listen_only() -> float:
            """The pre-check alone, on a freshly staged tree as in the check (ms)."""
            with pipeline.staging.staged(next_plan().rendered) as tree:
                started = time.perf_counter()
                driver._check_new_listens(tree)
                return (time.perf_counter() - started) * 1000

        runs: dict[str, list[float]] = {"plain": [], "check": [], "stage": [], "listen": []}
        funcs = {"plain": plain, "check": check, "stage": stage_only, "listen": listen_only}
        for name, fn in funcs.items():  # warm up caches and imports
            fn()
            del name
        for _ in range(reps):
            for name, fn in funcs.items():
                t = time.perf_counter()
                own = fn()  # a float: the function timed the part that matters itself
                runs[name].append(own if own is not None else (time.perf_counter() - t) * 1000)
        stats = {name: report.summary(values) for name, values in runs.items()}
        # Each rep ran both back to back: the median of the per-rep ratios is what other
        # load on the machine disturbs least.
        ratios = [c / p for c, p in zip(runs["check"], runs["plain"], strict=True)]
        return {
            "instances": instances,
            "bytes": sum(len(b) for b in plan.rendered.values()),
            "stats": stats,
            "ratios": report.summary(ratios),
            "overhead": report.pct(ratios, 50) - 1,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench validation")
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args(argv)
    configure_logging("warning")
    results = [measure(int(size), args.reps) for size in args.sizes.split(",")]
    rows = [
        [
            r["instances"],
            r["bytes"],
            r["stats"]["plain"]["p50"],
            r["stats"]["check"]["p50"],
            r["stats"]["stage"]["p50"],
            r["stats"]["listen"]["p50"],
            f"{r['overhead'] * 100:+.0f}%",
            report.verdict(r["overhead"], TARGET_OVERHEAD),
        ]
        for r in results
    ]
    report.table(
        "validation: plain `nginx -t` vs lbsync stage + validate (ms, p50)",
        [
            "servers",
            "upstreams bytes",
            "nginx -t",
            "lbsync check",
            "of which stage",
            "listen check",
            "overhead",
            "≤ +20%",
        ],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    report.save("validation", data)
    return data
