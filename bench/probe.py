"""One ``lbsync probe`` checking 10,000 instances every 5 s on loopback (issue 16).

The instances are 100 ids on each of 100 ports of one backend process (asyncio, its own
CPU not counted), registered in a real etcd. The prober runs as ``lbsync probe`` in its
own process with the stock check (HTTP GET, interval 5 s, rise 2, fall 3, jitter 10 %).

Phases: warm-up until every instance has its first (up) verdict; a steady window in which
the prober's CPU, RSS and etcd writes are measured (writes should be 0: verdicts are
written on transitions only); then one port starts answering 500 and the time until its
100 instances are down in etcd is taken (the daemon's event → nginx part is ``bench
latency``). Bounded: about 80 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench import env, report

PORTS = 100


# --- the backend process ---------------------------------------------------------------------


async def _serve(count: int) -> None:
    failing: set[int] = set()

    def handler(port: int) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                status = b"500 Internal Server Error" if port in failing else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        return handle

    ports = []
    for _ in range(count):
        port = env.free_port()
        await asyncio.start_server(handler(port), "127.0.0.1", port, backlog=1024)
        ports.append(port)
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        failing.add(int(line.split()[1]))


# --- the bench -------------------------------------------------------------------------------


def _metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{" if labels else name) and labels in line
    )


def _down(etcd: env.Etcd, service: str) -> int:
    """Instances of ``service`` with a down verdict in etcd."""
    verdicts = etcd.dump(f"{env.PREFIX}/services/{service}/probes/").values()
    return sum(1 for value in verdicts if json.loads(value)["status"] == "down")


def run(instances: int, steady: float) -> dict[str, Any]:
    per_port = instances // PORTS
    root = Path(tempfile.mkdtemp(prefix="lbsync-bench-probe-"))
    etcd = env.Etcd(root)
    backend = subprocess.Popen(
        [sys.executable, "-m", "bench.probe", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=env.REPO,
    )
    prober: subprocess.Popen[bytes] | None = None
    try:
        assert backend.stdout is not None
        assert backend.stdin is not None
        ports = json.loads(backend.stdout.readline())
        etcd.start()
        keys = {
            env.instance_key(f"s{p % 10}", f"i{p}-{n}"): env.instance_value("127.0.0.1", port)
            for p, port in enumerate(ports)
            for n in range(per_port)
        }
        etcd.bulk_put(keys)
        listen = f"127.0.0.1:{env.free_port()}"
        config = root / "probe.toml"
        config.write_text(
            f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nprefix = "{env.PREFIX}"\n'
            f'[probe]\nname = "bench"\nlisten = "{listen}"\n'
        )
        started = time.monotonic()
        argv = [sys.executable, "-m", "lbsync", "probe", "-c", str(config), "--log-level=warning"]
        prober = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = f"http://{listen}/metrics"
        puts = 'op="put",outcome="ok"'
        env.wait_until(
            lambda: _metric_or_zero(metrics, "lbsync_probe_etcd_writes_total", puts) >= len(keys),
            "every instance's first verdict",
            timeout=120,
        )
        warm_up = time.monotonic() - started
        process = psutil.Process(prober.pid)
        cpu0, writes0, checks0 = (
            _cpu(process),
            _metric(metrics, "lbsync_probe_etcd_writes_total"),
            _metric(metrics, "lbsync_probe_checks_total"),
        )
        time.sleep(steady)  # the measuring window itself, not a wait for a state
        cpu = (_cpu(process) - cpu0) / steady
        steady_writes = _metric(metrics, "lbsync_probe_etcd_writes_total") - writes0
        checks = (_metric(metrics, "lbsync_probe_checks_total") - checks0) / steady
        rss = process.memory_info().rss / 2**20

        failed_at = time.monotonic()
        backend.stdin.write(f"fail {ports[0]}\n")
        backend.stdin.flush()
        to_down: float | None = None
        try:
            to_down = _until_down(etcd, per_port, failed_at)
        except env.BenchError as exc:  # reported with the other figures, not instead of them
            fails = _metric(metrics, "lbsync_probe_checks_total", 'result="fail"')
            status = urllib.request.urlopen(f"http://{listen}/status", timeout=5).read()
            print(f"{exc}; failed checks {fails:.0f}; prober {status.decode()}", file=sys.stderr)
        writes_after = _metric(metrics, "lbsync_probe_etcd_writes_total") - writes0
    finally:
        if prober is not None:
            prober.terminate()
            prober.wait(30)
        backend.kill()
        backend.wait(30)
        etcd.stop()
    return {
        "instances": len(keys),
        "interval_s": 5.0,
        "warm_up_s": warm_up,
        "checks_per_s": checks,
        "cpu_cores": cpu,
        "rss_mb": rss,
        "steady_etcd_writes": steady_writes,
        "failure_etcd_writes": writes_after - steady_writes,
        "failed_instances": per_port,
        "failure_to_etcd_s": to_down,
        "fall_x_interval_s": 3 * 5.0,
    }


def _until_down(etcd: env.Etcd, count: int, since: float) -> float:
    """Seconds from ``since`` until ``count`` instances of s0 are down in etcd. Polled every
    0.1 s (a 1,000-key read; polling faster would take CPU from the prober it measures)."""
    deadline = since + 60
    while time.monotonic() < deadline:
        if _down(etcd, "s0") >= count:
            return time.monotonic() - since
        time.sleep(0.1)
    down = _down(etcd, "s0")
    raise env.BenchError(f"{count} instances of s0 not down within 60 s ({down} are)")


def _metric_or_zero(url: str, name: str, labels: str) -> float:
    try:
        return _metric(url, name, labels)
    except OSError:
        return 0.0


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench probe", description=__doc__)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--steady", type=float, default=30.0, help="measuring window (s)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(PORTS))
        return
    result = run(args.instances, args.steady)
    rows = [
        ["checks/s", f"{result['checks_per_s']:.0f}", ""],
        ["CPU (cores)", f"{result['cpu_cores']:.2f}", report.verdict(result["cpu_cores"], 0.5)],
        ["RSS (MB)", f"{result['rss_mb']:.0f}", report.verdict(result["rss_mb"], 150)],
        ["etcd writes, steady", f"{result['steady_etcd_writes']:.0f}", "transitions only"],
        [
            "etcd writes, 1 port failing",
            f"{result['failure_etcd_writes']:.0f}",
            f"{result['failed_instances']} transitions",
        ],
        [
            "failure → down in etcd (s)",
            "> 60" if result["failure_to_etcd_s"] is None else f"{result['failure_to_etcd_s']:.1f}",
            f"fall x interval = {result['fall_x_interval_s']:.0f}",
        ],
        ["warm-up (s)", f"{result['warm_up_s']:.1f}", ""],
    ]
    title = f"lbsync probe: {result['instances']} instances every 5 s"
    title += f" (load average {os.getloadavg()[0]:.1f})"
    report.table(title, ["measure", "value", "target"], rows)
    report.save("probe", {"machine": report.machine(), **result})


if __name__ == "__main__":
    main(sys.argv[1:])
