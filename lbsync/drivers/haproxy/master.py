"""HAProxy's sockets and master process: a one-shot CLI client, ``show proc``, and the
master watched across a reload."""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from lbsync.config import HaproxyTarget
from lbsync.drivers import procfs
from lbsync.errors import DriverError, VerifyFailed

SOCKET_TIMEOUT = 5.0
POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class Processes:
    """``show proc`` on the master socket."""

    master_pid: int
    reloads: int
    failed: int
    workers: tuple[tuple[int, int], ...]  # (pid, reloads survived); 0 = current generation

    @property
    def current(self) -> tuple[int, ...]:
        """Workers of the latest generation (after a *failed* reload there are none)."""
        return tuple(pid for pid, reloads in self.workers if reloads == 0)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(pid for pid, _ in self.workers)


_PROC_MASTER = re.compile(r"^(\d+)\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", re.MULTILINE)
_PROC_WORKER = re.compile(r"^(\d+)\s+worker\s+(\d+)\s", re.MULTILINE)


def parse_show_proc(text: str) -> Processes:
    master = _PROC_MASTER.search(text)
    if master is None:
        raise ValueError(f"no master line in `show proc` output: {text[:200]!r}")
    workers = tuple((int(m[1]), int(m[2])) for m in _PROC_WORKER.finditer(text))
    return Processes(int(master[1]), int(master[2]), int(master[3]), workers)


