"""The few facts a driver needs about a process, read straight from ``/proc``.

A reload round asks them several times (the master before the signal, then its children
and their titles until a new generation shows up), and ``psutil`` pays for generality
here: its ``children()`` reads every process's stat file on the host (~3.7 ms with ~90
processes), and each ``Process`` reads a stat file just to be constructed. One small read
per fact is what this module does; where ``/proc`` lacks the children file (kernels
without ``CONFIG_PROC_CHILDREN``) it falls back to psutil, imported only then (~7 ms of
start-up otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from lbsync.fileio import read_bytes


@dataclass(frozen=True)
class ProcStat:
    """From ``/proc/<pid>/stat``: the process name, its state letter, its start time.

    ``started`` is in clock ticks since boot: with ``pid`` it names one process for good
    (a recycled pid gets a later start time).
    """

    pid: int
    name: str
    state: str
    started: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")


def stat(pid: int) -> ProcStat | None:
    """The process's stat line, or None when there is no such process."""
    try:
        raw = read_bytes(f"/proc/{pid}/stat")
    except OSError:
        return None
    # "pid (name) state ppid ...": the name may hold spaces and parentheses.
    open_at, close_at = raw.find(b"("), raw.rfind(b")")
    fields = raw[close_at + 2 :].split()
    if open_at < 0 or close_at < 0 or len(fields) < 20:
        return None
    name = raw[open_at + 1 : close_at].decode(errors="replace")
    return ProcStat(pid, name, fields[0].decode(), int(fields[19]))


def title(pid: int) -> str | None:
    """The process's command line as one string (what nginx retitles), None if gone."""
    try:
        raw = read_bytes(f"/proc/{pid}/cmdline")
    except OSError:
        return None
    return raw.replace(b"\0", b" ").strip().decode(errors="replace")


def children(pid: int) -> list[int]:
    """The pids of a single-threaded process's direct children (an LB master)."""
    try:
        return [int(child) for child in read_bytes(f"/proc/{pid}/task/{pid}/children").split()]
    except FileNotFoundError:
        return _children_by_psutil(pid)
    except OSError:
        return []


def _children_by_psutil(pid: int) -> list[int]:
    """``children`` where ``/proc`` has no children file (or no such process)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []
