"""Real etcd servers on 127.0.0.1 for integration tests, a cuttable TCP proxy, and a recorder
that folds source messages into the key → value state they describe.

Each server gets a temp data dir and free ports; it can be stopped (SIGTERM), killed
(SIGKILL), paused (SIGSTOP), resumed and started again on the same data dir and ports.
Teardown always kills whatever is left. Start-up failures carry the tail of etcd's log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.model import SourceEvents, SourceMessage, SourceReset, SourceStatus
from tests.harness.net import free_port, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


class EtcdServer:
    """One etcd member. Not started until ``start()``; ``EtcdCluster`` wires several."""

    def __init__(
        self,
        workdir: Path,
        name: str = "etcd0",
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "etcd.log"
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
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
            "--log-level=error",
        ]

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
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

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

    # --- ground truth, independent of lbsync's own client ---------------------------------

    def etcdctl(self, *args: str | bytes) -> str:
        """Run etcdctl against this member (bytes arguments pass raw, e.g. non-UTF-8 keys)."""
        result = subprocess.run(
            [ETCDCTL, f"--endpoints={self.endpoint}", "--command-timeout=10s", *args],
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


class TcpProxy:
    """A loopback TCP relay to ``target_port`` that a test can cut and restore.

    ``block()`` resets every relayed connection and refuses new ones (accepted, then reset
    at once), so a client sees the server vanish while the server itself keeps running and
    can be written to and compacted directly.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
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
        return f"http://127.0.0.1:{self.port}"

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