class Cli:
    """A one-shot client for HAProxy's stats (admin) socket and master socket.

    Each call is one connection: send, shut down the write side (the master CLI answers
    only after EOF), read to EOF. Every step is bounded by ``timeout``.
    """

    def __init__(self, path: Path, *, target: str, timeout: float = SOCKET_TIMEOUT) -> None:
        self.path = path
        self.target = target
        self.timeout = timeout

    def query(self, command: str) -> str:
        return self.query_bytes(command).decode(errors="replace")

    def query_bytes(self, command: str) -> bytes:
        """The answer undecoded (what the reconcile tick compares)."""
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(command.encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
                return _read_all(sock, deadline)
        except OSError as exc:
            what = " ".join(command.split()[:3])
            raise DriverError(
                f"{self.path}: `{what}` failed: {exc.strerror or exc}", target=self.target
            ) from exc


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    """Read to EOF by ``deadline``. Blocking reads bounded by the kernel (``SO_RCVTIMEO``)
    rather than Python's socket timeout, which polls before every read: HAProxy writes
    its answers 16 KB at a time, and the poll was a third of the CPU of reading a 1.4 MB
    ``show servers state`` (1.4 → 1.0 ms)."""
    sock.settimeout(None)
    chunks: list[bytes] = []
    armed = 0.0  # the receive timeout set on the socket
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer in time")
        if armed - left > _REARM or not armed:  # a read may overrun by at most _REARM
            armed = left
            seconds, micros = int(left), max(1, int(left % 1 * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(seconds, micros))
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError as exc:  # the receive timeout ran out
            raise TimeoutError("no complete answer in time") from exc
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


_TIMEVAL = struct.Struct("@ll")  # struct timeval (Linux)
_REARM = 0.01


@dataclass(frozen=True)
class MasterState:
    """The master and its workers as seen before a reload (``verify`` compares with it)."""

    master_pid: int
    master_started: float | None  # None: not a local process (seen through its socket)
    workers: tuple[int, ...]
    reloads: int | None  # from ``show proc``; None without a master socket
    failed: int | None


class Master:
    """The master process of one target's HAProxy: found through its socket (or pid file),
    and watched across a reload (the same master, a new worker generation)."""

    def __init__(self, target: HaproxyTarget, name: str) -> None:
        self.target = target
        self.name = name

    def own_pids(self) -> list[int]:
        """The master and its workers, when they are local processes we can see."""
        import psutil

        try:
            found = self.processes(DriverError)
            if found.master_started is None:
                return []  # another PID namespace: its pids mean nothing here
            master = psutil.Process(found.master_pid)
            return [master.pid, *(c.pid for c in master.children(recursive=True))]
        except (DriverError, psutil.Error):
            return []  # HAProxy not running: nothing of ours holds anything

    def processes(self, error: type[DriverError]) -> MasterState:
        """Master pid (+ start time, against pid reuse) and all current workers.

        From ``show proc`` when there is a master socket, else from the pid file (then
        the master must be a local ``haproxy`` process, so a stale pid file never gets
        an unrelated process signalled).
        """
        import psutil

        problems = []
        if self.target.master_socket is not None:
            try:
                proc = self.show_proc()
                return MasterState(
                    master_pid=proc.master_pid,
                    master_started=self.local_master(proc.master_pid),
                    workers=proc.pids,
                    reloads=proc.reloads,
                    failed=proc.failed,
                )
            except DriverError as err:
                problems.append(str(err))
        try:
            pid = int(self.target.pid_file.read_text(encoding="ascii").split()[0])
            started = self.local_master(pid)
            if started is None:
                raise ProcessLookupError(f"pid {pid} is not a running HAProxy")
            children = psutil.Process(pid).children()
        except (OSError, ValueError, IndexError, psutil.Error) as exc:
            problems.append(f"pid file {self.target.pid_file}: {exc}")
            raise error(
                "cannot find the HAProxy master: " + "; ".join(problems), target=self.name
            ) from exc
        return MasterState(
            master_pid=pid,
            master_started=started,
            workers=tuple(sorted(c.pid for c in children)),
            reloads=None,
            failed=None,
        )

    def local_master(self, pid: int) -> float | None:
        """The start time of ``pid`` if it is a local HAProxy process, else None (one read
        of ``/proc/<pid>/stat``, as every reconcile tick asks: psutil took ~0.1 ms)."""
        names = {"haproxy", Path(self.target.binary).name[:_COMM_LENGTH]}
        found = procfs.stat(pid)
        if found is None or not found.alive or found.name not in names:
            return None
        return float(found.started)

    def cli(self) -> Cli:
        assert self.target.master_socket is not None
        return Cli(self.target.master_socket, target=self.name)

    def show_proc(self) -> Processes:
        text = self.cli().query("show proc")
        try:
            return parse_show_proc(text)
        except ValueError as exc:
            raise DriverError(str(exc), target=self.name) from exc

    def check_same(self, before: MasterState) -> None:
        """Same master process as before the reload (pid and start time, so a reused pid
        does not pass). A master seen only through its socket is checked by ``show proc``."""
        pid = before.master_pid
        if before.master_started is not None and start_time(pid) != before.master_started:
            raise VerifyFailed(f"the HAProxy master (pid {pid}) is gone", target=self.name)

    def new_workers(self, before: MasterState) -> tuple[int, ...]:
        old = set(before.workers)
        if before.reloads is None:  # no master socket: the master's children
            import psutil

            try:
                children = psutil.Process(before.master_pid).children()
            except psutil.Error as exc:
                raise VerifyFailed(
                    f"the HAProxy master (pid {before.master_pid}) is gone", target=self.name
                ) from exc
            return tuple(sorted(c.pid for c in children if c.pid not in old))
        proc = self.show_proc()
        if proc.master_pid != before.master_pid:
            raise VerifyFailed(
                f"the HAProxy master changed (pid {before.master_pid} → {proc.master_pid})",
                target=self.name,
            )
        new = tuple(pid for pid in proc.current if pid not in old)
        failed_more = before.failed is not None and proc.failed > before.failed
        if not new and proc.reloads > before.reloads and failed_more:
            raise VerifyFailed(
                "HAProxy refused the new config (Loading failure, "
                f"failed: {proc.failed}); the old workers keep serving",
                target=self.name,
            )
        return new


def start_time(pid: int) -> float | None:
    """The process's start time (clock ticks since boot, as ``local_master``), or None if
    it is gone (zombies count as gone)."""
    found = procfs.stat(pid)
    return float(found.started) if found is not None and found.alive else None


_COMM_LENGTH = 15  # /proc/<pid>/stat holds the first 15 bytes of the executable's name
