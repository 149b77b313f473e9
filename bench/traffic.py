"""Traffic during change: keep-alive HTTP load through nginx while instances flap.

``wrk -t2 -c8`` (keep-alive) against nginx's ``web`` site, whose upstream has four
instances on four backends (upstream keepalive on). lbsync runs with the default wait
(50 ms / 1 s). First a control run with no changes; then a run during which one instance
at a time is marked down and back up in etcd every ``--every`` seconds. Failed requests =
wrk's socket errors (connect, read, write, timeout) + non-2xx/3xx responses; reloads are
lbsync's ``nginx.reload_sent`` events inside the run.

HAProxy (reload and runtime mode) is not measured here yet: see the slot in
docs/benchmarks.md, to be filled by the HAProxy driver's owner with the same method.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import threading
import time
from typing import Any

from bench import env, report

BACKENDS = ("A", "B", "C", "D")


def parse_wrk(text: str) -> dict[str, int]:
    out = {"requests": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0}
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = int(m.group(1))
    if m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non2xx"] = int(m.group(1))
    out["failed"] = sum(out[k] for k in ("connect", "read", "write", "timeout", "non2xx"))
    return out


def run_wrk(port: int, seconds: int) -> tuple[float, float, dict[str, int], str]:
    argv = ["wrk", "-t2", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]
    start = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return start, time.time(), parse_wrk(done.stdout), done.stdout


def measure(w: env.World, lb: env.Lbsync, seconds: int, every: float | None) -> dict[str, Any]:
    stop = threading.Event()
    changes = 0

    def flap() -> None:
        nonlocal changes
        writer = w.etcd.writer()
        try:
            k = 0
            while not stop.wait(every):
                iid = f"w{k // 2 % len(BACKENDS)}"
                key = env.health_key("web", iid)
                if k % 2 == 0:
                    writer.put(key, '{"status": "down", "by": "bench"}')
                else:
                    writer.delete(key)
                changes += 1
                k += 1
        finally:
            writer.close()

    flapper = threading.Thread(target=flap, daemon=True) if every else None
    mark = lb.count()
    if flapper:
        flapper.start()
    start, end, wrk, raw = run_wrk(w.site_ports["web"], seconds)
    stop.set()
    if flapper:
        flapper.join(10)
    reloads = [
        e
        for e in lb.events[mark:]
        if e.get("event") == "nginx.reload_sent" and start <= env.parse_ts(e["timestamp"]) <= end
    ]
    return {
        "seconds": seconds,
        "changes": changes,
        "reloads": len(reloads),
        **wrk,
        "failed_per_reload": wrk["failed"] / len(reloads) if reloads else 0.0,
        "wrk_output": raw,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench traffic")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between changes")
    args = parser.parse_args(argv)
    with env.world("traffic", sites=("web",), backend_names=BACKENDS) as w:
        keys = {
            env.instance_key("web", f"w{n}"): env.instance_value("127.0.0.1", w.backend_ports[b])
            for n, b in enumerate(BACKENDS)
        }
        keys[f"{env.PREFIX}/services/web/settings"] = '{"keepalive": 16}'
        w.etcd.bulk_put(keys)
        lb = w.start_lbsync(wait_min="50ms", wait_max="1s")
        lb.wait_applied(timeout=60)
        port = w.site_ports["web"]
        env.wait_until(lambda: env.get_body(port) in BACKENDS, "nginx to serve web")
        # The placeholder's worker may still accept for a moment after the first reload:
        # start measuring once it is gone.
        env.wait_until(lambda: len(w.front.workers()) == 1, "old nginx workers to exit")
        time.sleep(0.5)
        control = measure(w, lb, min(5, args.seconds), None)
        flapping = measure(w, lb, args.seconds, args.every)
    rows = [
        [name, r["seconds"], r["changes"], r["reloads"], r["requests"], r["connect"], r["read"],
         r["write"], r["timeout"], r["non2xx"], r["failed"], r["failed_per_reload"]]
        for name, r in (("no changes", control), ("flapping", flapping))
    ]  # fmt: skip
    report.table(
        "nginx under wrk -t2 -c8 (keep-alive) while instances flap",
        ["run", "s", "changes", "reloads", "requests", "connect", "read", "write", "timeout",
         "non-2xx", "failed", "failed/reload"],
        rows,
    )  # fmt: skip
    data = {"machine": report.machine(), "args": vars(args), "control": control}
    data["flapping"] = flapping
    report.save("traffic", data)
    return data
