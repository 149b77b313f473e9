"""One ``lbsync probe`` checking 10,000 instances every 5 s on loopback (issue 16).

The instances are 100 ids on each of 100 ports of one backend process (asyncio, its own
CPU not counted; each port answers with its number), registered in a real etcd. The
prober runs as ``lbsync probe`` in its own process with the stock check (HTTP GET,
interval 5 s, rise 2, fall 3, jitter 10 %).

Phases: warm-up until every instance has its first (up) verdict; a steady window in which
the prober's CPU, RSS and etcd writes are measured (writes should be 0: verdicts are
written on transitions only); one port starts answering 500 and the time until its 100
instances are down in etcd is taken. Then end to end: ``lbsync run`` (default waits) and
a front nginx proxying service ``e2e`` (two more instances, on ports of their own, among
the 10,000 checked); one of them starts answering 500 at a known moment, and the time until
nginx stops sending it requests (a fresh request to the front every ~10 ms, round-robin
over the two: resolution ~20 ms) is taken, then the time until it is back after it heals;
``--repeats`` times. Bounded: about 80 s plus ~30 s per repeat with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import env, report

PORTS = 100  # backend ports carrying the 10,000 instances
E2E = "e2e"  # the service followed end to end, to nginx
E2E_PORTS = 2
INTERVAL, FALL, RISE, JITTER = 5.0, 3, 2, 0.1  # the stock check's
POLL = 0.01  # seconds between two requests to the front during the end-to-end phase


# --- the backend process ---------------------------------------------------------------------


async def _serve(count: int) -> None:
    failing: set[int] = set()
    served = [0]  # requests answered, all ports: the prober's checks counted independently

    def handler(port: int) -> Any:
        body = str(port).encode()
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        error = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                writer.write(error if port in failing else ok)
                served[0] += 1
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
        command, port = line.split()
        if command == "count":
            print(served[0], flush=True)
        else:
            (failing.add if command == "fail" else failing.discard)(int(port))


@dataclass
class Backend:
    process: subprocess.Popen[str]
    ports: list[int]

    def tell(self, command: str, port: int) -> None:
        """``fail`` (answer 500 from now on) or ``heal`` one port."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command} {port}\n")
        self.process.stdin.flush()

    def served(self) -> int:
        """Requests answered so far, all ports."""
        assert self.process.stdout is not None
        self.tell("count", 0)
        return int(self.process.stdout.readline())


@contextlib.contextmanager
def _backend(count: int) -> Iterator[Backend]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.probe", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=env.REPO,
    )
    try:
        assert process.stdout is not None
        yield Backend(process, json.loads(process.stdout.readline()))
    finally:
        process.kill()
        process.wait(30)


@contextlib.contextmanager
def _prober(root: Path, endpoint: str) -> Iterator[tuple[psutil.Process, str]]:
    """``lbsync probe`` with the stock check; its process and its /metrics URL."""
    listen = f"127.0.0.1:{env.free_port()}"
    config = root / "probe.toml"
    config.write_text(
        f'[etcd]\nendpoints = ["{endpoint}"]\nprefix = "{env.PREFIX}"\n'
        f'[probe]\nname = "bench"\nlisten = "{listen}"\n'
    )
    argv = [sys.executable, "-m", "lbsync", "probe", "-c", str(config), "--log-level=warning"]
    prober = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield psutil.Process(prober.pid), f"http://{listen}"
    finally:
        prober.terminate()
        prober.wait(30)


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


def run(instances: int, steady: float, repeats: int) -> dict[str, Any]:
    per_port = instances // PORTS
    with (
        env.world("probe", backend_names=(), sites=(E2E,)) as w,
        _backend(PORTS + E2E_PORTS) as backend,
    ):
        ports, e2e_ports = backend.ports[:PORTS], backend.ports[PORTS:]
        keys = {
            env.instance_key(f"s{p % 10}", f"i{p}-{n}"): env.instance_value("127.0.0.1", port)
            for p, port in enumerate(ports)
            for n in range(per_port)
        }
        for n, port in enumerate(e2e_ports):
            keys[env.instance_key(E2E, f"e{n}")] = env.instance_value("127.0.0.1", port)
        w.etcd.bulk_put(keys)
        started = time.monotonic()
        with _prober(w.root, w.etcd.endpoint) as (process, url):
            result = _load(backend, process, url, len(keys), steady=steady, started=started)
            to_etcd, writes = _port_failure(w.etcd, backend, ports[0], per_port, url)
            result.update(failed_instances=per_port, failure_to_etcd_s=to_etcd)
            result.update(failure_etcd_writes=writes)
            result["end_to_end"] = _end_to_end(w, backend, e2e_ports[0], repeats)
    return result


