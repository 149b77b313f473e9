"""nginx runtime mode vs reloads: 100 membership changes under keep-alive load, side by side.

Two worlds, one after the other, identical but for ``runtime = true`` on the target (and
the front nginx loading the Lua module, with the access check in its location): etcd,
four backends, the front nginx (one worker), ``lbsync run`` with the default wait
(50 ms / 1 s). In each:

- a control run, ``wrk -t2 -c8`` keep-alive for ``--control`` seconds with no change:
  requests/s through a static upstream vs through the Lua balancer (what runtime mode
  costs);
- the change run: the same wrk while 100 membership changes are written to etcd, one
  every ``--every`` seconds (one instance at a time marked down, then the mark removed).
  Failed requests = wrk's socket errors + non-2xx; reloads = lbsync's
  ``nginx.reload_sent``; pushes = ``apply.runtime``; and whether nginx's master and
  worker pids changed during the run.

The two control runs are minutes apart on a machine that may be busy, so the throughput
cost is measured separately, in the runtime world: its front nginx also has a hand-written
static upstream over the same four backends on a second port, and wrk alternates between
the two sites (``--pairs`` x ``--pair-seconds`` each). Reported: the median of the
per-pair ratios of requests served (Lua / static; wall clock, so other load on the machine
shows), and the front worker's CPU time per request on each site, whose ratio is the
capacity ratio when nginx is the bottleneck (robust to other load).

``python -m bench.nginx_runtime [--every 0.08] [--changes 100] [--control 5] [--pairs 5]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench import env, report
from bench.traffic import run_wrk

BACKENDS = ("A", "B", "C", "D")
LUA_MODULES = (
    "/usr/share/nginx/modules/ndk_http_module.so",  # before the Lua module, always
    "/usr/share/nginx/modules/ngx_http_lua_module.so",
)
ACCESS = 'access_by_lua_block { require("lbsync.runtime").access("web") } '


def _lua_front(front: env.Nginx, sites: dict[str, int], backends: dict[str, int]) -> int:
    """``configure_front``, plus the modules, the runtime mode's access check, and a static
    upstream over the same backends on another port (returned), for the throughput ratio."""
    front.configure_front(sites)
    text = front.conf.read_text()
    loads = "".join(f"load_module {module};\n" for module in LUA_MODULES)
    text = text.replace("location / { proxy_pass", f"location / {{ {ACCESS}proxy_pass")
    port = env.free_port()
    servers = "".join(f"server 127.0.0.1:{p}; " for p in backends.values())
    static = (
        f"    upstream static_web {{ {servers}keepalive 16; }}\n"
        f"    server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;\n"
        f"        location / {{ proxy_pass http://static_web; proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection ""; proxy_next_upstream error timeout; }}\n'
        f"    }}\n"
    )
    head, _, _ = text.rpartition("}")
    front.conf.write_text(f"{loads}{head}{static}}}\n")
    return port


def _runtime_target(lb: env.Lbsync, control_port: int) -> None:
    """Turn the target of lbsync's generated config into a runtime-mode target."""
    text = lb.config.read_text()
    token = lb.config.parent / "control.token"
    extra = (
        f'runtime = true\ncontrol_url = "http://127.0.0.1:{control_port}/lbsync/"\n'
        f'control_token_file = "{token}"\n'
    )
    lb.config.write_text(text.replace("\n  [[target.template]]", f"{extra}\n  [[target.template]]"))


