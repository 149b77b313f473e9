"""Live demo: a private etcd, nginx and three backends on loopback, with lbsync moving traffic.

Run through ``scripts/demo.sh`` (which installs everything first). Every process is private
to ./.demo and stopped at the end, whatever happens.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
BIN = Path(sys.executable).parent
LBSYNC = [str(BIN / "lbsync")]
BACKENDS = ("alpha", "bravo", "charlie")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}; logs are in {DEMO}")


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"{self.server.name}\n".encode()  # type: ignore[attr-defined]
        self.send_response(500 if self.server.failing else 200)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_backend(name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    server.name = name  # type: ignore[attr-defined]
    server.failing = False  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def traffic(port: int, requests: int = 30) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(requests):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read().decode().strip()
            seen[body if resp.status == 200 else f"HTTP {resp.status}"] += 1
        except OSError as exc:
            seen[f"error: {exc.__class__.__name__}"] += 1
        finally:
            conn.close()
    return seen


def show(counts: collections.Counter[str]) -> None:
    for name, count in sorted(counts.items()):
        print(f"   {name:<10} {'#' * count} {count}")


def served(port: int, expected: set[str]) -> bool:
    return set(traffic(port, 12)) == expected


NGINX_CONF = """\
daemon on;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    include {d}/conf.d/*.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://web;
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""

LBSYNC_TOML = """\
state_dir = "{demo}/state"

[etcd]
endpoints = ["http://127.0.0.1:{etcd_port}"]
prefix = "/lbsync"

[wait]
min = "50ms"
max = "1s"

[[target]]
name = "nginx"
driver = "nginx"
config = "{d}/nginx.conf"
pid_file = "{d}/nginx.pid"
prefix = "{d}"
error_log = "{d}/error.log"

  [[target.template]]
  src = "{root}/templates/nginx/upstreams.conf.j2"
  dest = "{d}/conf.d/lbsync-upstreams.conf"

[probe]
name = "demo-prober"
lease_ttl = "3s"

  [probe.check]
  path = "/healthz"
  interval = "0.5s"
  timeout = "0.5s"
  rise = 2
  fall = 2
"""


class Demo:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.registrations: dict[str, subprocess.Popen[bytes]] = {}
        self.backends = {name: start_backend(name) for name in BACKENDS}
        self.etcd_port = free_port()
        self.web_port = free_port()
        self.nginx_dir = DEMO / "nginx"
        self.config = DEMO / "lbsync.toml"

    def spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = (DEMO / log).open("ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_etcd(self) -> None:
        peer = free_port()
        self.spawn(
            [
                "etcd",
                "--name=demo",
                f"--data-dir={DEMO / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=demo=http://127.0.0.1:{peer}",
                "--log-level=error",
            ],
            "etcd.log",
        )
        wait_until(lambda: self.etcdctl("endpoint", "health").returncode == 0, "etcd")

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ETCDCTL_API": "3"}
        argv = ["etcdctl", f"--endpoints=127.0.0.1:{self.etcd_port}", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)

    def start_nginx(self) -> None:
        d = self.nginx_dir
        for sub in ("conf.d", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=self.web_port))
        # Before lbsync's first render, nginx needs *an* upstream named web.
        (d / "conf.d/lbsync-upstreams.conf").write_text(
            "upstream web { server 127.0.0.1:1 down; }\n"
        )
        subprocess.run(["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], check=True)
        wait_until((d / "nginx.pid").exists, "nginx")

    def start_lbsync(self) -> None:
        self.config.write_text(
            LBSYNC_TOML.format(demo=DEMO, etcd_port=self.etcd_port, d=self.nginx_dir, root=ROOT)
        )
        self.spawn([*LBSYNC, "run", "-c", str(self.config), "--log-format", "json"], "lbsync.log")

    def start_probe(self) -> None:
        self.spawn([*LBSYNC, "probe", "-c", str(self.config), "--log-format", "json"], "probe.log")

    def fail(self, name: str, failing: bool) -> None:
        self.backends[name].failing = failing  # type: ignore[attr-defined]

    def register(self, name: str) -> None:
        port = self.backends[name].server_address[1]
        argv = [*LBSYNC, "register", "-c", str(self.config), "--service", "web", "--id", name]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--ttl", "3s"]
        self.registrations[name] = self.spawn(argv, f"register-{name}.log")

    def mark(self, name: str, state: str, reason: str) -> None:
        argv = [*LBSYNC, "mark", "-c", str(self.config), "web", name, state, "--reason", reason]
        subprocess.run(argv, check=True, capture_output=True)

    def step(self, text: str, expected: set[str], action: Callable[[], None]) -> None:
        say(text)
        started = time.monotonic()
        action()
        wait_until(lambda: served(self.web_port, expected), f"traffic to {sorted(expected)}")
        print(f"   traffic moved in {time.monotonic() - started:.2f}s; 30 requests now go to:")
        show(traffic(self.web_port))

    def stop(self) -> None:
        subprocess.run(
            [
                "nginx",
                "-p",
                str(self.nginx_dir),
                "-c",
                str(self.nginx_dir / "nginx.conf"),
                "-s",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for server in self.backends.values():
            server.shutdown()


@contextlib.contextmanager
def demo() -> Iterator[Demo]:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    d = Demo()
    try:
        yield d
    finally:
        d.stop()


def main() -> None:
    with demo() as d:
        say(
            f"starting etcd (127.0.0.1:{d.etcd_port}), nginx (127.0.0.1:{d.web_port}), "
            "lbsync and lbsync probe"
        )
        d.start_etcd()
        d.start_nginx()
        d.start_lbsync()
        d.start_probe()
        ports = ", ".join(f"{n}=:{s.server_address[1]}" for n, s in d.backends.items())
        print(f"   backends: {ports}")
        print("   nginx starts with an empty upstream: every request gets a 502")
        show(traffic(d.web_port))
        d.step(
            "alpha registers itself (lbsync register, 3s lease)",
            {"alpha"},
            lambda: d.register("alpha"),
        )
        d.step(
            "bravo and charlie register",
            set(BACKENDS),
            lambda: (d.register("bravo"), d.register("charlie")),
        )
        d.step(
            "the monitor marks bravo down (lbsync mark web bravo down)",
            {"alpha", "charlie"},
            lambda: d.mark("bravo", "down", "health check failed"),
        )
        d.step(
            "charlie's process dies (SIGKILL): its lease expires, it drops out",
            {"alpha"},
            d.registrations["charlie"].kill,
        )
        d.step(
            "bravo recovers (lbsync mark web bravo up)",
            {"alpha", "bravo"},
            lambda: d.mark("bravo", "up", ""),
        )
        d.step(
            "alpha starts answering HTTP 500: lbsync probe (fall 2 x 0.5s) takes it out",
            {"bravo"},
            lambda: d.fail("alpha", True),
        )
        d.step(
            "alpha recovers: the prober (rise 2) brings it back",
            {"alpha", "bravo"},
            lambda: d.fail("alpha", False),
        )
        say("hostile value in etcd: '127.0.0.1:80; include /etc/passwd'")
        d.etcdctl("put", "/lbsync/services/web/instances/evil", "127.0.0.1:80; include /etc/passwd")
        wait_until(lambda: "value.rejected" in (DEMO / "lbsync.log").read_text(), "rejection")
        print(
            "   lbsync rejected it (see value.rejected in .demo/lbsync.log); traffic is unchanged:"
        )
        show(traffic(d.web_port))
        say("lbsync render --dry-run: what would change now (exit 0 = nothing)")
        dry = subprocess.run(
            [*LBSYNC, "render", "--dry-run", "-c", str(d.config)],
            capture_output=True,
            text=True,
            check=False,
        )
        print(f"   {dry.stdout.strip()}\n   exit code {dry.returncode}")
        say("done: every process is stopped; logs are in .demo/")


if __name__ == "__main__":
    main()
