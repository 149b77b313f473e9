"""Private processes on loopback for the benches: etcd, a front nginx, a backend nginx,
``lbsync run`` as a subprocess (its JSON log parsed as it is written), and a byte-counting
TCP relay. Everything lives in one temp directory and is stopped on exit, whatever happens.

Every wait here is bounded: a bench that cannot reach a state raises ``BenchError``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "templates" / "nginx" / "upstreams.conf.j2"
PREFIX = "/lbsync"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# etcd's data goes to tmpfs when there is one: the benches start their clock when a put is
# acknowledged, so etcd's own fsync is not what they measure, and a disk-bound etcd would
# make the 1,000-write burst a test of the disk. lbsync's files stay on the real disk.
ETCD_DATA_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


class BenchError(RuntimeError):
    """A bench could not reach a state it needs (with what it saw)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


# --- keys ------------------------------------------------------------------------------


def instance_key(service: str, iid: str) -> str:
    return f"{PREFIX}/services/{service}/instances/{iid}"


def health_key(service: str, iid: str) -> str:
    return f"{PREFIX}/services/{service}/health/{iid}"


def instance_value(host: str, port: int, weight: int = 1) -> str:
    return json.dumps({"host": host, "port": port, "weight": weight, "meta": {"zone": "a"}})


def filler(count: int, services: int | None = None) -> dict[str, str]:
    """``count`` instances over ``services`` services (default: 100 per service).

    Hosts are IP literals in 10/8 (never contacted: no traffic goes to these upstreams;
    ``nginx -t`` only parses them), so 10,000 = ``svc000..svc099`` x ``i000..i099``.
    """
    if count <= 0:
        return {}
    services = services or max(1, (count + 99) // 100)
    keys = {}
    for n in range(count):
        s, i = n % services, n // services
        host = f"10.{s % 250}.{i // 250}.{1 + i % 250}"
        keys[instance_key(f"svc{s:03d}", f"i{i:03d}")] = instance_value(host, 8000 + s)
    return keys


# --- etcd ------------------------------------------------------------------------------


class Etcd:
    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra_args = extra_args
        base = ETCD_DATA_ROOT or workdir
        self.data_dir = Path(tempfile.mkdtemp(prefix="lbsync-bench-etcd-", dir=base))
        self.port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD,
            "--name=bench",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            "--max-txn-ops=1000",  # bulk preload in transactions of 1,000 puts
            "--log-level=error",
            *self.extra_args,
        ]
        with (self.workdir / "etcd.log").open("ab") as log:  # etcd keeps its own copy
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, "etcd to be healthy")

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"etcd exited; see {self.workdir / 'etcd.log'}")
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError):
            return False

    @property
    def client(self) -> Any:
        """A plain pyetcd client for bulk loads and ground-truth reads (not lbsync's code)."""
        if self._client is None:
            import pyetcd

            self._client = pyetcd.client("127.0.0.1", self.port, timeout=30)
        return self._client

    def writer(self) -> Any:
        """lbsync's own ``EtcdWriter``: what the latency benches time a put with."""
        from lbsync.config import EtcdSettings
        from lbsync.source.writer import EtcdWriter

        return EtcdWriter(EtcdSettings(endpoints=[self.endpoint], prefix=PREFIX))

    def bulk_put(self, items: dict[str, str], batch: int = 1000) -> None:
        """Put every key, in transactions of ``batch`` puts, four in flight."""
        client = self.client
        pairs = list(items.items())
        chunks = [pairs[i : i + batch] for i in range(0, len(pairs), batch)]

        def one(chunk: list[tuple[str, str]]) -> None:
            ops = [client.transactions.put(k, v) for k, v in chunk]
            client.transaction(compare=[], success=ops, failure=[])

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, chunks))

    def writer_revision(self) -> int:
        """The store's current revision."""
        return int(self.client.get_response(b"\0", count_only=True).header.revision)

    def dump(self, prefix: str = PREFIX) -> dict[str, bytes]:
        return {meta.key.decode(): bytes(value) for value, meta in self.client.get_prefix(prefix)}

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --- nginx -----------------------------------------------------------------------------

_NGINX_HEAD = """\
daemon on;
master_process on;
worker_processes 1;
{user}pid {d}/nginx.pid;
error_log {d}/error.log {level};
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
"""


