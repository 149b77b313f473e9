"""HAProxy under keep-alive load while 100 membership changes go through etcd and lbsync.

Issue 6, item 4 (HAProxy). ``wrk -t2 -c8`` (keep-alive, at most 10 s) against a private
HAProxy 2.6 master-worker (``-W -S``, stock template, one ``web`` backend of four
instances on four backend ports served by a private nginx) while the real
``lbsync run --log-format json`` (``wait.min = wait.max = 0``) applies 100 membership-only
changes written with ``EtcdWriter`` every 80 ms (as in lb-mechanics.md): health marks down
and cleared, draining and back, weight changes, an instance deregistered and registered
again — never more than one of the four out of rotation at a time. lbsync applies them as
they come; a round that starts while it is still busy with the last one takes every write
since (``rounds`` ≤ ``changes``). All writes, and the round applying the last, fall inside
wrk's run (checked, and said if not).

Twice, on fresh processes: ``runtime = true`` (the default) and ``runtime = false``.

- failed requests: wrk's socket errors (connect, read, write, timeout) + non-2xx/3xx;
- reloads: lbsync's ``apply.reloaded`` vs ``apply.runtime`` events for the 100 changes,
  ``haproxy.reload`` events, and whether the HAProxy master and worker pids (``show proc``)
  changed between before and after the run.

``python -m bench haproxy_runtime --cost`` measures something else: lbsync's own cost of
one runtime membership change with big backends (1 x 10,000 instances = one backend of
20,000 slots, and 100 x 100), in-process through ``TargetPipeline`` against a real HAProxy.

``python -m bench haproxy_runtime [--changes 100] [--seconds 10] [--every 0.08] [--cost]``
(or ``python -m bench.haproxy_runtime …`` until it is listed in ``bench/__main__.py``)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import env, report
from bench.traffic import parse_wrk

if TYPE_CHECKING:
    from lbsync.pipeline import TargetPipeline

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
TEMPLATE = env.REPO / "templates" / "haproxy" / "haproxy.cfg.j2"
BACKENDS = ("A", "B", "C", "D")
SERVICE = "web"

_LBSYNC_TOML = """\
state_dir = "{state}"

[etcd]
endpoints = ["{endpoint}"]
prefix = "{prefix}"

[wait]
min = "0"
max = "0"

[http]
listen = "127.0.0.1:{http_port}"

[[target]]
name = "haproxy"
driver = "haproxy"
binary = "{haproxy}"
config = "{config}"
pid_file = "{pid}"
master_socket = "{master}"
admin_socket = "{admin}"
state_file = "{state_file}"
runtime = {runtime}

  [[target.template]]
  src = "{template}"
  dest = "{config}"
