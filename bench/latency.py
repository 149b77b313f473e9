"""Put acknowledged → reload signal sent, and → the new config serving traffic.

The real product: ``lbsync run --log-format json`` (``wait.min = wait.max = 0``) against a
private etcd and nginx. The catalog holds N instances: N-1 filler instances over
``ceil((N-1)/100)`` services plus one ``probe`` instance, which nginx serves on a port of
its own. Each change flips the probe instance between two backends (A, B) with one
``EtcdWriter.put``; the clock starts when ``put`` returns (wall clock, this process).

- reload sent: the ISO timestamp of lbsync's ``nginx.reload_sent`` event (logged right
  after the SIGHUP) minus the put's return time. "Excluding the checker" subtracts the
  round's ``validate`` duration from its ``apply.reloaded`` event (staging + ``nginx -t`` +
  the listen pre-check; the staging share is measured by ``bench validation``).
- serving: from the moment the reload event is seen, fresh connections to the probe port
  until one is answered by the new backend.

``--layout one``: the N-1 filler instances in one service, rendered by a plain
``{% for i in service.up %}`` loop (``env.PLAIN_TEMPLATE``) instead of the stock template.

Changes are spaced apart (each waits for the previous round to finish, then ``gap``).
Everything lives under /tmp (a real disk here), as /etc/nginx would; ``--tmpfs-sizes``
runs sizes again with nginx's config and lbsync's state on tmpfs, to show what the disk's
fsync adds (a diagnostic row, not a target).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import env, report

TARGETS = {10: 10.0, 10000: 30.0}  # ms, p99, excluding the checker (DESIGN.md)
ONE_SERVICE_TARGETS = {10000: 20.0}  # --layout one (issue 15)
TMPFS = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
WARMUP = 5


def run_size(
    instances: int, changes: int, gap: float, base: Path | None = None, layout: str = "spread"
) -> dict[str, Any]:
    with env.world(f"latency-{instances}", base, sites=("probe",)) as w:
        keys = env.layout_filler(layout, instances - 1)
        probe = env.instance_key("probe", "p1")
        ports = w.backend_ports
        keys[probe] = env.instance_value("127.0.0.1", ports["A"])
        w.etcd.bulk_put(keys)
        template = env.layout_template(layout, w.root)
        lb = w.start_lbsync(template=template, wait_min="0", wait_max="0")
        lb.wait_applied(timeout=120)
        port = w.site_ports["probe"]
        env.wait_until(lambda: env.get_body(port) == "A", "the probe to be served by A")
        writer = w.etcd.writer()
        samples: list[dict[str, float]] = []
        try:
            for k in range(WARMUP + changes):
                name = "B" if k % 2 == 0 else "A"
                sample = _one_change(
                    lb, writer, probe, name, backend_port=ports[name], site_port=port
                )
                if k >= WARMUP:
                    samples.append(sample)
                time.sleep(gap)
        finally:
            writer.close()
        where = "tmpfs" if base else "disk"
        return {
            "instances": instances,
            "layout": layout,
            "files_on": where,
            "changes": len(samples),
            "samples": samples,
        }


def _one_change(
    lb: env.Lbsync, writer: Any, key: str, name: str, *, backend_port: int, site_port: int
) -> dict[str, float]:
    mark = lb.count()
    started = time.time()
    revision = writer.put(key, env.instance_value("127.0.0.1", backend_port))
    acked = time.time()
    sent = lb.wait_event(
        lambda e: e.get("event") == "nginx.reload_sent", after=mark, what="nginx.reload_sent"
    )
    deadline = time.monotonic() + 10
    while env.get_body(site_port) != name:
        if time.monotonic() > deadline:
            raise env.BenchError(f"r{revision}: nginx never served {name}")
    serving = time.time()
    applied = lb.events[lb.wait_applied(revision, after=mark)]
    if applied["event"] != "apply.reloaded":
        raise env.BenchError(f"r{revision}: expected apply.reloaded, got {applied}")
    sent_at = env.parse_ts(lb.events[sent]["timestamp"])
    ms = applied["ms"]
    raw = (sent_at - acked) * 1000
    return {
        "revision": revision,
        "put_ms": (acked - started) * 1000,
        "reload_sent_ms": raw,
        "validate_ms": ms.get("validate", 0.0),
        "reload_sent_excl_check_ms": raw - ms.get("validate", 0.0),
        "serving_ms": (serving - acked) * 1000,
        **{f"round_{k}_ms": v for k, v in ms.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench latency")
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.15, help="seconds between changes")
    parser.add_argument(
        "--tmpfs-sizes",
        default="",
        help="sizes to run again with nginx's config and lbsync's state on tmpfs, e.g. 10 "
        "(diagnostic: what the disk's fsync adds; default: none)",
    )
    parser.add_argument(
        "--layout", choices=env.LAYOUTS, default="spread",
        help="spread: 100 instances per service, stock template; one: the filler in one "
        "service, plain loop",
    )  # fmt: skip
    args = parser.parse_args(argv)
    targets = TARGETS if args.layout == "spread" else ONE_SERVICE_TARGETS
    results = []
    rows = []
    runs = [(int(s), None) for s in args.sizes.split(",") if s]
    runs += [(int(s), TMPFS) for s in args.tmpfs_sizes.split(",") if s and TMPFS]
    for size, base in runs:
        where = " (files on tmpfs)" if base else ""
        print(f"  latency: {size} instances{where}, {args.changes} changes …", flush=True)
        result = run_size(size, args.changes, args.gap, base, args.layout)
        samples = result["samples"]
        stats = {
            field: report.summary([s[field] for s in samples])
            for field in (
                "reload_sent_ms",
                "reload_sent_excl_check_ms",
                "validate_ms",
                "serving_ms",
                "put_ms",
                "round_render_ms",
                "round_swap_ms",
                "round_reload_ms",
                "round_verify_ms",
            )
        }
        result["stats"] = stats
        results.append(result)
        target = None if base else targets.get(size)
        excl99 = stats["reload_sent_excl_check_ms"]["p99"]
        rows.append(
            [
                f"{size:,}" + (" tmpfs" if base else ""),
                stats["reload_sent_ms"]["p50"],
                stats["reload_sent_ms"]["p99"],
                stats["reload_sent_excl_check_ms"]["p50"],
                excl99,
                stats["validate_ms"]["p50"],
                stats["serving_ms"]["p50"],
                stats["serving_ms"]["p99"],
                "-" if target is None else f"≤ {target:g}",
                "-" if target is None else report.verdict(excl99, target),
            ]
        )
    report.table(
        f"put acknowledged → nginx reload sent / new config serving, layout {args.layout} (ms)",
        [
            "instances",
            "raw p50",
            "raw p99",
            "excl p50",
            "excl p99",
            "validate p50",
            "serving p50",
            "serving p99",
            "target p99 excl",
            "verdict",
        ],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    report.save("latency", data)
    return data
