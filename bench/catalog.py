"""The catalog alone, in-process: full load, one change, bytes per instance (issue 15).

No etcd, no LB: ``Catalog.reset`` + ``snapshot`` on the values ``bench scale`` and
``bench startup`` put in etcd (``{"host": "10.x.y.z", "port": ..., "weight": 1,
"meta": {"zone": "a"}}``), in two layouts: ``spread`` (100 instances a service) and
``one`` (every instance in one service). CPU is ``time.process_time()``, the minimum
and median over ``--runs``, so other tenants' load moves it little. A change is one put
rewriting an instance, then the snapshot and ``changed_services`` (what the guard
compares). Bytes per instance: ``tracemalloc``, everything the catalog and its snapshot
hold after a full load, divided by the instances.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from typing import Any

from bench import env, report
from lbsync.catalog import Catalog
from lbsync.model import KeyEvent, KeyValue, SourceEvents, SourceReset, changed_services


def instances(count: int, layout: str) -> SourceReset:
    """``count`` instances, 100 a service (``spread``) or all in ``svc000`` (``one``)."""
    per_service = 100 if layout == "spread" else count
    kvs = []
    for n in range(count):
        s, i = divmod(n, per_service)
        host = f"10.{i // 62500}.{i // 250 % 250}.{1 + i % 250}"
        key = env.instance_key(f"svc{s:03d}", f"i{i:03d}")
        value = env.instance_value(host, 8000 + s % 1000)
        kvs.append(KeyValue(key=key, value=value.encode(), mod_revision=1))
    return SourceReset(revision=1, kvs=tuple(kvs))


def full_load(reset: SourceReset, runs: int) -> tuple[list[float], Catalog]:
    times = []
    catalog = Catalog(env.PREFIX)
    for _ in range(runs):
        catalog = Catalog(env.PREFIX)
        gc.collect()
        t0 = time.process_time()
        catalog.reset(reset)
        catalog.snapshot()
        times.append(time.process_time() - t0)
    return times, catalog


def changes(catalog: Catalog, count: int, services: int) -> list[float]:
    previous = catalog.snapshot()
    times = []
    for n in range(count):
        key = env.instance_key(f"svc{n % services:03d}", f"i{n * 7 % 100:03d}")
        value = env.instance_value(f"10.200.0.{1 + n % 250}", 9000 + n)
        event = KeyEvent(kind="put", key=key, value=value.encode(), mod_revision=10 + n)
        t0 = time.process_time()
        catalog.apply(SourceEvents(revision=10 + n, events=(event,)))
        snapshot = catalog.snapshot()
        changed_services(previous, snapshot)
        times.append(time.process_time() - t0)
        previous = snapshot
    return times


def bytes_per_instance(reset: SourceReset) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    catalog = Catalog(env.PREFIX)
    catalog.reset(reset)
    snapshot = catalog.snapshot()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del catalog, snapshot
    return held / len(reset.kvs)


def run(count: int, layout: str, runs: int, change_count: int) -> dict[str, Any]:
    reset = instances(count, layout)
    load, catalog = full_load(reset, runs)
    rejected = len(catalog.rejected)
    if rejected:
        raise env.BenchError(f"{rejected} values rejected: the bench's values must all pass")
    services = max(1, count // 100) if layout == "spread" else 1
    change = changes(catalog, change_count, services)
    return {
        "instances": count,
        "layout": layout,
        "load_ms_min": min(load) * 1000,
        "load_ms_median": statistics.median(load) * 1000,
        "load_us_per_key": min(load) / count * 1e6,
        "change_ms_min": min(change) * 1000,
        "change_ms_median": statistics.median(change) * 1000,
        "bytes_per_instance": bytes_per_instance(reset),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench catalog")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--layouts", default="spread,one")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args(argv)
    results = [
        run(int(size), layout, args.runs, args.changes)
        for size in args.sizes.split(",")
        for layout in args.layouts.split(",")
    ]
    report.table(
        "catalog in-process: full load (reset + snapshot) and one change, CPU ms",
        ["instances", "layout", "load min", "load median", "µs/key", "change min",
         "change median", "bytes/instance"],
        [
            [r["instances"], r["layout"], r["load_ms_min"], r["load_ms_median"],
             r["load_us_per_key"], r["change_ms_min"], r["change_ms_median"],
             r["bytes_per_instance"]]
            for r in results
        ],
    )  # fmt: skip
    data = {"machine": report.machine(), "args": vars(args), "result": results}
    report.save("catalog", data)
    return data
