"""Start-up at 10,000 instances: process start → first applied config.

etcd holds the instances before lbsync starts; nginx serves a placeholder upstream file,
so the first round really writes, validates and reloads. Each run starts with an empty
``state_dir`` (no persisted catalog) and a placeholder file again. The clock starts just
before ``Popen`` (wall clock) and stops at the timestamp of the first ``apply.*`` event;
``daemon.started``, ``source.read`` and ``nginx.reload_sent`` split it into phases.
``--layout one``: the filler instances in one service, rendered by a plain loop.

``--driver command``: issue 15's own harness for this row (``bench latency --driver
command``'s world: one service ``web`` of bare ``10.x.y.z:80`` values, a plain template,
the command driver with no check command and a reload command that appends ``date
+%s%N`` to a file). The clock starts just before ``Popen`` and stops at that timestamp:
when the reload command runs (no ``nginx -t``, no reload to verify, as the issue measured
confd and remco).

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
from bench import env, latency, report

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


def run(instances: int, runs: int, layout: str = "spread") -> dict[str, Any]:
    _with_bytecode()
    results = []
    with env.world("startup", sites=("probe",)) as w:
        keys = env.layout_filler(layout, instances - 1)
        keys[env.instance_key("probe", "p1")] = env.instance_value("127.0.0.1", 9)
        w.etcd.bulk_put(keys)
        template = env.layout_template(layout, w.root)
        for _ in range(runs):
            w.front.write_placeholder(["probe"])
            w.front.reload()
            shutil.rmtree(w.root / "state", ignore_errors=True)
            lb = w.start_lbsync(template=template, wait_min="0", wait_max="0")
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
    return {"instances": instances, "layout": layout, "runs": results}


def run_command(instances: int, runs: int, transport: str = "auto") -> dict[str, Any]:
    """Issue 15's harness: process start → the reload command's own timestamp."""
    _with_bytecode()
    results = []
    with env.world("startup-command") as w:
        config, reload_log, dest = latency.command_world(w, instances)
        config = config.replace("[etcd]\n", f'[etcd]\ntransport = "{transport}"\n', 1)
        for _ in range(runs):
            shutil.rmtree(w.root / "state", ignore_errors=True)
            dest.unlink(missing_ok=True)  # so that the first round writes and reloads
            reloads_before = _lines(reload_log)
            w.lbsync = lb = env.Lbsync(w.root, w.etcd.endpoint, w.front, config_text=config)
            lb.start()
            try:
                applied = lb.events[lb.wait_applied(timeout=120)]
                if applied["event"] != "apply.reloaded":
                    raise env.BenchError(f"first round did not reload: {applied}")
                stamps = _lines(reload_log)
                if len(stamps) != len(reloads_before) + 1:
                    raise env.BenchError(f"{len(stamps) - len(reloads_before)} reloads, not 1")
                t0 = lb.started_at
                results.append(
                    {
                        "total_ms": (int(stamps[-1]) / 1e9 - t0) * 1000,
                        "to_daemon_started_ms": (_ts(lb, "daemon.started") - t0) * 1000,
                        "to_source_read_ms": (_ts(lb, "source.read") - t0) * 1000,
                        "to_catalog_reset_ms": (_ts(lb, "catalog.reset") - t0) * 1000,
                        "round_ms": applied["ms"],
                        "rss_mb": psutil.Process(lb.pid).memory_info().rss / 2**20,
                    }
                )
            finally:
                lb.stop()
                w.lbsync = None
    return {"instances": instances, "driver": "command", "transport": transport, "runs": results}


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _command_main(args: argparse.Namespace) -> dict[str, Any]:
    r = run_command(args.instances, args.runs, args.transport)
    rows = [
        [
            i + 1,
            x["to_daemon_started_ms"],
            x["to_source_read_ms"],
            x["to_catalog_reset_ms"],
            x["round_ms"].get("render", 0.0),
            x["round_ms"].get("swap", 0.0),
            x["total_ms"],
            x["rss_mb"],
        ]
        for i, x in enumerate(r["runs"])
    ]
    report.table(
        f"start-up at {args.instances:,} instances, issue 15's harness "
        "(ms from process start; command driver, one service, plain template; "
        f"[etcd] transport = {args.transport})",
        [
            "run",
            "daemon.started",
            "etcd read",
            "catalog loaded",
            "render",
            "swap",
            "reload command runs",
            "RSS MB",
        ],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "result": r}
    report.save("startup-command", data)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench startup")
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--layout", choices=env.LAYOUTS, default="spread",
        help="nginx driver: spread: 100 instances per service, stock template; one: the "
        "filler in one service, plain loop",
    )  # fmt: skip
    parser.add_argument(
        "--driver",
        choices=["nginx", "command"],
        default="nginx",
        help="command: issue 15's harness (one service, bare values, plain template, a "
        "reload command that logs its start; the clock stops when it runs)",
    )
    parser.add_argument(
        "--transport",
        choices=["auto", "http", "grpc"],
        default="auto",
        help="command driver: lbsync's [etcd] transport (how the first read is made)",
    )
    args = parser.parse_args(argv)
    if args.driver == "command":
        return _command_main(args)
    r = run(args.instances, args.runs, args.layout)
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
        f"start-up at {args.instances:,} instances, layout {args.layout} (ms from process start)",
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