def _load(
    backend: Backend,
    process: psutil.Process,
    url: str,
    count: int,
    *,
    steady: float,
    started: float,
) -> dict[str, Any]:
    """Warm-up, then the steady window: CPU, RSS, checks and etcd writes."""
    metrics = f"{url}/metrics"
    puts = 'op="put",outcome="ok"'
    env.wait_until(
        lambda: _metric_or_zero(metrics, "lbsync_probe_etcd_writes_total", puts) >= count,
        "every instance's first verdict",
        timeout=120,
    )
    warm_up = time.monotonic() - started
    writes0 = _metric(metrics, "lbsync_probe_etcd_writes_total")
    at0, cpu0, served0 = _snapshot(backend, process)
    time.sleep(steady)  # the measuring window itself, not a wait for a state
    at1, cpu1, served1 = _snapshot(backend, process)
    writes = _metric(metrics, "lbsync_probe_etcd_writes_total") - writes0
    window, checks = at1 - at0, served1 - served0
    return {
        "instances": count,
        "interval_s": INTERVAL,
        "warm_up_s": warm_up,
        "checks_per_s": checks / window,
        "cpu_cores": (cpu1 - cpu0) / window,
        "us_cpu_per_check": (cpu1 - cpu0) / checks * 1e6 if checks else None,
        "rss_mb": process.memory_info().rss / 2**20,
        "steady_etcd_writes": writes,
        "fall_x_interval_s": FALL * INTERVAL,
    }


def _port_failure(
    etcd: env.Etcd, backend: Backend, port: int, count: int, url: str
) -> tuple[float | None, float]:
    """Seconds until the ``count`` instances on ``port`` (service s0) are down in etcd
    after it starts failing (None, and why on stderr, past 60 s), and the etcd writes
    meanwhile."""
    writes = f"{url}/metrics", "lbsync_probe_etcd_writes_total"
    writes0 = _metric(*writes)
    failed_at = time.monotonic()
    backend.tell("fail", port)
    to_down: float | None = None
    try:
        to_down = _until_down(etcd, count, failed_at)
    except env.BenchError as exc:  # reported with the other figures, not instead of them
        fails = _metric(f"{url}/metrics", "lbsync_probe_checks_total", 'result="fail"')
        status = urllib.request.urlopen(f"{url}/status", timeout=5).read()
        print(f"{exc}; failed checks {fails:.0f}; prober {status.decode()}", file=sys.stderr)
    return to_down, _metric(*writes) - writes0


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


# --- end to end: a backend failure → nginx ---------------------------------------------------


def _end_to_end(w: env.World, backend: Backend, port: int, repeats: int) -> dict[str, Any]:
    """``repeats`` failures of the e2e instance on ``port``, each followed to nginx and back."""
    lb = w.start_lbsync(wait_min="50ms", wait_max="1s")  # lbsync's default waits
    lb.wait_applied(timeout=120)
    site = w.site_ports[E2E]
    env.wait_until(lambda: _served_by(site) == port, "nginx to serve the e2e instance", 60)
    verdict_key = f"{env.PREFIX}/services/{E2E}/probes/e0/bench"
    samples = []
    for _ in range(repeats):
        after = lb.count()
        sample = _one_failure(w.etcd, backend, site, port, verdict_key)
        sample["round_ms"] = _round_ms(lb, after)
        samples.append(sample)
    return {
        name: [sample[name] for sample in samples]
        for name in ("to_etcd_s", "to_nginx_s", "etcd_to_nginx_s", "back_s", "round_ms")
    }


def _round_ms(lb: env.Lbsync, after: int) -> dict[str, float]:
    """The stages (ms) of lbsync's first reload at or after event ``after``: the round that
    took the failing instance out."""
    index = lb.wait_event(lambda e: e.get("event") == "apply.reloaded", after=after, timeout=5)
    return dict(lb.events[index]["ms"])


def _one_failure(
    etcd: env.Etcd, backend: Backend, site: int, port: int, verdict_key: str
) -> dict[str, Any]:
    """Fail ``port``; request the front every ``POLL`` until the down verdict is in etcd and
    the port has not answered for 50 requests and 1 s; the first request after its last
    answer is when nginx stopped sending it traffic. Then heal it and wait until it answers
    through nginx again."""
    failed_at = time.monotonic()
    backend.tell("fail", port)
    deadline = failed_at + 60
    down_at: float | None = None
    out_at, since_hit = failed_at, 0
    while down_at is None or since_hit < 50 or time.monotonic() - out_at < 1.0:
        if time.monotonic() > deadline:
            raise env.BenchError(f"the failing e2e instance still served after 60 s ({down_at=})")
        if _served_by(site) == port:
            since_hit = 0
        else:
            since_hit += 1
            if since_hit == 1:
                out_at = time.monotonic()
        if down_at is None and _verdict(etcd, verdict_key) == "down":
            down_at = time.monotonic()
        time.sleep(POLL)
    healed_at = time.monotonic()
    backend.tell("heal", port)
    env.wait_until(lambda: _served_by(site) == port, "the healed e2e instance in nginx", 60)
    return {
        "to_etcd_s": down_at - failed_at,
        "to_nginx_s": out_at - failed_at,
        "etcd_to_nginx_s": out_at - down_at,
        "back_s": time.monotonic() - healed_at,
    }