@contextlib.contextmanager
def world(runtime: bool) -> Iterator[tuple[env.World, env.Lbsync, int | None]]:
    name = "runtime" if runtime else "reload"
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-nginx-{name}-"))
    w = env.World(root)
    try:
        w.etcd.start()
        w.backend_ports = {b: env.free_port() for b in BACKENDS}
        w.backends.configure_backends(w.backend_ports)
        w.backends.start()
        w.site_ports = {"web": env.free_port()}
        static_port = None
        if runtime:
            static_port = _lua_front(w.front, w.site_ports, w.backend_ports)
        else:
            w.front.configure_front(w.site_ports)
        w.front.start()
        keys = {
            env.instance_key("web", f"w{n}"): env.instance_value("127.0.0.1", w.backend_ports[b])
            for n, b in enumerate(BACKENDS)
        }
        keys[f"{env.PREFIX}/services/web/settings"] = '{"keepalive": 16}'
        w.etcd.bulk_put(keys)
        lb = env.Lbsync(root, w.etcd.endpoint, w.front, wait_min="50ms", wait_max="1s")
        if runtime:
            _runtime_target(lb, env.free_port())
        w.lbsync = lb
        lb.start()
        lb.wait_applied(timeout=60)
        port = w.site_ports["web"]
        env.wait_until(lambda: env.get_body(port) in BACKENDS, "nginx to serve web")
        env.wait_until(lambda: len(w.front.workers()) == 1, "old nginx workers to exit")
        yield w, lb, static_port
    finally:
        w.stop()
        if os.environ.get("BENCH_KEEP"):
            print(f"  (kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _pids(w: env.World) -> tuple[int | None, tuple[int, ...]]:
    master = w.front.master()
    return (None if master is None else master.pid), tuple(sorted(p.pid for p in w.front.workers()))


def measure(w: env.World, lb: env.Lbsync, changes: int, every: float) -> dict[str, Any]:
    """wrk while ``changes`` membership changes go to etcd, one per ``every`` seconds."""
    stop = threading.Event()
    written = 0

    def flap() -> None:
        nonlocal written
        writer = w.etcd.writer()
        try:
            while written < changes and not stop.wait(every):
                iid = f"w{written // 2 % len(BACKENDS)}"
                key = env.health_key("web", iid)
                if written % 2 == 0:
                    writer.put(key, '{"status": "down", "by": "bench"}')
                else:
                    writer.delete(key)
                written += 1
        finally:
            writer.close()

    seconds = math.ceil(changes * every) + 2
    before = _pids(w)
    mark = lb.count()
    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    start, end, wrk, raw = run_wrk(w.site_ports["web"], seconds)
    stop.set()
    flapper.join(10)
    after = _pids(w)
    window = [e for e in lb.events[mark:] if start <= env.parse_ts(e["timestamp"]) <= end]
    return {
        "seconds": seconds,
        "changes": written,
        "reloads": sum(e.get("event") == "nginx.reload_sent" for e in window),
        "pushes": sum(e.get("event") == "apply.runtime" for e in window),
        "rounds_failed": sum(
            e.get("event") in ("apply.failed", "apply.rolled_back") for e in window
        ),
        "pids_unchanged": before == after,
        **wrk,
        "wrk_output": raw,
    }


def control(w: env.World, seconds: int) -> dict[str, Any]:
    start, end, wrk, raw = run_wrk(w.site_ports["web"], seconds)
    return {**wrk, "rps": wrk["requests"] / (end - start), "wrk_output": raw}


def _worker_cpu(w: env.World) -> float:
    """CPU seconds (user + system) used so far by the front nginx's workers."""
    total = 0.0
    for proc in w.front.workers():
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def interleaved(
    w: env.World, lua_port: int, static_port: int, pairs: int, seconds: int
) -> dict[str, Any]:
    """wrk on the static site, then on the Lua site, ``pairs`` times. Per pair: the ratio
    of requests served, and the ratio of the front worker's CPU time per request (robust
    to other load on the machine, which wall-clock throughput is not)."""
    ratios, cpu_ratios, runs = [], [], []
    for _ in range(pairs):
        one: dict[str, Any] = {}
        for name, port in (("static", static_port), ("lua", lua_port)):
            cpu = _worker_cpu(w)
            _, _, wrk, _ = run_wrk(port, seconds)
            used = _worker_cpu(w) - cpu
            one[name] = {**wrk, "cpu_us_per_request": used / max(1, wrk["requests"]) * 1e6}
        runs.append(one)
        static, lua = one["static"], one["lua"]
        if static["requests"] and not (static["failed"] or lua["failed"]):
            ratios.append(lua["requests"] / static["requests"])
            cpu_ratios.append(static["cpu_us_per_request"] / lua["cpu_us_per_request"])
    return {
        "ratios": ratios,
        "median": report.pct(ratios, 50),
        "cpu_ratios": cpu_ratios,
        "cpu_median": report.pct(cpu_ratios, 50),
        "cpu_us_per_request": {
            name: report.pct([r[name]["cpu_us_per_request"] for r in runs], 50)
            for name in ("static", "lua")
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.nginx_runtime")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--every", type=float, default=0.08, help="seconds between changes")
    parser.add_argument("--control", type=int, default=5, help="seconds of the control run")
    parser.add_argument("--pairs", type=int, default=5, help="static/Lua wrk pairs")
    parser.add_argument("--pair-seconds", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    cost: dict[str, Any] = {}
    for runtime in (False, True):
        mode = "runtime (Lua)" if runtime else "reload (static)"
        with world(runtime) as (w, lb, static_port):
            time.sleep(0.5)  # let the first round's old worker finish for real
            base = control(w, args.control)
            run = measure(w, lb, args.changes, args.every)
            if static_port is not None:
                cost = interleaved(
                    w, w.site_ports["web"], static_port, args.pairs, args.pair_seconds
                )
        results[mode] = {"control": base, "changes": run}
    rows = [
        [mode, r["changes"]["changes"], r["changes"]["reloads"], r["changes"]["pushes"],
         r["changes"]["requests"], r["changes"]["connect"] + r["changes"]["read"]
         + r["changes"]["write"] + r["changes"]["timeout"], r["changes"]["non2xx"],
         r["changes"]["failed"], "yes" if r["changes"]["pids_unchanged"] else "no",
         r["control"]["rps"]]
        for mode, r in results.items()
    ]  # fmt: skip
    report.table(
        f"nginx: {args.changes} membership changes every {args.every:g}s under wrk -t2 -c8",
        ["mode", "changes", "reloads", "pushes", "requests", "socket errors", "non-2xx",
         "failed", "pids unchanged", "req/s, no changes"],
        rows,
    )  # fmt: skip
    shown = ", ".join(f"{r:.2f}" for r in cost["ratios"])
    cpu = cost["cpu_us_per_request"]
    print(
        f"  Lua balancer vs static upstream, same nginx, alternating wrk runs:\n"
        f"    requests served, Lua / static: median {cost['median']:.2f} ({shown})\n"
        f"    front worker CPU per request: static {cpu['static']:.1f} us, Lua {cpu['lua']:.1f} us"
        f" -> capacity ratio {cost['cpu_median']:.2f}",
        flush=True,
    )
    data = {"machine": report.machine(), "args": vars(args), "results": results, "cost": cost}
    report.save("nginx_runtime", data)
    return data


if __name__ == "__main__":
    main()
