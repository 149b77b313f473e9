"""What an idle reconcile tick costs: the comparison lbsync makes every
``reconcile.interval`` when nothing changed, in-process, at 10 and 10,000 instances.

A real nginx (as ``bench rounds``) and lbsync's own ``TargetPipeline`` + ``NginxDriver``:
one good round, then ``TargetPipeline.drift`` (a ``stat`` per destination file, the nginx
master's pid file and ``/proc`` entry) and ``repair_runtime`` (nothing to do in files
mode), N times. CPU is ``time.process_time()`` of this process. Then the same after a
hand edit: the bytes are read and compared once, and the repair is a normal round.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import env, inprocess, report
from lbsync.logging import configure_logging


def measure(instances: int, ticks: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-reconcile-{instances}-"))
    nginx = env.Nginx(root / "front")
    try:
        nginx.configure_front({"probe": env.free_port()})
        nginx.start()
        catalog, pipeline = inprocess.nginx_pipeline(root, nginx, instances)
        snapshot = catalog.snapshot()
        if not pipeline.apply(snapshot).ok:
            raise env.BenchError("the first round failed")
        for _ in range(10):  # warm up
            pipeline.drift()
            pipeline.repair_runtime()
        started = time.process_time()
        for _ in range(ticks):
            if pipeline.drift() is not None or pipeline.repair_runtime() is not None:
                raise env.BenchError("drift found where there is none")
        idle = (time.process_time() - started) / ticks * 1000
        dest = Path(nginx.upstreams)
        dest.write_bytes(dest.read_bytes() + b"# hand edit\n")
        started = time.process_time()
        kind = pipeline.drift()
        found = (time.process_time() - started) * 1000
        if kind is None:
            raise env.BenchError("the hand edit was not found")
        size = dest.stat().st_size
        return {"instances": instances, "ticks": ticks, "idle_tick_ms": idle,
                "edit_found_ms": found, "file_bytes": size}  # fmt: skip
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench reconcile")
    parser.add_argument("--sizes", default="10,10000")
    parser.add_argument("--ticks", type=int, default=1000)
    args = parser.parse_args(argv)
    configure_logging("info", "json", stream=io.StringIO())
    results = [measure(int(size), args.ticks) for size in args.sizes.split(",")]
    report.table(
        "Reconcile comparison, CPU in-process (ms)",
        ["instances", "file bytes", "idle tick", "tick finding a hand edit"],
        [[r["instances"], r["file_bytes"], r["idle_tick_ms"], r["edit_found_ms"]] for r in results],
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    report.save("reconcile", data)
    return data