"""


class Haproxy:
    """One HAProxy master (our child, ``-W`` in the foreground) and its workers.

    ``<dir>/etc`` holds the config (what lbsync stages); sockets, pid and state file live
    in ``<dir>/run``; the master's output goes to ``<dir>/haproxy.log``.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.etc = directory / "etc"
        self.run = directory / "run"
        for sub in (self.etc, self.run):
            sub.mkdir(parents=True, exist_ok=True)
        self.config = self.etc / "haproxy.cfg"
        self.master_socket = self.run / "master.sock"
        self.admin_socket = self.run / "admin.sock"
        self.state_file = self.run / "server-state"
        self.pid_file = self.run / "haproxy.pid"
        self.log = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def bootstrap(self, listen_port: int) -> None:
        """Render the stock template for the ``web`` service with no instances yet (what an
        operator deploys before lbsync's first round) and start HAProxy on it."""
        from lbsync.config import HaproxyTarget, TemplateSettings
        from lbsync.drivers.haproxy.driver import HaproxyDriver
        from lbsync.model import Service, Snapshot
        from lbsync.render import Renderer

        target = HaproxyTarget.model_validate(
            {
                "name": "bootstrap",
                "driver": "haproxy",
                "templates": [TemplateSettings(src=TEMPLATE, dest=self.config)],
                "config": self.config,
                "admin_socket": self.admin_socket,
                "state_file": self.state_file,
            }
        )
        service = Service(name=SERVICE, settings={"listen": f"127.0.0.1:{listen_port}"})
        snapshot = Snapshot(revision=0, services={SERVICE: service})
        driver = HaproxyDriver(target)
        extra = driver.template_context(snapshot)
        self.config.write_bytes(Renderer().render(TEMPLATE, snapshot, extra))
        self.start()

    def start(self) -> None:
        argv = [HAPROXY, "-W", "-S", str(self.master_socket), "-p", str(self.pid_file)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*argv, "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        env.wait_until(self._loaded, "HAProxy to load its config")
        env.wait_until(self._answers, "HAProxy's master socket")

    def _loaded(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise env.BenchError(f"HAProxy exited: {self.log.read_text(errors='replace')}")
        return self.loads() > 0

    def _answers(self) -> bool:
        try:
            self.generation()
            return True
        except (OSError, ValueError, RuntimeError):
            return False

    def loads(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Loading success.")
        except OSError:
            return 0

    def generation(self) -> dict[str, Any]:
        """Master pid and worker pids from ``show proc`` on the master socket."""
        from lbsync.drivers.haproxy.master import Cli, parse_show_proc
        from lbsync.errors import DriverError

        try:
            proc = parse_show_proc(Cli(self.master_socket, target="bench").query("show proc"))
        except DriverError as err:
            raise RuntimeError(str(err)) from err
        return {"master": proc.master_pid, "workers": list(proc.pids), "loads": self.loads()}

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class HaproxyLbsync(env.Lbsync):
    """``env.Lbsync`` (subprocess, JSON log parsed as it is written) with a HAProxy target."""

    def __init__(self, workdir: Path, etcd_endpoint: str, haproxy: Haproxy, runtime: bool):
        super().__init__(workdir, etcd_endpoint, env.Nginx(workdir / "unused"))
        self.http_port = env.free_port()
        self.config.write_text(
            _LBSYNC_TOML.format(
                state=self.state,
                endpoint=etcd_endpoint,
                prefix=env.PREFIX,
                haproxy=HAPROXY,
                config=haproxy.config,
                pid=haproxy.pid_file,
                master=haproxy.master_socket,
                admin=haproxy.admin_socket,
                state_file=haproxy.state_file,
                runtime="true" if runtime else "false",
                template=TEMPLATE,
                http_port=self.http_port,
            )
        )

    def applied_revision(self) -> int:
        """The revision of the target's last round, whatever it did (``/status``: a round
        whose net effect was nothing logs only at debug level)."""
        url = f"http://127.0.0.1:{self.http_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(json.load(resp)["targets"]["haproxy"]["revision"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0


def _changes(count: int) -> list[tuple[str, str, str | None]]:
    """``count`` membership-only writes (op, key, value): one instance out at most."""
    cycle: list[tuple[str, str, str | None]] = []
    for n in range(len(BACKENDS)):
        iid = f"w{n}"
        health = env.health_key(SERVICE, iid)
        reg = env.instance_key(SERVICE, iid)
        cycle += [
            ("put", health, '{"status": "down", "by": "bench"}'),
            ("delete", health, None),
            ("reg", reg, json.dumps({"weight": 3})),
            ("reg", reg, json.dumps({"state": "drain"})),
            ("reg", reg, json.dumps({})),
            ("delete", reg, None),
            ("reg", reg, json.dumps({})),
        ]
    return [cycle[k % len(cycle)] for k in range(count)]


class _Changer:
    """Writes the changes ``every`` seconds apart (lbsync batches what arrives while it is
    busy, as it would in production), then waits for the last one to be applied."""

    def __init__(
        self,
        etcd: env.Etcd,
        lb: HaproxyLbsync,
        registration: Callable[..., str],
        *,
        count: int,
        every: float,
        mark: int,
    ) -> None:
        self.etcd, self.lb, self.registration = etcd, lb, registration
        self.count, self.every, self.mark = count, every, mark
        self.done = 0
        self.seconds = 0.0
        self.applied_at = 0.0  # wall clock: when lbsync had applied the last change
        self.error: str | None = None

    def run(self) -> None:
        time.sleep(0.5)  # wrk's connections are up
        writer = self.etcd.writer()
        started = time.monotonic()
        try:
            revision = 0
            for k, (op, key, value) in enumerate(_changes(self.count)):
                time.sleep(max(0.0, started + k * self.every - time.monotonic()))
                if op == "put":
                    revision = writer.put(key, value or "")
                elif op == "delete":
                    writer.delete(key)
                    revision = self.etcd.writer_revision()
                else:
                    n = int(key.rsplit("/w", 1)[1])
                    revision = writer.put(key, self.registration(n, **json.loads(value or "{}")))
                self.done += 1
            self.seconds = time.monotonic() - started
            env.wait_until(
                lambda: self.lb.applied_revision() >= revision, f"lbsync to apply r{revision}"
            )
            self.applied_at = time.time()
        except Exception as exc:  # reported with the figures, never lost
            self.error = repr(exc)
        finally:
            writer.close()


def run_mode(runtime: bool, changes: int, seconds: int, every: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-haproxy-{'rt' if runtime else 'rl'}-"))
    etcd = env.Etcd(root)
    backends = env.Nginx(root / "backends")
    haproxy = Haproxy(root / "haproxy")
    lb: HaproxyLbsync | None = None
    try:
        etcd.start()
        ports = {name: env.free_port() for name in BACKENDS}
        backends.configure_backends(ports)
        backends.start()
        listen = env.free_port()

        def registration(n: int, **extra: object) -> str:
            value = {"host": "127.0.0.1", "port": ports[BACKENDS[n]], "weight": 1, **extra}
            return json.dumps(value)

        keys = {env.instance_key(SERVICE, f"w{n}"): registration(n) for n in range(4)}
        keys[f"{env.PREFIX}/services/{SERVICE}/settings"] = json.dumps(
            {"listen": f"127.0.0.1:{listen}"}
        )
        haproxy.bootstrap(listen)
        etcd.bulk_put(keys)
        lb = HaproxyLbsync(root, etcd.endpoint, haproxy, runtime)
        lb.start()
        lb.wait_applied(etcd.writer_revision(), timeout=60)
        env.wait_until(
            lambda: {env.get_body(listen) for _ in range(8)} == set(BACKENDS),
            "HAProxy to serve all four backends",
        )
        before = haproxy.generation()
        mark = lb.count()

        changer = _Changer(etcd, lb, registration, count=changes, every=every, mark=mark)
        thread = threading.Thread(target=changer.run, name="changes", daemon=True)
        argv = ["wrk", "-t2", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{listen}/"]
        started = time.time()
        wrk_process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        thread.start()
        output, _ = wrk_process.communicate(timeout=seconds + 30)
        ended = time.time()
        thread.join(30)
        after = haproxy.generation()
        events = lb.events[mark:]
        counts = {
            kind: sum(1 for e in events if e.get("event") == kind)
            for kind in ("apply.runtime", "apply.reloaded", "apply.failed", "apply.rolled_back")
        }
        rounds = [
            e["ms"]
            for e in events
            if e.get("event") in ("apply.runtime", "apply.reloaded")
            and isinstance(e.get("ms"), dict)
        ]
        stages = sorted({stage for ms in rounds for stage in ms})
        applied_ms = [float(sum(ms.values())) for ms in rounds]
        stats = parse_wrk(output)
        reloads = counts["apply.reloaded"]
        return {
            "runtime": runtime,
            "changes": changer.done,
            "changes_error": changer.error,
            "changes_seconds": round(changer.seconds, 2),
            "all_applied_under_load": 0 < changer.applied_at <= ended,
            "rounds": counts["apply.runtime"] + counts["apply.reloaded"],
            "wrk_seconds": round(ended - started, 2),
            **stats,
            "apply_runtime": counts["apply.runtime"],
            "apply_reloaded": counts["apply.reloaded"],
            "apply_failed": counts["apply.failed"] + counts["apply.rolled_back"],
            "failed_per_reload": stats["failed"] / reloads if reloads else 0.0,
            "haproxy_reload_events": sum(1 for e in events if e.get("event") == "haproxy.reload"),
            "master_changed": before["master"] != after["master"],
            "workers_changed": before["workers"] != after["workers"],
            "haproxy_loads": after["loads"] - before["loads"],
            "before": before,
            "after": after,
            "apply_ms": report.summary(applied_ms),
            "stage_ms_p50": {s: report.pct([ms.get(s, 0.0) for ms in rounds], 50) for s in stages},
            "wrk_output": output,
        }
    finally:
        for step in (lb.stop if lb else None, haproxy.stop, backends.stop, etcd.stop):
            if step is not None:
                with contextlib.suppress(Exception):
                    step()
        shutil.rmtree(root, ignore_errors=True)


# --- per-change cost with big backends (in-process pipeline, real HAProxy) ---------------


def in_process_pipeline(haproxy: Haproxy, state_dir: Path) -> TargetPipeline:
    """lbsync's own ``TargetPipeline`` for ``haproxy`` in runtime mode, with the stock
    template: how the in-process benches (this one, ``bench reconcile``) drive it."""
    from lbsync.config import HaproxyTarget
    from lbsync.drivers.haproxy.driver import HaproxyDriver
    from lbsync.pipeline import TargetPipeline
    from lbsync.render import Renderer

    target = HaproxyTarget.model_validate(
        {
            "name": "haproxy",
            "driver": "haproxy",
            "template": [{"src": TEMPLATE, "dest": haproxy.config}],
            "config": haproxy.config,
            "pid_file": haproxy.pid_file,
            "binary": HAPROXY,
            "master_socket": haproxy.master_socket,
            "admin_socket": haproxy.admin_socket,
            "state_file": haproxy.state_file,
        }
    )
    return TargetPipeline(target, HaproxyDriver(target), Renderer(), state_dir)


def change_cost(services: int, per_service: int, changes: int) -> dict[str, Any]:
    """One instance's weight changes per round, ``changes`` rounds, through lbsync's own
    ``TargetPipeline`` (render → stage + ``haproxy -c`` → runtime API → swap) against a
    HAProxy started on the same render. Wall ms per stage, and lbsync's CPU per round
    (``process_time``: ``haproxy -c`` runs in a child and is not in it)."""
    from lbsync.catalog import Catalog
    from lbsync.model import KeyEvent, KeyValue, SourceEvents

    root = Path(tempfile.mkdtemp(prefix="lbsync-bench-haproxy-cost-"))
    haproxy = Haproxy(root / "haproxy")

    def key(s: int, i: int) -> str:
        return env.instance_key(f"svc{s:03d}", f"i{i:05d}")

    def value(s: int, i: int, weight: int = 1) -> bytes:
        host = f"10.{s % 250}.{i // 250 % 250}.{1 + i % 250}"
        return json.dumps({"host": host, "port": 8000 + s, "weight": weight}).encode()

    try:
        pipeline = in_process_pipeline(haproxy, root / "state")
        catalog = Catalog(env.PREFIX)
        catalog.load(
            (
                KeyValue(key=key(s, i), value=value(s, i), mod_revision=1)
                for s in range(services)
                for i in range(per_service)
            ),
            1,
        )
        first = catalog.snapshot()
        haproxy.config.write_bytes(pipeline.plan(first).rendered[haproxy.config])
        haproxy.start()
        pipeline.applied = first
        rounds: list[dict[str, float]] = []
        for n in range(changes):
            s, i = n % services, n * 7 % per_service
            event = KeyEvent(
                kind="put", key=key(s, i), value=value(s, i, 2 + n % 5), mod_revision=n + 2
            )
            catalog.apply(SourceEvents(revision=n + 2, events=(event,)))
            snapshot = catalog.snapshot()
            cpu, wall = time.process_time(), time.perf_counter()
            outcome = pipeline.apply(snapshot)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if outcome.action != "runtime":
                raise env.BenchError(f"round {n}: {outcome.action} ({outcome.error})")
            rounds.append({**outcome.durations, "total": wall * 1000, "cpu": cpu * 1000})
        stages = list(rounds[0])
        return {
            "services": services,
            "per_service": per_service,
            "slots": len(haproxy_servers(haproxy, "svc000")),
            "changes": changes,
            "p50_ms": {s: report.pct([r[s] for r in rounds], 50) for s in stages},
        }
    finally:
        haproxy.stop()
        shutil.rmtree(root, ignore_errors=True)


def haproxy_servers(haproxy: Haproxy, backend: str) -> list[Any]:
    from lbsync.drivers.haproxy.master import Cli
    from lbsync.drivers.haproxy.state import servers_state

    answer = Cli(haproxy.admin_socket, target="bench").query(f"show servers state {backend}")
    return servers_state(answer)


def cost_main(changes: int) -> dict[str, Any]:
    from lbsync.logging import configure_logging

    configure_logging("warning")
    shapes = [(1, 10_000), (100, 100)]
    results = [change_cost(s, n, changes) for s, n in shapes]
    stages = ["render", "validate", "runtime", "swap", "settle", "total", "cpu"]
    report.table(
        f"HAProxy runtime mode: one membership change per round, p50 of {changes} rounds (ms)",
        ["instances", "slots/backend", *stages],
        [
            [
                f"{r['services']} x {r['per_service']:,}",
                r["slots"],
                *(r["p50_ms"].get(s, 0.0) for s in stages),
            ]
            for r in results
        ],
    )
    data = {"machine": report.machine(), "changes": changes, "shapes": results}
    report.save("haproxy_change_cost", data)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench haproxy_runtime")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration (at most 10)")
    parser.add_argument("--every", type=float, default=0.08, help="seconds between changes")
    parser.add_argument(
        "--cost",
        action="store_true",
        help="instead: lbsync's cost per runtime change at 1 x 10,000 and 100 x 100 instances",
    )
    args = parser.parse_args(argv)
    if args.cost:
        return cost_main(30)
    seconds = min(args.seconds, 10)
    if 0.5 + args.changes * args.every > seconds - 0.5:
        parser.error("the changes would not all be written while wrk runs: lower --every")
    runs = {
        "runtime": run_mode(True, args.changes, seconds, args.every),
        "reload": run_mode(False, args.changes, seconds, args.every),
    }
    rows = [
        [name, r["changes"], r["rounds"], r["apply_runtime"], r["apply_reloaded"],
         r["haproxy_reload_events"],
         "yes" if r["master_changed"] else "no", "yes" if r["workers_changed"] else "no",
         r["requests"], r["connect"], r["read"], r["write"], r["timeout"], r["non2xx"],
         r["failed"], r["failed_per_reload"], r["apply_ms"]["p50"]]
        for name, r in runs.items()
    ]  # fmt: skip
    report.table(
        f"HAProxy under wrk -t2 -c8 -d{seconds}s (keep-alive), {args.changes} membership changes",
        ["mode", "changes", "rounds", "runtime", "reloaded", "reloads", "master Δ", "workers Δ",
         "requests", "connect", "read", "write", "timeout", "non-2xx", "failed", "failed/reload",
         "apply p50 ms"],
        rows,
    )  # fmt: skip
    for name, r in runs.items():
        stages = ", ".join(f"{s} {v:.1f}" for s, v in r["stage_ms_p50"].items())
        print(f"  {name}: p50 ms per round: {stages}")
    for name, r in runs.items():
        if r["changes"] < args.changes or r["changes_error"]:
            print(f"  {name}: only {r['changes']} changes made ({r['changes_error']})")
        if not r["all_applied_under_load"]:
            print(f"  {name}: the last change was applied after wrk had stopped")
    target = runs["runtime"]
    met = target["apply_reloaded"] == 0 and not target["workers_changed"] and not target["failed"]
    print(f"  target (0 reloads, 0 failed requests in runtime mode): {'met' if met else 'NOT MET'}")
    data = {"machine": report.machine(), "args": vars(args), **runs}
    report.save("haproxy_runtime", data)
    return data


if __name__ == "__main__":  # until it is listed in bench/__main__.py's BENCHES
    import sys

    main(sys.argv[1:])
