"""Real etcd servers on 127.0.0.1 for integration tests, etcd's gRPC proxy, a cuttable TCP
proxy, throw-away TLS certificates, and a recorder that folds source messages into the
key → value state they describe.

Each process gets a temp dir and free ports; it can be stopped (SIGTERM), killed
(SIGKILL), paused (SIGSTOP), resumed and started again on the same data dir and ports.
Teardown always kills whatever is left. Start-up failures carry the tail of the log.

A server can serve its clients over TLS with client-certificate checks (``tls=``, files
from ``TlsFiles.generate``) and can have user/password auth switched on
(``enable_auth``); ``etcdctl`` then uses the certificates and the root user itself.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbsync.config import EtcdSettings
from lbsync.model import SourceEvents, SourceMessage, SourceReset, SourceStatus
from lbsync.source import EtcdSource, EtcdWriter
from lbsync.source.gateway import close_half_made_sockets
from tests.harness.net import free_port, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
ROOT_PASSWORD = "root-test-password"


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def generate(cls, directory: Path, client_cn: str = "lbsync-client") -> TlsFiles:
        """Make the files with ``openssl`` (P-256 keys, valid for two days) in ``directory``.

        The client certificate's CN names no etcd user, so with auth enabled a call
        without a token is refused rather than let in as that user.
        """
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(
            ca=directory / "ca.crt",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
        )
        ca_key = directory / "ca.key"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl(
            "req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca, "-days", "2",
            "-subj", "/CN=lbsync-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        leaves = [
            (files.server_cert, files.server_key, "etcd-test",
             "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth"),
            (files.client_cert, files.client_key, client_cn, "extendedKeyUsage=clientAuth"),
        ]  # fmt: skip
        for cert, key, cn, extensions in leaves:
            csr, ext = cert.with_suffix(".csr"), cert.with_suffix(".ext")
            ext.write_text(f"keyUsage=critical,digitalSignature\n{extensions}\n")
            _openssl("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
            _openssl(
                "x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key,
                "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext,
            )  # fmt: skip
        return files

    def client_settings(self) -> dict[str, str]:
        """The ``[etcd]`` settings that make lbsync use these files."""
        return {
            "ca_file": str(self.ca),
            "cert_file": str(self.client_cert),
            "key_file": str(self.client_key),
        }

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"openssl {args[0]} failed: {result.stderr.strip()}")


class _Process:
    """A child process with a log file, and the stop/kill/pause moves tests make on it."""

    name: str
    workdir: Path
    log_path: Path

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def command(self) -> list[str]:
        raise NotImplementedError

    def _healthy(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the process without waiting for it to be healthy (clusters start all first)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._paused = False

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        try:
            wait_for(self._probe_health, timeout=timeout, what=f"{self.name} to be healthy")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
            ) from None

    def _probe_health(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise AssertionError(
                f"{self.name} exited with {code}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
            )
        return self._healthy()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not go in time."""
        if not self.running:
            return
        assert self.process is not None
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._paused = False

    def pause(self) -> None:
        assert self.process is not None
        assert self.running
        os.kill(self.process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._paused and self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_records(self) -> list[dict[str, object]]:
        """The JSON (zap) lines of the log so far; other lines are skipped."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


def _get_json(url: str, context: ssl.SSLContext | None = None) -> object:
    with urllib.request.urlopen(url, timeout=1, context=context) as resp:
        return json.load(resp)


class EtcdServer(_Process):
    """One etcd member. Not started until ``start()``; ``EtcdCluster`` wires several.

    ``log_level="info"`` keeps etcd's info lines (e.g. "deleted a simple token") for tests
    that wait on them; ``auth_token_ttl`` shortens how long an unused auth token lives.
    """

    def __init__(
        self,
        workdir: Path,
        name: str = "etcd0",
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        tls: TlsFiles | None = None,
        auth_token_ttl: int | None = None,
        log_level: str = "error",
    ) -> None:
        super().__init__()
        self.name = name
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "etcd.log"
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.tls = tls
        self.auth_token_ttl = auth_token_ttl
        self.log_level = log_level
        self.auth_enabled = False

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self) -> list[str]:
        command = [
            ETCD,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=lbsync-test",
            "--logger=zap",
            f"--log-level={self.log_level}",
        ]
        if self.tls is not None:
            command += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        if self.auth_token_ttl is not None:
            command.append(f"--auth-token-ttl={self.auth_token_ttl}")
        return command

    def _healthy(self) -> bool:
        context = self.tls.ssl_context() if self.tls else None
        try:
            return bool(_get_json(f"{self.endpoint}/health", context) == {"health": "true"})
        except urllib.error.HTTPError as exc:  # e.g. a 503 while starting: holds the socket
            exc.close()
            return False
        except (OSError, ValueError) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", exc)  # urlopen's URLError wraps the socket's error
            if isinstance(reason, BaseException):
                close_half_made_sockets(reason)  # a reset mid-handshake: see wrap_tls
            return False

    def enable_auth(self, user: str, password: str, prefix: str) -> None:
        """Switch auth on: ``root`` (for etcdctl) and ``user`` with read-write on ``prefix``."""
        role = f"{user}-rw"
        self.etcdctl("user", "add", f"root:{ROOT_PASSWORD}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("role", "add", role)
        self.etcdctl("role", "grant-permission", "--prefix=true", role, "readwrite", prefix)
        self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")
        self.auth_enabled = True

    def metric(self, name: str) -> float:
        """One unlabelled value from etcd's /metrics, e.g. ``etcd_debugging_mvcc_watcher_total``
        (watchers the server holds: what a gRPC proxy's coalescing saves)."""
        context = self.tls.ssl_context() if self.tls else None
        with urllib.request.urlopen(f"{self.endpoint}/metrics", timeout=2, context=context) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name} in {self.name}'s /metrics")

    def deleted_tokens(self, user: str) -> int:
        """How many of ``user``'s auth tokens etcd has expired so far (needs log level info)."""
        return sum(
            1
            for r in self.log_records()
            if r.get("msg") == "deleted a simple token" and r.get("user-name") == user
        )

    # --- ground truth, independent of lbsync's own client ---------------------------------

    def etcdctl(self, *args: str | bytes) -> str:
        """Run etcdctl against this member (bytes arguments pass raw, e.g. non-UTF-8 keys)."""
        options = [f"--endpoints={self.endpoint}", "--command-timeout=10s"]
        if self.tls is not None:
            options += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if self.auth_enabled:
            options.append(f"--user=root:{ROOT_PASSWORD}")
        result = subprocess.run(
            [ETCDCTL, *options, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if result.returncode != 0:
            shown = " ".join(map(str, args))
            raise AssertionError(f"etcdctl {shown} failed: {result.stderr.strip()}")
        return result.stdout

    def dump(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value, as etcdctl reads it."""
        return self.dump_at(prefix, 0)

    def dump_at(self, prefix: str, revision: int) -> dict[str, bytes]:
        """Every key under ``prefix`` as it was at ``revision`` (0: now)."""
        raw = json.loads(self.etcdctl("get", "--prefix", f"--rev={revision}", prefix, "-w", "json"))
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in raw.get("kvs", [])
        }


class EtcdCluster:
    """N members on loopback, started together (a member alone cannot elect a leader)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        names = [f"etcd{i}" for i in range(size)]
        peers = {name: free_port() for name in names}
        initial = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in peers.items())
        self.members = [
            EtcdServer(workdir / name, name, peer_port=peers[name], initial_cluster=initial)
            for name in names
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        for member in self.members:
            member.spawn()
        for member in self.members:
            member.wait_healthy(timeout)

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def leader(self) -> EtcdServer:
        """The member that is the raft leader now, as the members themselves report it."""
        running = [m for m in self.members if m.running]
        status = json.loads(running[0].etcdctl("endpoint", "status", "--cluster", "-w", "json"))
        ids = {
            entry["Endpoint"]: entry["Status"]["header"]["member_id"]
            for entry in status
            if "Status" in entry
        }
        leaders = {entry["Status"]["leader"] for entry in status if "Status" in entry}
        if len(leaders) != 1:
            raise AssertionError(f"members disagree on the leader: {status}")
        (leader_id,) = leaders
        for member in self.members:
            if ids.get(member.endpoint) == leader_id:
                return member
        raise AssertionError(f"leader {leader_id} is not one of {ids}")


class EtcdGrpcProxy(_Process):
    """``etcd grpc-proxy start`` on loopback in front of ``endpoints`` (plain HTTP members).

    The proxy coalesces identical watches from its clients into one watch on etcd and
    serves ``/health`` on its own listen address. Restarted on the same port, it looks to
    a client like one etcd endpoint that went away and came back.
    """

    def __init__(self, workdir: Path, endpoints: list[str], *, port: int | None = None) -> None:
        super().__init__()
        self.name = "grpc-proxy"
        self.workdir = workdir
        self.log_path = workdir / "grpc-proxy.log"
        self.endpoints = endpoints
        self.port = port or free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            ETCD,
            "grpc-proxy",
            "start",
            f"--endpoints={','.join(self.endpoints)}",
            f"--listen-addr=127.0.0.1:{self.port}",
            f"--advertise-client-url=127.0.0.1:{self.port}",
            f"--data-dir={self.workdir / 'data'}",
        ]

    def _healthy(self) -> bool:
        try:
            return bool(_get_json(f"{self.endpoint}/health") == {"health": "true"})
        except (OSError, urllib.error.URLError, ValueError):
            return False


class TcpProxy:
    """A loopback TCP relay to ``target_port`` that a test can cut and restore.

    ``block()`` resets every relayed connection and refuses new ones (accepted, then reset
    at once), so a client sees the server vanish while the server itself keeps running and
    can be written to and compacted directly.
    """

    def __init__(self, target_port: int, *, scheme: str = "http") -> None:
        self.target_port = target_port
        self.scheme = scheme  # "https" to relay to a TLS etcd (the relay itself is plain TCP)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._blocked = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def block(self) -> None:
        with self._lock:
            self._blocked = True
            conns, self._conns = self._conns, []
        for conn in conns:
            _reset(conn)

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def close(self) -> None:
        self._closed = True
        self.block()
        self._listener.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                blocked = self._blocked
            if blocked:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _reset(src)
        _reset(dst)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dead peer or a cut network looks to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class SourceRecorder:
    """Collects what a source emits (thread-safe) and folds it into key → value.

    A ``SourceReset`` replaces the state; ``SourceEvents`` apply in order. It also checks
    that revisions never go backwards between resets, which a lost or replayed event
    would show.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[SourceMessage] = []
        self.state: dict[str, bytes] = {}
        self.revision = 0
        self.errors: list[str] = []

    def __call__(self, message: SourceMessage) -> None:
        with self._lock:
            self.messages.append(message)
            if isinstance(message, SourceReset):
                self.state = {kv.key: kv.value for kv in message.kvs}
                self.revision = message.revision
            elif isinstance(message, SourceEvents):
                for event in message.events:
                    if event.mod_revision <= self.revision:
                        self.errors.append(f"event at {event.mod_revision} after {self.revision}")
                    self.revision = event.mod_revision
                    if event.kind == "put":
                        self.state[event.key] = event.value
                    else:
                        self.state.pop(event.key, None)

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.state)

    def of_type(self, kind: type[SourceMessage]) -> list[SourceMessage]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, kind)]

    def resets(self) -> list[SourceReset]:
        return [m for m in self.of_type(SourceReset) if isinstance(m, SourceReset)]

    def statuses(self) -> list[SourceStatus]:
        return [m for m in self.of_type(SourceStatus) if isinstance(m, SourceStatus)]

    def connected(self) -> bool:
        """True when the latest status says connected."""
        statuses = self.statuses()
        return bool(statuses) and statuses[-1].connected

    def count(self, kind: type[SourceMessage]) -> int:
        return len(self.of_type(kind))


@dataclass
class RunningSource:
    """An ``EtcdSource.run`` in its own thread, recording what it emits."""

    source: EtcdSource
    recorder: SourceRecorder
    stop: threading.Event
    thread: threading.Thread

    def halt(self) -> None:
        self.stop.set()
        self.source.interrupt()  # as SourceRunner.stop does: the watch's wait ends now
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "run() did not return after stop"
        self.source.close()


@pytest.fixture
def run_source() -> Iterator[Callable[..., RunningSource]]:
    """Start ``EtcdSource.run`` in a thread; always stopped and joined at teardown."""
    started: list[RunningSource] = []

    def start(settings: EtcdSettings, **kwargs: int) -> RunningSource:
        source = EtcdSource(settings, **kwargs)
        recorder, stop = SourceRecorder(), threading.Event()
        thread = threading.Thread(target=source.run, args=(recorder, stop), name="source")
        running = RunningSource(source, recorder, stop, thread)
        started.append(running)
        thread.start()
        return running

    yield start
    for running in started:
        running.halt()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A running single-node etcd; killed at teardown whatever the test did to it."""
    server = EtcdServer(tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A running three-member etcd cluster on loopback."""
    cluster = EtcdCluster(tmp_path / "cluster", 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture
def writer(etcd: EtcdServer) -> Iterator[EtcdWriter]:
    """Writes to ``etcd`` under the default prefix, as registrations and health marks do."""
    with EtcdWriter(EtcdSettings(endpoints=[etcd.endpoint], prefix="/lbsync")) as w:
        yield w
