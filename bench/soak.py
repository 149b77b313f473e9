"""``python -m bench soak --minutes N``: random churn while faults are injected at random,
against a private etcd, a real nginx (master-worker, pid file) and ``lbsync run``.

Each cycle writes a few random changes (bench/soak_model.py), injects one fault from the
table (bench/soak_faults.py; the table is shuffled and walked round after round, so every
fault comes up), writes one change that alters the render (with
``--no-churn-after-fault``: none, and the fault waits for lbsync to settle first, to show
which faults lbsync repairs by itself) and waits — polling, bounded by ``--converge`` — until the
servers in the generated upstream file equal what etcd's keys say, computed by the bench
from its own read of etcd. A sampler thread checks throughout that the live config passes
``nginx -t``, that the nginx master is alive (except in the bench's own kill → restart
window), that lbsync is alive (likewise), and records lbsync's RSS.

Prints a table (fault → count, convergence p50/max, violations), writes it as Markdown
with ``--report FILE`` and the figures to ``bench/results/soak.json``; exits 1 on any
violation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import env, report
from bench.soak_faults import ETCD_KEEPALIVE, FAULTS, Fault
from bench.soak_model import ANCHOR, Change, Churn, expected_servers, rendered_servers

SETUP_TIMEOUT = 120.0
QUIET = 0.5  # seconds without an lbsync event: its round is over (--no-churn-after-fault)
# lbsync's events worth a column: how it noticed and handled each fault.
NOTABLE = ("source.lost", "catalog.reset", "catalog.loaded", "reconfigure.", "rollback.")
NOTABLE += ("apply.failed", "service.held", "guard.held")


@dataclass(frozen=True)
class Options:
    minutes: float = 3.0
    cycles: int = 0  # 0: as many as fit in ``minutes``
    converge: float = 15.0  # seconds; the bound on convergence after each fault
    churn: int = 6  # at most this many random changes between two faults
    churn_after_fault: bool = True
    faults: tuple[str, ...] = tuple(f.name for f in FAULTS)
    seed: int = 1
    sample: float = 1.0  # seconds between two invariant samples
    rss_warmup: float = 5.0  # seconds into an lbsync process's life before its RSS counts
    rss_limit_mb: float = 20.0


@dataclass
class Tally:
    """One fault's figures."""

    fault: Fault
    converged_s: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    said: Counter[str] = field(default_factory=Counter)  # lbsync's notable events


@dataclass
class Result:
    tallies: dict[str, Tally]
    cycles: int
    seconds: float
    nginx_checks: int
    rss_mb: dict[str, float]
    violations: list[str]


