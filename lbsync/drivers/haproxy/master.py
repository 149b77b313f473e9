"""HAProxy's sockets: a one-shot CLI client and the master process's ``show proc``."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from lbsync.errors import DriverError

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
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(command.encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
                return _read_all(sock, deadline).decode(errors="replace")
        except OSError as exc:
            what = " ".join(command.split()[:3])
            raise DriverError(
                f"{self.path}: `{what}` failed: {exc.strerror or exc}", target=self.target
            ) from exc


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def start_time(pid: int) -> float | None:
    """The process's start time, or None if it is gone (zombies count as gone)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None