def _served_by(site: int) -> int | None:
    """The backend port that answered one fresh request to the front (any status)."""
    conn = http.client.HTTPConnection("127.0.0.1", site, timeout=2)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        body = conn.getresponse().read()
        return int(body) if body.isdigit() else None
    except OSError:
        return None
    finally:
        conn.close()


def _verdict(etcd: env.Etcd, key: str) -> str | None:
    value, _meta = etcd.client.get(key)
    return None if value is None else str(json.loads(value)["status"])


def _snapshot(backend: Backend, process: psutil.Process) -> tuple[float, float, int]:
    """When, the prober's CPU seconds, and the requests the backend answered (= checks:
    nothing else talks to it then), read back to back: the window is what the clock says,
    not what ``steady`` asked for (a /metrics read from a busy prober can take seconds)."""
    return time.monotonic(), _cpu(process), backend.served()


def _metric_or_zero(url: str, name: str, labels: str) -> float:
    try:
        return _metric(url, name, labels)
    except OSError:
        return 0.0


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


# --- the report ------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.2f} / max {max(values):.2f}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench probe", description=__doc__)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--steady", type=float, default=30.0, help="measuring window (s)")
    parser.add_argument("--repeats", type=int, default=5, help="end-to-end failures (≥ 1)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.serve:
        asyncio.run(_serve(PORTS + E2E_PORTS))
        return
    result = run(args.instances, args.steady, args.repeats)
    e2e = result["end_to_end"]
    bound = result["fall_x_interval_s"]
    per_check = result["us_cpu_per_check"]
    nominal = result["instances"] / (INTERVAL * (1 - JITTER / 2))  # jitter shortens waits
    to_etcd = result["failure_to_etcd_s"]
    rows = [
        ["checks/s (requests answered)", f"{result['checks_per_s']:.0f}", f"{nominal:.0f}"],
        ["CPU (cores)", f"{result['cpu_cores']:.2f}", "at the checks/s reached"],
        [
            "µs CPU per check",
            "-" if per_check is None else f"{per_check:.0f}",
            "≤ 250" + ("" if per_check is None else f": {report.verdict(per_check, 250)}"),
        ],
        [
            f"CPU at the nominal {nominal:.0f} checks/s (cores)",
            "-" if per_check is None else f"{per_check * nominal / 1e6:.2f}",
            "0.5 at 2,000/s",
        ],
        ["RSS (MB)", f"{result['rss_mb']:.0f}", report.verdict(result["rss_mb"], 150)],
        ["etcd writes, steady", f"{result['steady_etcd_writes']:.0f}", "transitions only"],
        [
            "etcd writes, 1 port failing",
            f"{result['failure_etcd_writes']:.0f}",
            f"{result['failed_instances']} transitions",
        ],
        [
            "1 port failing → all down in etcd (s)",
            "> 60" if to_etcd is None else f"{to_etcd:.1f}",
            f"fall x interval = {bound:.0f}",
        ],
        ["e2e failure → down in etcd (s)", _spread(e2e["to_etcd_s"]), f"≤ {bound:.0f}"],
        ["e2e failure → out of nginx (s)", _spread(e2e["to_nginx_s"]), f"≤ {bound + 0.1:.1f}"],
        ["e2e down in etcd → out of nginx (s)", _spread(e2e["etcd_to_nginx_s"]), "≤ 0.10"],
        [
            "  of which lbsync's round (s)",
            _spread([sum(ms.values()) / 1000 for ms in e2e["round_ms"]]),
            "stages in probe.json",
        ],
        ["e2e healed → back in nginx (s)", _spread(e2e["back_s"]), f"≤ {RISE * INTERVAL:.0f}"],
        ["warm-up (s)", f"{result['warm_up_s']:.1f}", ""],
    ]
    title = f"lbsync probe: {result['instances']} instances every 5 s"
    title += f" (load average {os.getloadavg()[0]:.1f})"
    report.table(title, ["measure", "value", "target"], rows)
    report.save("probe", {"machine": report.machine(), **result})


if __name__ == "__main__":
    main(sys.argv[1:])