class Soak:
    """One soak run's world, churn, sampler and figures."""

    def __init__(self, world: env.World, options: Options) -> None:
        self.world = world
        self.options = options
        self.rng = random.Random(options.seed)
        self.http_port = env.free_port()
        self.churn = Churn(self.rng, sorted(world.backend_ports.values()))
        self.lbsync = self._configure_lbsync()
        self.tallies = {f.name: Tally(f) for f in FAULTS if f.name in options.faults}
        self.current = "setup"
        self.older_upstreams: str | None = None
        self._last_converged: str | None = None  # the upstream file when it last matched
        self._lock = threading.Lock()
        self._nginx_down_ok = False
        self._lbsync_down_ok = False
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, name="soak-sampler")
        self.nginx_checks = 0
        self.rss: list[tuple[float, int, int]] = []  # (monotonic, pid, kB)
        self._lbsync_started: dict[int, float] = {}
        self._probe = 0
        self._client: Any = None
        self.other_violations: list[str] = []  # outside any fault's cycle

    # --- the world ---------------------------------------------------------------------

    def _configure_lbsync(self) -> env.Lbsync:
        """The benches' lbsync.toml, with no guard hold (the churn's deletes would trip
        it, and a held update is no fault of the soak's; the catalog is never empty: the
        anchor) and ``[http] listen`` on a free loopback port."""
        lbsync = env.Lbsync(
            self.world.root,
            self.world.etcd.endpoint,
            self.world.front,
            wait_min="50ms",
            wait_max="1s",
        )
        with lbsync.config.open("a") as config:
            config.write("\n[guard]\nmax_removed_fraction = 1.0\n")
            config.write(f'\n[http]\nlisten = "127.0.0.1:{self.http_port}"\n')
        self.world.lbsync = lbsync  # stopped with the world
        return lbsync

    def start(self) -> None:
        """Seed etcd, start lbsync, wait for its first convergence and readiness."""
        self.write(self.churn.anchor())
        for _ in range(30):
            self.write(self.churn.next())
        self.lbsync.start()
        self._lbsync_started[self.lbsync.pid] = time.monotonic()
        if self.converge(SETUP_TIMEOUT) is None:
            raise env.BenchError("lbsync never rendered what etcd says after its start")
        env.wait_until(self._ready, "lbsync /readyz 200", timeout=SETUP_TIMEOUT)
        self._sampler.start()

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(60)

    def client(self) -> Any:
        """The bench's own pyetcd client (not lbsync's code), shared by the burst's threads."""
        with self._lock:
            if self._client is None:
                import pyetcd

                self._client = pyetcd.client("127.0.0.1", self.world.etcd.port, timeout=30)
            return self._client

    def forget_client(self) -> None:
        """After an etcd restart: a fresh client on the next call."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def write(self, change: Change) -> None:
        if change.value is None:
            self.client().delete(change.key)
        else:
            self.client().put(change.key, change.value)

    def put_back_older_upstreams(self) -> None:
        """Replace the live upstream file with one from an earlier cycle, atomically (the
        sampler's ``nginx -t`` must never see half a file)."""
        if self.older_upstreams is None:
            return
        dest = self.world.front.upstreams
        with tempfile.NamedTemporaryFile("w", dir=self.world.root, delete=False) as tmp:
            tmp.write(self.older_upstreams)
        Path(tmp.name).chmod(dest.stat().st_mode & 0o7777)
        Path(tmp.name).replace(dest)

    @contextlib.contextmanager
    def nginx_window(self) -> Iterator[None]:
        """The bench's own kill → restart of nginx: no "nginx is down" violation inside."""
        with self._lock:
            self._nginx_down_ok = True
        try:
            yield
        finally:
            with self._lock:
                self._nginx_down_ok = False

    @contextlib.contextmanager
    def lbsync_window(self) -> Iterator[None]:
        """The bench's own kill → restart (or pause) of lbsync."""
        with self._lock:
            self._lbsync_down_ok = True
        try:
            yield
        finally:
            with self._lock:
                self._lbsync_down_ok = False
                self._lbsync_started.setdefault(self.lbsync.pid, time.monotonic())

    # --- convergence -------------------------------------------------------------------

    def probe_change(self) -> Change:
        """A registration whose weight differs every time: it always changes the render."""
        self._probe += 1
        value = {"host": "127.0.9.1", "port": self.churn.ports[0], "weight": 1 + self._probe % 250}
        return Change("register", env.instance_key(ANCHOR[0], "probe"), json.dumps(value))

    def converge(self, bound: float) -> float | None:
        """Seconds until the upstream file holds what etcd says; None past ``bound``."""
        started = time.monotonic()
        want = expected_servers(self._dump())
        path = self.world.front.upstreams
        while time.monotonic() - started < bound:
            if rendered_servers(path) == want:
                elapsed = time.monotonic() - started
                self._last_converged = path.read_text()
                return elapsed
            time.sleep(0.05)  # polling for a state, bounded above
        got = rendered_servers(path)
        missing, extra = sorted(want - got)[:3], sorted(got - want)[:3]
        self._violation(f"not converged after {bound:g}s: missing {missing}, unexpected {extra}")
        return None

    def settle(self, bound: float) -> None:
        """Converged, and lbsync quiet for ``QUIET`` s (its round's reload and verify over:
        a round on a change that renders nothing new logs no ``apply.*`` to wait for)."""
        if self.converge(bound) is None:
            return
        started, seen, since = time.monotonic(), -1, time.monotonic()
        while time.monotonic() - since < QUIET:
            if time.monotonic() - started > bound:
                self._violation(f"lbsync still logging after {bound:g}s")
                return
            if (count := self.lbsync.count()) != seen:
                seen, since = count, time.monotonic()
            time.sleep(0.05)

    def _dump(self) -> dict[str, bytes]:
        client = self.client()
        return {m.key.decode(): bytes(v) for v, m in client.get_prefix(env.PREFIX)}

    def cycle(self, fault: Fault) -> None:
        older = self._last_converged  # before this cycle's churn: what a restore puts back
        for _ in range(self.rng.randint(1, self.options.churn)):
            self.write(self.churn.next())
        if not self.options.churn_after_fault:
            # The fault must meet a quiet lbsync, or the churn's own round repairs it.
            self.current = "settle"
            self.settle(self.options.converge)
        self.older_upstreams = older
        self.current = fault.name
        mark = self.lbsync.count()
        fault.inject(self)
        if self.options.churn_after_fault:
            self.write(self.probe_change())
        elapsed = self.converge(self.options.converge)
        if elapsed is not None:
            self.tallies[fault.name].converged_s.append(elapsed)
        else:
            self.tallies[fault.name].converged_s.append(float("nan"))
        for event in self.lbsync.events[mark:]:
            name = str(event.get("event", ""))
            if name.startswith(NOTABLE):
                self.tallies[fault.name].said[name] += 1

    # --- invariants --------------------------------------------------------------------

    def _violation(self, what: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} [{self.current}] {what}"
        print(f"  VIOLATION {line}", flush=True)
        if self.current in self.tallies:
            self.tallies[self.current].violations.append(line)
        else:
            self.other_violations.append(line)

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.options.sample):
            self._check_nginx_t()
            with self._lock:
                self._check_processes()

    def _check_nginx_t(self) -> None:
        front = self.world.front
        argv = front.argv("-t", "-q", "-e", "/dev/null")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            self._violation("nginx -t on the live tree timed out after 60s")
            return
        self.nginx_checks += 1
        if done.returncode != 0:
            self._violation(f"nginx -t refuses the live tree: {done.stderr.strip()[:300]}")

    def _check_processes(self) -> None:
        if not self._nginx_down_ok and self.world.front.master() is None:
            self._violation("nginx master is not running")
        process = self.lbsync.process
        if self._lbsync_down_ok or process is None:
            return
        if process.poll() is not None:
            self._violation(f"lbsync exited with {process.returncode}")
            return
        with contextlib.suppress(OSError, ValueError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            kb = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS"))
            self.rss.append((time.monotonic(), process.pid, kb))

    def rss_summary(self) -> dict[str, float]:
        """lbsync's RSS in MB: min/max over the run, and after warm-up (``rss_warmup`` s
        into each process's life) the first such sample (the baseline), the highest, and
        the growth between them. Every lbsync process holds the same catalog, so a restart
        does not reset the baseline: state that outlives a restart and grows shows too."""
        if not self.rss:
            return {}
        mb = [kb / 1024 for _t, _pid, kb in self.rss]
        warm = [
            kb / 1024
            for t, pid, kb in self.rss
            if t - self._lbsync_started.get(pid, t) >= self.options.rss_warmup
        ]
        summary = {"min": min(mb), "max": max(mb), "last": mb[-1]}
        if warm:
            summary |= {"warm_baseline": warm[0], "warm_max": max(warm)}
            summary["growth_after_warmup"] = max(warm) - warm[0]
        return summary


# --- the run ---------------------------------------------------------------------------


def fault_order(rng: random.Random, faults: list[Fault]) -> Iterator[Fault]:
    """The table shuffled, round after round: random, and every fault comes up."""
    while True:
        batch = list(faults)
        rng.shuffle(batch)
        yield from batch


def run(options: Options, base: Path | None = None) -> Result:
    chosen = [f for f in FAULTS if f.name in options.faults]
    unknown = set(options.faults) - {f.name for f in FAULTS}
    if unknown or not chosen:
        raise env.BenchError(f"unknown faults {sorted(unknown)}; known: {[f.name for f in FAULTS]}")
    started = time.monotonic()
    deadline = started + options.minutes * 60
    cycles = 0
    sites = (ANCHOR[0],)
    with env.world("soak", base, ETCD_KEEPALIVE, backend_names=("A", "B", "C"), sites=sites) as w:
        soak = Soak(w, options)
        try:
            soak.start()
            for fault in fault_order(soak.rng, chosen):
                if time.monotonic() >= deadline or (options.cycles and cycles >= options.cycles):
                    break
                soak.cycle(fault)
                cycles += 1
            soak.current = "end"
        finally:
            soak.stop()
        rss = soak.rss_summary()
        if rss.get("growth_after_warmup", 0.0) > options.rss_limit_mb:
            soak._violation(f"lbsync RSS grew {rss['growth_after_warmup']:.1f} MB after warm-up")
    violations = [v for t in soak.tallies.values() for v in t.violations]
    return Result(
        tallies=soak.tallies,
        cycles=cycles,
        seconds=time.monotonic() - started,
        nginx_checks=soak.nginx_checks,
        rss_mb=rss,
        violations=[*soak.other_violations, *violations],
    )


# --- the report ------------------------------------------------------------------------

HEADERS = ("fault", "needs reconciler", "count", "converged p50 s", "max s", "violations")
HEADERS += ("lbsync said",)


def rows(result: Result) -> list[list[Any]]:
    out: list[list[Any]] = []
    for tally in result.tallies.values():
        times = [t for t in tally.converged_s if not math.isnan(t)]  # NaN: not converged
        out.append(
            [
                tally.fault.name,
                "yes" if tally.fault.needs_reconciler else "",
                len(tally.converged_s),
                report.pct(times, 50),
                max(times) if times else float("nan"),
                len(tally.violations),
                ", ".join(f"{n} x{c}" for n, c in sorted(tally.said.items())),
            ]
        )
    return out


def markdown(result: Result, options: Options, command: str) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.2f}"
        return str(value)

    lines = [
        f"`{command}`: {result.cycles} cycles in {result.seconds / 60:.1f} min, "
        f"convergence bound {options.converge:g} s, "
        f"{'a change after each fault' if options.churn_after_fault else 'no change after faults'}"
        f", {result.nginx_checks} `nginx -t` samples, lbsync RSS "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in result.rss_mb.items())
        + f", {len(result.violations)} violations.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join("---" for _ in HEADERS) + " |",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows(result)]
    lines += ["", *(f"- {t.fault.name}: {t.fault.what}" for t in result.tallies.values())]
    if result.violations:
        lines += ["", "Violations:", *(f"- {v}" for v in result.violations)]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> tuple[Options, Path | None]:
    names = [f.name for f in FAULTS]
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=Options.minutes)
    parser.add_argument("--cycles", type=int, default=0, help="stop after this many faults")
    parser.add_argument("--converge", type=float, default=Options.converge, metavar="SECONDS")
    parser.add_argument("--churn", type=int, default=Options.churn, metavar="N")
    parser.add_argument("--no-churn-after-fault", action="store_true")
    parser.add_argument("--fault", action="append", choices=names, help="repeat; default all")
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument("--rss-limit", type=float, default=Options.rss_limit_mb, metavar="MB")
    parser.add_argument("--report", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    options = Options(
        minutes=args.minutes,
        cycles=args.cycles,
        converge=args.converge,
        churn=args.churn,
        churn_after_fault=not args.no_churn_after_fault,
        faults=tuple(args.fault or names),
        seed=args.seed,
        rss_limit_mb=args.rss_limit,
    )
    return options, args.report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options, report_path = parse(argv)
    result = run(options)
    title = f"soak: {result.cycles} cycles in {result.seconds:.0f}s"
    report.table(title, HEADERS, rows(result))
    print(f"  nginx -t samples: {result.nginx_checks}; lbsync RSS MB: {result.rss_mb}")
    command = shlex.join(["python", "-m", "bench", "soak", *(argv or [])])
    if report_path is not None:
        report_path.write_text(markdown(result, options, command))
        print(f"  → {report_path}")
    data = {
        "machine": report.machine(),
        "options": options.__dict__,
        "cycles": result.cycles,
        "seconds": result.seconds,
        "nginx_checks": result.nginx_checks,
        "rss_mb": result.rss_mb,
        "faults": {n: t.converged_s for n, t in result.tallies.items()},
        "violations": result.violations,
    }
    report.save("soak", data)
    if result.violations:
        print(f"FAILED: {len(result.violations)} violations", flush=True)
        raise SystemExit(1)
    return data
