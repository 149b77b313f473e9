"""The short-lived commands' wall time: ``lbsync --version``, ``mark``, ``status`` (issue 15).

A monitor calls ``mark`` per instance and a person types ``status``, so each must start,
do its one thing and exit quickly: targets ``--version`` ≤ 150 ms, ``mark`` / ``status``
≤ 300 ms wall. Against the bench's own etcd holding one service of 10 instances; each
command runs once to write its bytecode, then ``--runs`` times, interleaved; the median
wall time from ``subprocess.run`` to its exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import env, report

TARGETS_MS = {"--version": 150.0, "mark": 300.0, "status": 300.0}


def _commands(endpoint: str) -> dict[str, list[str]]:
    lbsync = [str(Path(sys.executable).with_name("lbsync"))]  # the console script users run
    where = ["--endpoint", endpoint, "--prefix", env.PREFIX]
    return {
        "--version": [*lbsync, "--version"],
        "mark": [*lbsync, "mark", *where, "web", "i0", "drain"],
        "status": [*lbsync, "status", *where],
    }


def run(runs: int) -> dict[str, list[float]]:
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as an installed lbsync: bytecode cached
    with tempfile.TemporaryDirectory(prefix="lbsync-bench-cli-") as tmp:
        etcd = env.Etcd(Path(tmp))
        etcd.start()
        try:
            etcd.bulk_put(
                {env.instance_key("web", f"i{n}"): env.instance_value(f"10.0.0.{n + 1}", 80)
                 for n in range(10)}
            )  # fmt: skip
            commands = _commands(etcd.endpoint)
            for argv in commands.values():
                subprocess.run(argv, check=True, capture_output=True)
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(runs):
                for name, argv in commands.items():
                    started = time.perf_counter()
                    subprocess.run(argv, check=True, capture_output=True)
                    times[name].append((time.perf_counter() - started) * 1000)
        finally:
            etcd.stop()
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench cli")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args(argv)
    times = run(args.runs)
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        verdict = "met" if median <= TARGETS_MS[name] else "NOT met"
        rows.append(
            [name, median, min(samples), max(samples), f"≤ {TARGETS_MS[name]:.0f}", verdict]
        )
    report.table(
        f"short-lived commands, wall ms over {args.runs} runs",
        ["command", "median", "min", "max", "target", "verdict"],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "result": times}
    report.save("cli", data)
    return data
