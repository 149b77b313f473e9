"""Scale at 10,000 instances: RSS, CPU per change, bytes read from etcd per change.

``lbsync run`` (``wait.min = wait.max = 0``) reads etcd through a byte-counting TCP relay
(``env.CountingRelay``): what it counts etcd → lbsync is exactly the bytes lbsync read
from etcd on the wire, gRPC/HTTP2 framing included. (``io_counters().read_chars`` would
also count lbsync reading its own files and /proc, so it cannot isolate etcd.) The first
full read gives the size of the whole prefix for comparison.

Each change rewrites one instance (a new port), spaced apart so that each is one round:
with ``--layout spread`` (default) one of a 100-instance service rendered by the stock
template, with ``--layout one`` one of a single service holding every instance, rendered
by a plain ``{% for i in service.up %}`` loop (``env.PLAIN_TEMPLATE``).
CPU is ``psutil.Process.cpu_times()`` of the lbsync process (user + system, all
threads) over the N changes / N; the checker (``nginx -t``, a child) is reported apart
(``children_*``). Idle CPU (the loop's ticks, gRPC keepalives) over the same wall time is
measured separately and shown too.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psutil

from bench import env, report

# (RSS MB, CPU ms per change): DESIGN.md at 10,000; issue 15 at 100,000 (one service: 60).
TARGETS = {10000: (80.0, 10.0), 100000: (400.0, 15.0)}
ONE_SERVICE_CPU_MS = {100000: 60.0}


def targets(instances: int, layout: str) -> tuple[float, float]:
    """The targets of the nearest size measured (RSS MB, CPU ms per change)."""
    size = min(TARGETS, key=lambda known: abs(known - instances))
    rss, cpu = TARGETS[size]
    return rss, ONE_SERVICE_CPU_MS.get(size, cpu) if layout == "one" else cpu


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    t = proc.cpu_times()
    return t.user + t.system, t.children_user + t.children_system


def run(instances: int, changes: int, gap: float, layout: str = "spread") -> dict[str, Any]:
    with env.world("scale", sites=("probe",)) as w:
        keys = env.layout_filler(layout, instances - 1)
        keys[env.instance_key("probe", "p1")] = env.instance_value("127.0.0.1", 9)
        w.etcd.bulk_put(keys)
        prefix_bytes = sum(len(k) + len(v) for k, v in keys.items())
        template = env.layout_template(layout, w.root)
        lb = w.start_lbsync(relay=True, template=template, wait_min="0", wait_max="0")
        lb.wait_applied(timeout=120)
        assert w.relay is not None
        proc = psutil.Process(lb.pid)
        time.sleep(1.0)
        startup_bytes = w.relay.down
        rss_loaded = proc.memory_info().rss

        # Idle: nothing changes for a while.
        idle_s = 3.0
        cpu0, _ = _cpu(proc)
        time.sleep(idle_s)
        cpu1, _ = _cpu(proc)
        idle_cpu_per_s = (cpu1 - cpu0) / idle_s

        writer = w.etcd.writer()
        values: list[int] = []
        try:
            down0 = w.relay.down
            cpu0, child0 = _cpu(proc)
            t0 = time.monotonic()
            for k in range(changes):
                key = env.layout_change_key(layout, k, instances - 1)
                value = env.instance_value(f"10.{k % 100}.0.{1 + k % 250}", 9000 + k)
                values.append(len(key) + len(value))
                mark = lb.count()
                revision = writer.put(key, value)
                event = lb.events[lb.wait_applied(revision, after=mark)]
                if event["event"] != "apply.reloaded":
                    raise env.BenchError(f"expected apply.reloaded, got {event}")
                time.sleep(gap)
            elapsed = time.monotonic() - t0
            cpu1, child1 = _cpu(proc)
            down1 = w.relay.down
        finally:
            writer.close()
        rss_after = proc.memory_info().rss
        cpu_ms = (cpu1 - cpu0) / changes * 1000
        idle_share_ms = idle_cpu_per_s * elapsed / changes * 1000
        return {
            "instances": instances,
            "layout": layout,
            "changes": changes,
            "prefix_bytes": prefix_bytes,
            "startup_bytes_read": startup_bytes,
            "bytes_per_change": (down1 - down0) / changes,
            "kv_bytes_per_change": sum(values) / len(values),
            "rss_mb_loaded": rss_loaded / 2**20,
            "rss_mb_after_changes": rss_after / 2**20,
            "cpu_ms_per_change": cpu_ms,
            "idle_cpu_ms_per_s": idle_cpu_per_s * 1000,
            "cpu_ms_per_change_minus_idle": cpu_ms - idle_share_ms,
            "checker_cpu_ms_per_change": (child1 - child0) / changes * 1000,
            "elapsed_s": elapsed,
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench scale")
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.1)
    parser.add_argument(
        "--layout", choices=env.LAYOUTS, default="spread",
        help="spread: 100 instances per service, stock template; one: one service, plain loop",
    )  # fmt: skip
    args = parser.parse_args(argv)
    r = run(args.instances, args.changes, args.gap, args.layout)
    rss = max(r["rss_mb_loaded"], r["rss_mb_after_changes"])
    target_rss, target_cpu = targets(args.instances, args.layout)
    report.table(
        f"scale at {r['instances']:,} instances, layout {r['layout']} "
        f"({r['changes']} single changes)",
        ["figure", "value", "target", "verdict"],
        [
            ["RSS after load (MB)", r["rss_mb_loaded"], "", ""],
            ["RSS after changes (MB)", r["rss_mb_after_changes"], f"≤ {target_rss:g}",
             report.verdict(rss, target_rss)],
            ["CPU per change, lbsync (ms)", r["cpu_ms_per_change"], f"≤ {target_cpu:g}",
             report.verdict(r["cpu_ms_per_change"], target_cpu)],
            ["  of which idle share (ms)",
             r["cpu_ms_per_change"] - r["cpu_ms_per_change_minus_idle"], "", ""],
            ["CPU per change, nginx -t child (ms)", r["checker_cpu_ms_per_change"], "", ""],
            ["idle CPU (ms per s)", r["idle_cpu_ms_per_s"], "", ""],
            ["bytes from etcd per change", r["bytes_per_change"], "≈ one event", ""],
            ["  key + value of the put", r["kv_bytes_per_change"], "", ""],
            ["bytes from etcd at start (full read)", r["startup_bytes_read"], "", ""],
            ["  keys + values in the prefix", r["prefix_bytes"], "", ""],
        ],
    )  # fmt: skip
    data = {"machine": report.machine(), "args": vars(args), "result": r}
    report.save("scale", data)
    return data
