"""Start-up at 10,000 instances: process start → first applied config.

etcd holds the instances before lbsync starts; nginx serves a placeholder upstream file,
so the first round really writes, validates and reloads. Each run starts with an empty
``state_dir`` (no persisted catalog) and a placeholder file again. The clock starts just
before ``Popen`` (wall clock) and stops at the timestamp of the first ``apply.*`` event;
``daemon.started``, ``source.read`` and ``nginx.reload_sent`` split it into phases.

lbsync starts as an installed lbsync does: with its modules' bytecode cached. A shell
with ``PYTHONDONTWRITEBYTECODE`` set (as on this project's dev machines) otherwise made
every start compile lbsync's ~90 modules from source: ~70 ms more at 10,000 instances.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import time
from pathlib import Path
from typing import Any

import psutil

import lbsync
from bench import env, report

# The daemon settles its memory (a full collection, freeze, malloc_trim) right after the
# first round: the "settled" RSS is read this long after the first apply, the RSS the
# daemon runs with from then on.
_SETTLED_AFTER = 2.0


def _ts(lb: env.Lbsync, name: str, after: int = 0) -> float:
    index = lb.wait_event(lambda e: e.get("event") == name, after=after, what=name)
    return env.parse_ts(lb.events[index]["timestamp"])


def _with_bytecode() -> None:
    """Let lbsync's subprocess read cached bytecode: write it now, and stop the environment
    from forbidding it (the daemon inherits this process's environment)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(lbsync.__file__).parent, quiet=1)


def run(instances: int, runs: int) -> dict[str, Any]:
    _with_bytecode()
    results = []
    with env.world("startup", sites=("probe",)) as w:
        keys = env.filler(instances - 1)
        keys[env.instance_key("probe", "p1")] = env.instance_value("127.0.0.1", 9)
        w.etcd.bulk_put(keys)
        for _ in range(runs):
            w.front.write_placeholder(["probe"])
            w.front.reload()
            shutil.rmtree(w.root / "state", ignore_errors=True)
            lb = w.start_lbsync(wait_min="0", wait_max="0")
            try:
                applied = lb.events[lb.wait_applied(timeout=120)]
                if applied["event"] != "apply.reloaded":
                    raise env.BenchError(f"first round did not reload: {applied}")
                end = env.parse_ts(applied["timestamp"])
                t0 = lb.started_at
                process = psutil.Process(lb.pid)
                rss = process.memory_info().rss / 2**20
                time.sleep(_SETTLED_AFTER)
                settled_rss = process.memory_info().rss / 2**20
                results.append(
                    {
                        "total_ms": (end - t0) * 1000,
                        "to_daemon_started_ms": (_ts(lb, "daemon.started") - t0) * 1000,
                        "to_source_read_ms": (_ts(lb, "source.read") - t0) * 1000,
                        "to_reload_sent_ms": (_ts(lb, "nginx.reload_sent") - t0) * 1000,
                        "round_ms": applied["ms"],
                        "rss_mb": rss,
                        "settled_rss_mb": settled_rss,
                    }
                )
            finally:
                lb.stop()
                w.lbsync = None
    return {"instances": instances, "runs": results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench startup")
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    r = run(args.instances, args.runs)
    rows = [
        [
            i + 1,
            x["to_daemon_started_ms"],
            x["to_source_read_ms"],
            x["round_ms"].get("render", 0.0),
            x["round_ms"].get("validate", 0.0),
            x["to_reload_sent_ms"],
            x["total_ms"],
            x["rss_mb"],
            x["settled_rss_mb"],
        ]
        for i, x in enumerate(r["runs"])
    ]
    report.table(
        f"start-up at {args.instances:,} instances (ms from process start)",
        [
            "run",
            "daemon.started",
            "etcd read",
            "render",
            "validate",
            "reload sent",
            "first apply done",
            "RSS MB",
            "settled",
        ],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "result": r}
    report.save("startup", data)
    return data
