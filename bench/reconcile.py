"""What an idle reconcile tick costs: the comparison lbsync makes every
``reconcile.interval`` when nothing changed, in-process, at 10 and 10,000 instances.

A real nginx (as ``bench rounds``) and lbsync's own ``TargetPipeline`` + ``NginxDriver``:
one good round, then ``TargetPipeline.drift`` (a ``stat`` per destination file, the nginx
master's pid file and ``/proc`` entry) and ``repair_runtime`` (nothing to do in files
mode), N times. CPU is ``time.process_time()`` of this process. Then the same after a
hand edit: the bytes are read and compared once, and the repair is a normal round.

``--haproxy`` adds HAProxy runtime mode (a real HAProxy, as ``bench haproxy-cost``, and
``HaproxyDriver``) at 1 x 10,000 and 100 x 100 instances: the idle tick reads every
backend's summary (``show stat -1 2 -1``) and ``show servers state`` of the backends
whose turn it is (``runtime_check_slots`` slots a tick): its mean and worst tick, and
HAProxy's own CPU a tick (its workers' utime + stime, 10 ms resolution over the run).
Then a tick finding a server someone set to ``maint`` over the admin socket (the
summary moved: that backend is compared server by server and put back), and how many
ticks an address change takes to be found (only the rotation sees it; the bound is
ceil(slots / runtime_check_slots)).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import env, inprocess, report
from bench.haproxy_runtime import Haproxy, in_process_pipeline
from lbsync.catalog import Catalog
from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.state import config_servers
from lbsync.logging import configure_logging
from lbsync.model import KeyValue
from lbsync.pipeline import TargetPipeline


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


def measure_haproxy(services: int, per_service: int, ticks: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-reconcile-haproxy-{services}-"))
    haproxy = Haproxy(root / "haproxy")
    try:
        pipeline = in_process_pipeline(haproxy, root / "state")
        catalog = Catalog(env.PREFIX)
        catalog.load(_haproxy_instances(services, per_service), 1)
        snapshot = catalog.snapshot()
        haproxy.config.write_bytes(pipeline.plan(snapshot).rendered[haproxy.config])
        haproxy.start()
        if not pipeline.apply(snapshot).ok:
            raise env.BenchError("the first round failed")
        for _ in range(3):  # warm up; the first comparison is server by server
            pipeline.drift()
            pipeline.repair_runtime()
        workers = haproxy.generation()["workers"]
        lb_before = _cpu_ticks(workers)
        each = []
        for _ in range(ticks):
            started = time.process_time()
            if pipeline.drift() is not None or pipeline.repair_runtime() is not None:
                raise env.BenchError("drift found where there is none")
            each.append((time.process_time() - started) * 1000)
        lb_ms = (_cpu_ticks(workers) - lb_before) / os.sysconf("SC_CLK_TCK") * 1000 / ticks
        admin = Cli(haproxy.admin_socket, target="bench")
        admin.query("set server svc000/s1 state maint")
        started = time.process_time()
        outcome = pipeline.repair_runtime()
        found = (time.process_time() - started) * 1000
        if outcome is None or outcome.action != "runtime":
            raise env.BenchError(f"the maint server was not put back: {outcome}")
        admin.query("set server svc000/s2 addr 10.255.255.254 port 9")
        addr_ticks = _ticks_until_repaired(pipeline, limit=10 * ticks)
        target = pipeline.driver.target
        slots = sum(len(s) for s in config_servers(haproxy.config.read_text()).values())
        return {"instances": services * per_service, "shape": f"{services} x {per_service:,}",
                "ticks": ticks, "idle_tick_ms": statistics.fmean(each),
                "idle_tick_max_ms": max(each), "haproxy_ms_per_tick": lb_ms,
                "maint_found_ms": found, "addr_found_ticks": addr_ticks,
                "cycle_ticks": math.ceil(slots / target.runtime_check_slots),
                "slots": slots}  # fmt: skip
    finally:
        haproxy.stop()
        shutil.rmtree(root, ignore_errors=True)


def _ticks_until_repaired(pipeline: TargetPipeline, limit: int) -> int:
    """Reconcile ticks until one puts something back (an address change: only the
    rotation sees it)."""
    for tick in range(1, limit + 1):
        if pipeline.drift() is None and pipeline.repair_runtime() is not None:
            return tick
    raise env.BenchError(f"the changed address was not put back in {limit} ticks")


def _cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, in clock ticks (``/proc/<pid>/stat``)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def _haproxy_instances(services: int, per_service: int) -> Iterator[KeyValue]:
    for s in range(services):
        for i in range(per_service):
            key = env.instance_key(f"svc{s:03d}", f"i{i:05d}")
            host = f"10.{s % 250}.{i // 250 % 250}.{1 + i % 250}"
            value = json.dumps({"host": host, "port": 8000 + s, "weight": 1}).encode()
            yield KeyValue(key=key, value=value, mod_revision=1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench reconcile")
    parser.add_argument("--sizes", default="10,10000")
    parser.add_argument("--ticks", type=int, default=1000)
    parser.add_argument("--haproxy", action="store_true", help="add HAProxy runtime mode")
    parser.add_argument("--haproxy-ticks", type=int, default=200)
    args = parser.parse_args(argv)
    configure_logging("info", "json", stream=io.StringIO())
    results = [measure(int(size), args.ticks) for size in args.sizes.split(",")]
    report.table(
        "Reconcile comparison, CPU in-process (ms)",
        ["instances", "file bytes", "idle tick", "tick finding a hand edit"],
        [[r["instances"], r["file_bytes"], r["idle_tick_ms"], r["edit_found_ms"]] for r in results],
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    if args.haproxy:
        shapes = [(1, 10_000), (100, 100)]
        hap = [measure_haproxy(s, n, args.haproxy_ticks) for s, n in shapes]
        report.table(
            "HAProxy runtime mode: reconcile tick, CPU in-process (ms)",
            ["instances", "idle tick", "worst idle tick", "HAProxy's CPU a tick",
             "tick finding a server set to maint", "ticks to find an address (bound)"],
            [[r["shape"], r["idle_tick_ms"], r["idle_tick_max_ms"], r["haproxy_ms_per_tick"],
              r["maint_found_ms"], f"{r['addr_found_ticks']} ({r['cycle_ticks']})"]
             for r in hap],
        )  # fmt: skip
        data["haproxy"] = hap
    report.save("reconcile", data)
    return data
