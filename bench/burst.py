"""A burst of 1,000 changes from parallel writers, with the default wait (50 ms / 1 s).

10,000 instances are loaded first. Then 8 threads, each with its own ``EtcdWriter``,
write 1,000 changes as fast as they can: health marks ``down``, health marks removed,
instances re-registered on a new port, instances deleted, new instances added (a fixed
random mix). Counted from lbsync's log: reloads (``nginx.reload_sent``) from the first
write until 3 s after the final round; the time from the last acknowledged write to the
final reload. Then the rendered upstreams file is compared with etcd's keys, read back
with a plain client and interpreted independently of lbsync (the stock template's
rules: up → ``server a weight=w;``, drain → ``… down;``, down → left out).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import env, report

TARGET_RELOADS = 2
WRITERS = 8
BAD = {"up": 0, "drain": 1, "down": 2}


def plan_changes(count: int, seed: int) -> list[tuple[str, str, str | None]]:
    """(op, key, value) — value None means delete."""
    rng = random.Random(seed)
    ops: list[tuple[str, str, str | None]] = []
    for n in range(count):
        svc, iid = f"svc{rng.randrange(100):03d}", f"i{rng.randrange(100):03d}"
        roll = rng.random()
        if roll < 0.35:
            ops.append(("mark down", env.health_key(svc, iid), '{"status": "down", "by": "bench"}'))
        elif roll < 0.5:
            ops.append(("unmark", env.health_key(svc, iid), None))
        elif roll < 0.8:
            host = f"10.{rng.randrange(250)}.9.{1 + rng.randrange(250)}"
            value = env.instance_value(host, 9000 + n)
            ops.append(("re-register", env.instance_key(svc, iid), value))
        elif roll < 0.9:
            ops.append(("delete", env.instance_key(svc, iid), None))
        else:
            host = f"10.{rng.randrange(250)}.8.{1 + rng.randrange(250)}"
            value = env.instance_value(host, 7000 + n)
            ops.append(("add", env.instance_key(svc, f"n{seed}x{n}"), value))
    return ops


def expected_servers(keys: dict[str, bytes]) -> set[tuple[str, str, int, bool]]:
    """(service, address, weight, drain) of every server line etcd's state calls for."""
    regs: dict[tuple[str, str], dict[str, Any]] = {}
    marks: dict[tuple[str, str], str] = {}
    for key, raw in keys.items():
        parts = key[len(env.PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "services":
            continue
        where = (parts[2], parts[4])
        if parts[3] == "instances":
            regs[where] = json.loads(raw)
        elif parts[3] == "health":
            text = raw.decode().strip()
            marks[where] = json.loads(text)["status"] if text.startswith("{") else text
    servers = set()
    for (svc, iid), reg in regs.items():
        state = max(reg.get("state", "up"), marks.get((svc, iid), "up"), key=BAD.__getitem__)
        if state != "down":
            address = f"{reg['host']}:{reg['port']}"
            servers.add((svc, address, int(reg.get("weight", 1)), state == "drain"))
    return servers


_UPSTREAM = re.compile(r"^upstream (\S+) \{")
_SERVER = re.compile(r"^\s+server (\S+) weight=(\d+)( down)?;")


def rendered_servers(path: Path) -> set[tuple[str, str, int, bool]]:
    servers, service = set(), ""
    for line in path.read_text().splitlines():
        if m := _UPSTREAM.match(line):
            service = m.group(1)
        elif m := _SERVER.match(line):
            servers.add((service, m.group(1), int(m.group(2)), bool(m.group(3))))
    return servers


def burst(w: env.World, lb: env.Lbsync, ops: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    writers = [w.etcd.writer() for _ in range(WRITERS)]
    local = threading.local()
    pool_index = iter(range(WRITERS))
    lock = threading.Lock()
    acked: list[tuple[float, int]] = []

    def write(op: tuple[str, str, str | None]) -> None:
        if not hasattr(local, "writer"):
            with lock:
                local.writer = writers[next(pool_index)]
        _kind, key, value = op
        if value is None:
            local.writer.delete(key)
            revision = 0
        else:
            revision = local.writer.put(key, value)
        t = time.time()
        with lock:
            acked.append((t, revision))

    mark = lb.count()
    first = time.time()
    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(write, ops))
    finally:
        for writer in writers:
            writer.close()
    last_ack = max(t for t, _ in acked)
    final_revision = w.etcd.writer_revision()
    final = lb.wait_applied(final_revision, after=mark, timeout=30)
    time.sleep(3.0)  # anything later would be a straggler round: count it too
    events = lb.events[mark:]
    reloads = [e for e in events if e.get("event") == "nginx.reload_sent"]
    rounds = [e for e in events if str(e.get("event", "")).startswith("apply.")]
    final_reload = max(env.parse_ts(e["timestamp"]) for e in reloads) if reloads else float("nan")
    want = expected_servers(w.etcd.dump())
    got = rendered_servers(w.front.upstreams)
    return {
        "changes": len(ops),
        "write_s": last_ack - first,
        "reloads": len(reloads),
        "rounds": [(e["event"], e["revision"]) for e in rounds],
        "final_round": lb.events[final]["event"],
        "last_write_to_final_reload_ms": (final_reload - last_ack) * 1000,
        "final_revision": final_revision,
        "servers_expected": len(want),
        "servers_rendered": len(got),
        "missing": sorted(want - got)[:5],
        "unexpected": sorted(got - want)[:5],
        "equal": want == got,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench burst")
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--bursts", type=int, default=3)
    args = parser.parse_args(argv)
    results = []
    with env.world("burst", sites=("probe",)) as w:
        keys = env.filler(args.instances - 1)
        keys[env.instance_key("probe", "p1")] = env.instance_value("127.0.0.1", 9)
        w.etcd.bulk_put(keys)
        lb = w.start_lbsync(wait_min="50ms", wait_max="1s")
        lb.wait_applied(timeout=120)
        time.sleep(1.0)
        for n in range(args.bursts):
            results.append(burst(w, lb, plan_changes(args.changes, seed=n)))
    rows = [
        [
            i + 1,
            r["changes"],
            r["write_s"] * 1000,
            r["reloads"],
            r["last_write_to_final_reload_ms"],
            f"{r['servers_rendered']}/{r['servers_expected']}",
            "yes" if r["equal"] else "NO",
            report.verdict(r["reloads"], TARGET_RELOADS) if r["equal"] else "NOT MET",
        ]
        for i, r in enumerate(results)
    ]
    report.table(
        f"burst of {args.changes:,} changes by {WRITERS} writers at {args.instances:,} instances",
        [
            "burst",
            "changes",
            "writing took ms",
            "reloads",
            "last write → final reload ms",
            "servers",
            "equal to etcd",
            "≤ 2 reloads",
        ],
        rows,
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results}
    report.save("burst", data)
    return data