class Nginx:
    """One nginx master laid out like a packaged one: ``<dir>/etc`` holds the config (what
    lbsync stages: Debian's stock files, our nginx.conf, ``conf.d/``), ``<dir>/run`` the
    pid file, logs and temp dirs (nginx's ``-p`` prefix)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / "run"
        self.etc = directory / "etc"
        self.conf = self.etc / "nginx.conf"
        self.conf_d = self.etc / "conf.d"
        self.upstreams = self.conf_d / "upstreams.conf"
        self.pid_file = self.dir / "nginx.pid"
        self.error_log = self.dir / "error.log"
        self.started = False

    def _head(self, level: str = "notice") -> str:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.conf_d.mkdir(parents=True, exist_ok=True)
        _copy_stock_files(self.etc)
        user = "user root;\n" if os.geteuid() == 0 else ""
        return _NGINX_HEAD.format(user=user, d=self.dir, level=level)

    def configure_backends(self, names: dict[str, int]) -> None:
        """One ``server`` per name on its port (all addresses), answering ``<name>\\n``."""
        blocks = "".join(
            f"    server {{ listen {port}; keepalive_requests 100000;\n"
            f'        location / {{ return 200 "{name}\\n"; }} }}\n'
            for name, port in names.items()
        )
        self.conf.write_text(self._head("error") + blocks + "}\n")

    def configure_front(self, sites: dict[str, int]) -> None:
        """``include conf.d/*.conf`` (lbsync writes upstreams.conf there) and one
        keep-alive proxy ``server`` per service in ``sites`` (service → listen port).

        Until lbsync's first render, a placeholder upstream per site service exists.
        """
        servers = "".join(
            f"    server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;\n"
            f"        location / {{ proxy_pass http://{svc}; proxy_http_version 1.1;\n"
            f'            proxy_set_header Connection ""; proxy_next_upstream error timeout; }}\n'
            f"    }}\n"
            for svc, port in sites.items()
        )
        head = self._head()
        includes = f"    include {self.etc}/mime.types;\n    include {self.conf_d}/*.conf;\n"
        self.conf.write_text(f"{head}{includes}{servers}}}\n")
        self.write_placeholder(sites)

    def write_placeholder(self, services: Any) -> None:
        self.upstreams.write_text(
            "".join(f"upstream {svc} {{ server 127.0.0.1:1 down; }}\n" for svc in services)
        )

    def argv(self, *extra: str) -> list[str]:
        return [NGINX, "-p", str(self.dir), "-c", str(self.conf), *extra]

    def start(self) -> None:
        done = subprocess.run(self.argv(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"nginx did not start: {done.stderr.strip()}")
        self.started = True
        wait_until(self.master, f"nginx master in {self.dir}")

    def reload(self) -> None:
        """SIGHUP through ``nginx -s reload`` (for resetting between runs, not measured)."""
        subprocess.run(self.argv("-s", "reload"), capture_output=True, check=True)
        time.sleep(0.3)

    def master(self) -> psutil.Process | None:
        try:
            proc = psutil.Process(int(self.pid_file.read_text().strip()))
            return proc if proc.status() != psutil.STATUS_ZOMBIE else None
        except (OSError, ValueError, psutil.Error):
            return None

    def workers(self) -> list[psutil.Process]:
        master = self.master()
        return [] if master is None else master.children()

    def stop(self) -> None:
        if not self.started:
            return
        master = self.master()
        procs = [] if master is None else [master, *master.children()]
        subprocess.run(self.argv("-s", "quit"), capture_output=True, check=False)
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


_STOCK = Path("/etc/nginx")
_STOCK_FILES = (
    "mime.types",
    "fastcgi.conf",
    "fastcgi_params",
    "proxy_params",
    "scgi_params",
    "uwsgi_params",
    "koi-utf",
    "koi-win",
    "win-utf",
    "snippets",
    "sites-available",
)


def _copy_stock_files(etc: Path) -> None:
    """Debian's files next to nginx.conf, so staging mirrors a realistic /etc/nginx."""
    for name in _STOCK_FILES:
        src, dst = _STOCK / name, etc / name
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
        elif src.is_file():
            shutil.copyfile(src, dst)


def get_body(port: int, timeout: float = 2.0) -> str | None:
    """One request on a fresh connection; the body of a 200, else None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace").strip()
        return body if resp.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


# --- lbsync ----------------------------------------------------------------------------

_LBSYNC_TOML = """\
state_dir = "{state}"

[etcd]
endpoints = ["{endpoint}"]
prefix = "{prefix}"

[wait]
min = "{wait_min}"
max = "{wait_max}"

[[target]]
name = "nginx"
driver = "nginx"
binary = "{nginx}"
config = "{conf}"
pid_file = "{pid}"
prefix = "{d}"
error_log = "{err}"

  [[target.template]]
  src = "{template}"
  dest = "{dest}"
"""


def parse_ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


class Lbsync:
    """``lbsync run --log-format json`` as a subprocess; its log events, parsed, in order.

    A reader thread parses each stderr line as it arrives (and keeps the raw text in
    ``lbsync.log``); ``wait_event`` blocks on a condition, so the bench thread uses no CPU
    while lbsync works.
    """

    def __init__(
        self,
        workdir: Path,
        etcd_endpoint: str,
        nginx: Nginx,
        *,
        wait_min: str = "0",
        wait_max: str = "0",
        config_text: str | None = None,
        http_listen: str | None = None,
    ) -> None:
        """``config_text``: this lbsync.toml instead of the nginx one (``{state}``,
        ``{endpoint}`` and ``{prefix}`` filled in); ``http_listen``: serve ``[http]`` there."""
        self.workdir = workdir
        self.config = workdir / "lbsync.toml"
        self.state = workdir / "state"
        self.config.write_text(
            (config_text or _LBSYNC_TOML).format(
                state=self.state,
                endpoint=etcd_endpoint,
                prefix=PREFIX,
                wait_min=wait_min,
                wait_max=wait_max,
                nginx=NGINX,
                conf=nginx.conf,
                pid=nginx.pid_file,
                d=nginx.dir,
                err=nginx.error_log,
                template=TEMPLATE,
                dest=nginx.upstreams,
            )
            + (f'\n[http]\nlisten = "{http_listen}"\n' if http_listen else "")
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "lbsync", "run", "-c", str(self.config)]
        argv += ["--log-format", "json"]
        self.started_at = time.time()
        # LBSYNC_* variables override lbsync's settings: none of the caller's leak in.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LBSYNC_")}
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=clean,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self.process,), name="lbsync-log", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        """Until this process's stderr closes (a restart starts another reader)."""
        assert process.stderr is not None
        with process.stderr, (self.workdir / "lbsync.log").open("ab") as raw:
            for line in process.stderr:
                raw.write(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(
        self,
        match: Callable[[dict[str, Any]], bool],
        *,
        after: int = 0,
        timeout: float = 30.0,
        what: str = "an lbsync event",
    ) -> int:
        """Index of the first event at or after ``after`` that matches; bounded wait."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(after, len(self.events)):
                    if match(self.events[index]):
                        return index
                after = len(self.events)
                if self.process is not None and self.process.poll() is not None:
                    raise BenchError(f"lbsync exited ({self.process.returncode}) before {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [e.get("event") for e in self.events[-8:]]
                    raise BenchError(f"timed out after {timeout:g}s waiting for {what}: {tail}")
                self._cond.wait(min(left, 0.5))

    def wait_applied(self, revision: int = 0, *, after: int = 0, timeout: float = 60.0) -> int:
        """The first ``apply.*`` event for ``revision`` or later (any outcome)."""

        def applied(e: dict[str, Any]) -> bool:
            return str(e.get("event", "")).startswith("apply.") and e.get("revision", 0) >= revision

        return self.wait_event(applied, after=after, timeout=timeout, what=f"apply of r{revision}")

    def count(self) -> int:
        with self._cond:
            return len(self.events)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)


# --- a byte-counting relay -------------------------------------------------------------


class CountingRelay:
    """A TCP relay (127.0.0.1:port → target) counting the bytes in each direction.

    Put between lbsync and etcd, ``down`` is exactly what lbsync received from etcd on the
    wire (gRPC and HTTP/2 framing included, TLS-free on loopback): the direct measure of
    "bytes read from etcd per change".
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.down = 0
        self.up = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.down += len(data)
                    else:
                        self.up += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


# --- one bench's world -----------------------------------------------------------------


class World:
    """etcd + backend nginx (names on ports) + front nginx (+ lbsync when asked)."""

    def __init__(self, root: Path, etcd_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.etcd = Etcd(root, etcd_args)
        self.backends = Nginx(root / "backends")
        self.front = Nginx(root / "front")
        self.backend_ports: dict[str, int] = {}
        self.site_ports: dict[str, int] = {}
        self.lbsync: Lbsync | None = None
        self.relay: CountingRelay | None = None

    def start(
        self, backend_names: tuple[str, ...] = ("A", "B"), sites: tuple[str, ...] = ()
    ) -> None:
        self.etcd.start()
        self.backend_ports = {name: free_port() for name in backend_names}
        self.backends.configure_backends(self.backend_ports)
        self.backends.start()
        self.site_ports = {svc: free_port() for svc in sites}
        self.front.configure_front(self.site_ports)
        self.front.start()

    def start_lbsync(self, *, relay: bool = False, **waits: str) -> Lbsync:
        endpoint = self.etcd.endpoint
        if relay:
            self.relay = CountingRelay(self.etcd.port)
            endpoint = self.relay.endpoint
        self.lbsync = Lbsync(self.root, endpoint, self.front, **waits)
        self.lbsync.start()
        return self.lbsync

    def stop(self) -> None:
        for step in (
            self.lbsync.stop if self.lbsync else None,
            self.relay.close if self.relay else None,
            self.front.stop,
            self.backends.stop,
            self.etcd.stop,
        ):
            if step is not None:
                with contextlib.suppress(Exception):
                    step()


@contextlib.contextmanager
def world(
    name: str, base: Path | None = None, etcd_args: tuple[str, ...] = (), **start: Any
) -> Iterator[World]:
    """A started world in a fresh directory under ``base`` (default: the temp dir, /tmp)."""
    root = Path(tempfile.mkdtemp(prefix=f"lbsync-bench-{name}-", dir=base))
    w = World(root, etcd_args)
    try:
        w.start(**start)
        yield w
    finally:
        w.stop()
        if os.environ.get("BENCH_KEEP"):
            print(f"  (kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
