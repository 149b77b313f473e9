"""The source's two transports side by side: etcd's JSON gateway and gRPC (issue 15).

In-process, against one etcd of the bench's own (``env.Etcd``, loopback):

- **full read**: ``EtcdSource(transport=...).read_all()`` of N keys (``env.filler``'s
  values), CPU (``time.process_time``) and wall, after one warm-up read, the two
  transports interleaved over ``--runs``;
- **put → watch event**: ``EtcdSource.run`` in a thread, a writer's put timed from just
  before the call to the ``SourceEvents`` reaching the source's ``emit``; ``--puts``
  puts 10 ms apart per transport, interleaved in two rounds.

Why the default (``transport = "auto"``) reads over gRPC and watches over the gateway:
the gateway's read is slower in etcd itself (JSON marshalling), its watch leaves no gRPC
thread waking an idle daemon (``bench idle``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import env, report
from lbsync.config import EtcdSettings
from lbsync.logging import configure_logging
from lbsync.model import SourceEvents, SourceMessage, SourceReset
from lbsync.source.etcd import EtcdSource

TRANSPORTS = ("http", "grpc")


def _settings(etcd: env.Etcd, transport: str, prefix: str) -> EtcdSettings:
    return EtcdSettings(endpoints=[etcd.endpoint], prefix=prefix, transport=transport, timeout=60)


def read_times(etcd: env.Etcd, transport: str) -> tuple[float, float, int]:
    """One warm-up read, then one timed: (CPU ms, wall ms, keys read)."""
    source = EtcdSource(_settings(etcd, transport, env.PREFIX))
    try:
        source.read_all()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        reset = source.read_all()
        cpu1, wall1 = time.process_time(), time.perf_counter()
    finally:
        source.close()
    return (cpu1 - cpu0) * 1000, (wall1 - wall0) * 1000, len(reset.kvs)


def event_latencies(etcd: env.Etcd, transport: str, puts: int) -> list[float]:
    """put called → its event emitted by the source, ms, for ``puts`` puts 10 ms apart."""
    prefix = f"/latency-{transport}-{time.monotonic_ns()}"
    arrived: dict[str, float] = {}
    seen = threading.Condition()

    def emit(message: SourceMessage) -> None:
        if isinstance(message, SourceReset):  # the watch resumes after the read's revision
            with seen:
                arrived["(read)"] = time.perf_counter()
                seen.notify_all()
        if isinstance(message, SourceEvents):
            now = time.perf_counter()
            with seen:
                for event in message.events:
                    arrived[event.key] = now
                seen.notify_all()

    def wait_for(key: str) -> float:
        with seen:
            if not seen.wait_for(lambda: key in arrived, timeout=30):
                raise env.BenchError(f"no watch event for {key} within 30 s ({transport})")
            return arrived[key]

    source = EtcdSource(_settings(etcd, transport, prefix))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(emit, stop), daemon=True)
    thread.start()
    writer = etcd.writer()
    samples = []
    try:
        wait_for("(read)")  # a put before the read would come as part of it, not as an event
        writer.put(f"{prefix}/warm", "x")
        wait_for(f"{prefix}/warm")
        for n in range(puts):
            key = f"{prefix}/k{n}"
            sent = time.perf_counter()
            writer.put(key, str(n))
            samples.append((wait_for(key) - sent) * 1000)
            time.sleep(0.01)  # a pause between changes, as the latency bench's gap
    finally:
        stop.set()
        source.interrupt()
        thread.join(10)
        writer.close()
    return samples


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def run(sizes: list[int], runs: int, puts: int) -> dict[str, Any]:
    reads: list[dict[str, Any]] = []
    latency: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    with tempfile.TemporaryDirectory(prefix="lbsync-bench-transport-") as tmp:
        etcd = env.Etcd(Path(tmp))
        etcd.start()
        try:
            for transport in (*TRANSPORTS, *TRANSPORTS):
                latency[transport] += event_latencies(etcd, transport, puts // 2)
            for size in sizes:
                etcd.client.delete_prefix(env.PREFIX)
                etcd.bulk_put(env.filler(size))
                for _ in range(runs):
                    for transport in TRANSPORTS:
                        cpu, wall, keys = read_times(etcd, transport)
                        reads.append(
                            {"keys": keys, "transport": transport, "cpu_ms": cpu, "wall_ms": wall}
                        )
        finally:
            etcd.stop()
    return {
        "reads": reads,
        "latency": {
            t: {"p50": statistics.median(s), "p99": _p99(s), "n": len(s)}
            for t, s in latency.items()
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench transport")
    parser.add_argument("--sizes", default="10000,100000", help="keys read, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="timed reads per transport and size")
    parser.add_argument("--puts", type=int, default=300, help="puts timed per transport")
    args = parser.parse_args(argv)
    configure_logging("warning")  # the sources' connect and read events, not the tables
    sizes = sorted(int(s) for s in args.sizes.split(","))
    result = run(sizes, args.runs, args.puts)
    rows = []
    for size in sizes:
        for transport in TRANSPORTS:
            mine = [r for r in result["reads"] if r["transport"] == transport and r["keys"] == size]
            cpu = [r["cpu_ms"] for r in mine]
            wall = [r["wall_ms"] for r in mine]
            rows.append([size, transport, min(cpu), max(cpu), min(wall), max(wall)])
    report.table(
        "full read in-process (EtcdSource.read_all), ms",
        ["keys", "transport", "CPU min", "CPU max", "wall min", "wall max"],
        rows,
    )
    report.table(
        "put called → SourceEvents emitted, ms",
        ["transport", "p50", "p99", "puts"],
        [[t, v["p50"], v["p99"], v["n"]] for t, v in result["latency"].items()],
    )
    data = {"machine": report.machine(), "args": vars(args), "result": result}
    report.save("transport", data)
    return data
