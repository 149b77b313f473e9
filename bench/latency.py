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

``--driver command``: issue 15's comparison harness instead (what confd and remco were
measured with): one service ``web`` whose keys ``<prefix>/services/web/instances/<id>`` hold
bare ``10.x.y.z:80`` values, a plain template (a loop over ``service.up``, no cache tag),
the command driver with no check command and a trivial reload command that appends
``date +%s%N`` to a file. The clock starts when ``put`` returns and stops at that
timestamp: when the reload command runs. Each change moves one instance to a new address.
Between changes the bench also starts the same reload command itself, through lbsync's
``run_command``, and times it the same way (call → the command's timestamp): the
"command alone" column is the share of the figure that is ``sh`` and ``date`` starting
(``sh``, which starts ``date``: two ``fork`` + ``exec``; the issue's clock includes them), under
the same load.

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
from lbsync.commands import run_command

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


COMMAND_TARGET = {10: (3.0, 5.0)}  # ms, p50 and p99, put → reload command (issue 15)

_COMMAND_TOML = """\
state_dir = "{state}"

[etcd]
endpoints = ["{endpoint}"]
prefix = "{prefix}"

[wait]
min = "0"
max = "0"

[[target]]
name = "cmd"
driver = "command"
reload_command = ["sh", "-c", "echo $(date +%s%N) >> RELOAD_LOG"]

  [[target.template]]
  src = "TEMPLATE"
  dest = "DEST"
"""

PLAIN_TEMPLATE = """\
{% for name, service in services.items() %}upstream {{ name }} {
{% for i in service.up %}    server {{ i.host }}:{{ i.port }} weight={{ i.weight }};
{% endfor %}}
{% endfor %}"""


def _bare_value(n: int) -> str:
    return f"10.{n // 62500 % 250}.{n // 250 % 250}.{1 + n % 250}:80"


def command_world(w: env.World, instances: int) -> tuple[str, Path, Path]:
    """Issue 15's layout in ``w``: etcd filled, the template written. Returns lbsync.toml's
    text, the reload command's log and the rendered file."""
    reload_log = w.root / "reloads.log"
    template = w.root / "upstreams.j2"
    template.write_text(PLAIN_TEMPLATE)
    dest = w.root / "out" / "upstreams.conf"
    config = (
        _COMMAND_TOML.replace("RELOAD_LOG", str(reload_log))
        .replace("TEMPLATE", str(template))
        .replace("DEST", str(dest))
    )
    w.etcd.bulk_put({env.instance_key("web", f"i{n}"): _bare_value(n) for n in range(instances)})
    return config, reload_log, dest


def run_command_driver(instances: int, changes: int, gap: float) -> dict[str, Any]:
    """Issue 15's layout: one service, bare values, plain template, command driver."""
    with env.world(f"latency-command-{instances}") as w:
        config, reload_log, _ = command_world(w, instances)
        w.lbsync = lb = env.Lbsync(w.root, w.etcd.endpoint, w.front, config_text=config)
        lb.start()
        lb.wait_applied(timeout=120)
        writer = w.etcd.writer()
        samples: list[dict[str, float]] = []
        try:
            for k in range(WARMUP + changes):
                value = _bare_value(instances + k)  # a new address each time
                sample = _one_command_change(
                    lb, writer, reload_log, env.instance_key("web", "i0"), value
                )
                sample["command_alone_ms"] = _command_alone(w.root / "alone.log")
                if k >= WARMUP:
                    samples.append(sample)
                time.sleep(gap)
        finally:
            writer.close()
        return {
            "instances": instances,
            "driver": "command",
            "changes": len(samples),
            "samples": samples,
        }


def _one_command_change(
    lb: env.Lbsync, writer: Any, reload_log: Path, key: str, value: str
) -> dict[str, float]:
    mark = lb.count()
    lines_before = _line_count(reload_log)
    revision = writer.put(key, value)
    acked_ns = time.time_ns()
    applied = lb.events[lb.wait_applied(revision, after=mark)]
    if applied["event"] != "apply.reloaded":
        raise env.BenchError(f"r{revision}: expected apply.reloaded, got {applied}")
    lines = reload_log.read_text().split()
    if len(lines) != lines_before + 1:
        raise env.BenchError(f"r{revision}: {len(lines) - lines_before} reloads for one change")
    return {
        "revision": revision,
        "reload_command_ms": (int(lines[-1]) - acked_ns) / 1e6,
        **{f"round_{k}_ms": v for k, v in applied["ms"].items()},
    }


def _command_alone(log: Path) -> float:
    """The reload command started as lbsync starts it: call → its timestamp, in ms."""
    argv = ["sh", "-c", f"echo $(date +%s%N) >> {log}"]
    started_ns = time.time_ns()
    run_command(argv, timeout=10.0, what="the bench's reload command failed")
    return (int(log.read_text().split()[-1]) - started_ns) / 1e6


def _line_count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def command_main(args: argparse.Namespace) -> dict[str, Any]:
    results, rows = [], []
    for size in (int(s) for s in args.sizes.split(",") if s):
        print(f"  latency (command driver): {size} instances, {args.changes} changes …", flush=True)
        result = run_command_driver(size, args.changes, args.gap)
        samples = result["samples"]
        fields = [
            "reload_command_ms",
            "command_alone_ms",
            *sorted({k for s in samples for k in s if k.startswith("round_")}),
        ]
        result["stats"] = {f: report.summary([s.get(f, 0.0) for s in samples]) for f in fields}
        results.append(result)
        stats = result["stats"]
        p50, p99 = stats["reload_command_ms"]["p50"], stats["reload_command_ms"]["p99"]
        target = COMMAND_TARGET.get(size)
        rows.append(
            [
                f"{size:,}",
                p50,
                p99,
                stats.get("round_swap_ms", {}).get("p50", 0.0),
                f"{stats['command_alone_ms']['p50']:.2f} / {stats['command_alone_ms']['p99']:.2f}",
                "-" if target is None else f"≤ {target[0]:g} / ≤ {target[1]:g}",
                "-"
                if target is None
                else report.verdict(max(p50 / target[0], p99 / target[1]), 1.0),
            ]
        )
    report.table(
        "put acknowledged → reload command runs, command driver, one service (ms)",
        [
            "instances",
            "p50",
            "p99",
            "swap p50",
            "command alone p50 / p99",
            "target p50 / p99",
            "verdict",
        ],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    report.save("latency-command", data)
    return data


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
    parser.add_argument(
        "--driver",
        choices=["nginx", "command"],
        default="nginx",
        help="command: issue 15's harness (one service, bare values, plain template, a "
        "reload command that logs its start); try --sizes 10",
    )
    args = parser.parse_args(argv)
    if args.driver == "command":
        return command_main(args)
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
