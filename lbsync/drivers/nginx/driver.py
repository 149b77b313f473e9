"""nginx: ``nginx -t`` on the staged tree, SIGHUP to the master, ``/proc`` to verify.

Verification follows what nginx does on SIGHUP (measured, see lb-mechanics.md): the master
(same pid) re-reads the config and, if it is good, starts a new generation of workers
while the old ones are retitled ``worker process is shutting down``; if it is bad, it
logs ``[emerg]`` and keeps the old workers. So "new workers appeared" is the success
signal, and an ``[emerg]`` appended to the error log since the signal is an early failure.

Runtime mode (``runtime = true``, see ``runtime`` and docs/nginx-runtime.md) adds:
membership changes pushed to a Lua balancer instead of a reload, a re-push after every
reload, ``tick`` to notice restarts done by others, and a Lua syntax check in ``validate``
(``nginx -t`` never runs Lua). Lua blocks in rendered files are checked in either mode.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from lbsync.config import NginxTarget
from lbsync.drivers import procfs
from lbsync.drivers.base import Driver, ReloadTicket, own_ticket, register_driver, run_checker
from lbsync.drivers.listen import check_listen
from lbsync.drivers.nginx.config import NginxFiles, may_add_listens, mentions, nginx_listens
from lbsync.drivers.nginx.lua import check_lua, luajit_available
from lbsync.errors import ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.fileio import read_bytes, read_tail
from lbsync.model import Snapshot
from lbsync.stage.tree import StagedConfig
from lbsync.structure import nginx_line_shape

if TYPE_CHECKING:
    from lbsync.drivers.nginx.runtime import ControlBefore, RuntimeSync

log = structlog.get_logger("lbsync.drivers.nginx")

_POLL_FIRST = 0.005
_POLL_MAX = 0.05
# verify's first look comes after this share of how long the recent reloads took to show
# new workers (20-45 ms for a small config; ~300 ms for 1,000 upstreams of 100 servers);
# each look costs CPU (~0.2 ms). The fastest of the last _RECENT_RELOADS counts, so that
# one slow reload does not hold up the rounds after it; at most _FIRST_LOOK_MAX.
_FIRST_LOOK_SHARE = 0.8
_FIRST_LOOK_MAX = 1.0
_RECENT_RELOADS = 3
# After the first look, verify looks again after this share of the expected reload
# (at least _POLL_FIRST), doubling up to a quarter of it (at least _POLL_MAX).
_POLL_SHARE = 0.1
_LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class NginxTicket(ReloadTicket):
    master_pid: int
    master_started: int  # clock ticks since boot (``procfs``): with the pid, one process
    old_workers: tuple[int, ...]
    error_log_offset: int | None
    control: ControlBefore | None  # runtime mode: the Lua side before the signal


@register_driver("nginx")
class NginxDriver(Driver):
    target: NginxTarget

    def __init__(self, target: NginxTarget) -> None:
        super().__init__(target)
        self.runtime: RuntimeSync | None = None
        if target.runtime:
            # imported here: runtime mode's Lua control client (http.client & co) is ~10 ms
            # of every start that does not use it
            from lbsync.drivers.nginx.runtime import RuntimeSync

            self.runtime = RuntimeSync(target)
        self._warned_no_luajit = False
        self._lua_good: set[str] = set()  # digests of Lua code that compiled
        self._listen_files = NginxFiles()
        # signal → new workers seen, for the last few reloads
        self._reload_seconds: deque[float] = deque(maxlen=_RECENT_RELOADS)

    # --- template context and runtime mode -----------------------------------------------

    def line_shape(self) -> Callable[[str], list[str]]:
        return nginx_line_shape

    def template_context(self, snapshot: Snapshot) -> Mapping[str, Any]:
        """Runtime mode: ``nginx_runtime`` (Lua path, control listener, Lua upstreams)."""
        return {} if self.runtime is None else self.runtime.template_context(snapshot)

    def runtime_update(self, old: Snapshot | None, new: Snapshot) -> bool:
        """Runtime mode: push a membership-only change to the Lua balancer, no reload."""
        return False if self.runtime is None else self.runtime.update(old, new)

    @property
    def ticks(self) -> bool:  # type: ignore[override]
        return self.runtime is not None

    def tick(self, applied: Snapshot | None) -> bool:
        """Runtime mode: every ``poll_interval``, re-push if nginx lost the pushed lists."""
        return True if self.runtime is None else self.runtime.tick(applied)

    def lb_identity(self) -> tuple[int, int] | None:
        """The master's pid and start time (a pid file and one ``/proc`` read)."""
        try:
            master = self._master()
        except ReloadFailed:
            return None
        return master.pid, master.started

    def runtime_status(self) -> Mapping[str, Any] | None:
        """Runtime mode: control endpoint reachability and tampering found (and repaired)."""
        return None if self.runtime is None else self.runtime.status()

    # --- validate ----------------------------------------------------------------------

    def validate(self, staged: StagedConfig) -> None:
        """``nginx -t`` on the staged main config, the Lua check, the listen pre-check.

        Runtime mode: the control token file exists (created if missing, DriverError if
        unsafe) before any config that makes nginx's master read it can be loaded.
        """
        if staged.main is None:
            raise ValidationFailed("no main config was staged", command=[self.target.binary])
        if self.runtime is not None:
            self.runtime.token()
        self._run_check(staged)
        self._check_lua(staged)
        self._check_new_listens(staged)

    def _check_lua(self, staged: StagedConfig) -> None:
        """Compile the Lua module (runtime mode) and every Lua block of the rendered files."""
        configs = {}
        for dest, path in staged.files.items():
            try:
                data = staged.contents.get(path) or read_bytes(path)
            except OSError as exc:
                raise ValidationFailed(
                    f"cannot read the staged file {path}: {exc.strerror}", command=[str(path)]
                ) from exc
            if mentions(data, b"_by_lua_block", 2):  # "y": rare in server lists
                configs[str(dest)] = data.decode("utf-8", errors="surrogateescape")
        modules = self.runtime.modules() if self.runtime is not None else []
        if not (configs or modules):
            return
        if not luajit_available(self.target.luajit):
            if not self._warned_no_luajit:
                self._warned_no_luajit = True
                log.warning(
                    "nginx.lua_check_skipped",
                    target=self.name,
                    reason=f"{self.target.luajit!r} not found (Debian: apt install luajit2)",
                )
            return
        checked = check_lua(
            luajit=self.target.luajit,
            timeout=self.target.command_timeout,
            modules=modules,
            configs=configs,
            known_good=self._lua_good,
        )
        log.debug("nginx.lua_checked", target=self.name, compiled=checked)

    def _run_check(self, staged: StagedConfig) -> None:
        argv = [self.target.binary, "-t", "-q", "-c", str(staged.main)]
        if self.target.prefix is not None:
            argv += ["-p", str(self.target.prefix)]
        # A failed check never lands in the live error log; nginx -t reports on stderr.
        argv += ["-e", os.devnull]
        try:
            run_checker(
                argv,
                staged=staged,
                live_config=self.target.config,
                timeout=self.target.command_timeout,
                what="nginx -t refused the new config",
            )
        except ValidationFailed as err:
            if err.returncode is not None:
                log.debug("nginx.check_failed", target=self.name, staged=str(staged.root))
            raise
        log.debug("nginx.validated", target=self.name, main=str(staged.main))

    def _check_new_listens(self, staged: StagedConfig) -> None:
        """Probe every listen address of the staged config that the live one lacks.

        Only the rendered files differ between the two trees (the rest is mirrored), so
        when none of them has a ``listen`` or an ``include`` (a list of upstreams), no
        address can be new and neither tree is walked.
        """
        assert staged.main is not None
        rendered = [staged.contents.get(path) for path in staged.files.values()]
        if all(data is not None and not may_add_listens(data) for data in rendered):
            return
        self._listen_files.given(staged.contents)
        live = set(nginx_listens(self.target.config, self._listen_files))
        wanted = nginx_listens(staged.main, self._listen_files)
        self._listen_files.sweep()
        new = [a for a in dict.fromkeys(wanted) if a not in live]
        if not new:
            return
        log.info("nginx.new_listens", target=self.name, addresses=[str(a) for a in new])
        check_listen(new, own_pids=self._own_pids(), target=self.name)

    def _own_pids(self) -> list[int]:
        try:
            master = self._master()
        except ReloadFailed:
            return []  # nginx not running: nothing of ours holds anything
        return [master.pid, *procfs.children(master.pid)]

    # --- reload ------------------------------------------------------------------------

    def reload(self) -> NginxTicket:
        """Remember the current workers and error-log size, then SIGHUP the master."""
        master = self._master()
        old = tuple(sorted(procfs.children(master.pid)))
        offset = self._error_log_size()
        control = self.runtime.before_reload() if self.runtime is not None else None
        started = time.monotonic()
        try:
            os.kill(master.pid, signal.SIGHUP)
        except OSError as exc:
            raise ReloadFailed(
                f"cannot signal nginx master {master.pid}: {exc.strerror}", target=self.name
            ) from exc
        log.info("nginx.reload_sent", target=self.name, master_pid=master.pid, workers=list(old))
        return NginxTicket(
            started_at=started,
            master_pid=master.pid,
            master_started=master.started,
            old_workers=old,
            error_log_offset=offset,
            control=control,
        )

    def _master(self) -> procfs.ProcStat:
        """The master named by the pid file; ``ReloadFailed`` naming the file otherwise."""
        path = self.target.pid_file
        try:
            pid = int(read_bytes(path).strip())
        except FileNotFoundError as exc:
            raise ReloadFailed(
                f"pid file {path} does not exist (nginx not running?)", target=self.name
            ) from exc
        except (OSError, ValueError) as exc:
            raise ReloadFailed(f"pid file {path} is unreadable: {exc}", target=self.name) from exc
        proc = procfs.stat(pid)
        if proc is None or not proc.alive or not self._is_master(proc):
            raise ReloadFailed(
                f"pid {pid} from {path} is not a running nginx master (stale pid file?)",
                target=self.name,
            )
        return proc

    def _is_master(self, proc: procfs.ProcStat) -> bool:
        """Guards against a stale pid file whose pid now belongs to something else."""
        if "nginx" not in proc.name and Path(self.target.binary).name[:15] not in proc.name:
            return False
        title = procfs.title(proc.pid)
        if title is None:
            return True  # unreadable (hidepid): the name will have to do
        return "worker process" not in title and " cache " not in f" {title} "

    def _error_log_size(self) -> int | None:
        if self.target.error_log is None:
            return None
        try:
            return os.stat(self.target.error_log).st_size
        except OSError:
            return 0

    # --- verify ------------------------------------------------------------------------

    def verify(self, ticket: ReloadTicket) -> None:
        """Wait (bounded) for a new worker generation under the same master.

        Each look (a few ``/proc`` reads, the error log, a sleep: ~0.2 ms of CPU on a VM)
        before nginx can have started its workers is wasted, so the first one waits for
        most of what recent reloads took, and the next ones come at a share of it.
        """
        own = own_ticket(ticket, NginxTicket, self.name)
        deadline = time.monotonic() + self.target.verify_timeout
        time.sleep(min(first_look(self._reload_seconds), self.target.verify_timeout))
        pause, longest = poll_pauses(self._reload_seconds)
        while True:
            master = self._same_master(own)
            emerg = self._emergencies(own.error_log_offset)
            if emerg:
                raise VerifyFailed(
                    "nginx refused the new config on reload:\n" + "\n".join(emerg),
                    target=self.name,
                )
            fresh = _new_workers(master.pid, set(own.old_workers))
            if fresh:
                self._reload_seconds.append(time.monotonic() - own.started_at)
                log.debug("nginx.reloaded", target=self.name, master_pid=master.pid, workers=fresh)
                if self.runtime is not None and own.control is not None:
                    self.runtime.after_reload(own.control)
                return
            if time.monotonic() >= deadline:
                raise VerifyFailed(
                    f"no new nginx workers within {self.target.verify_timeout:g}s of the "
                    f"reload signal{self._log_tail(own.error_log_offset)}",
                    target=self.name,
                )
            time.sleep(pause)
            pause = min(pause * 2, longest)

    def _same_master(self, ticket: NginxTicket) -> procfs.ProcStat:
        pid = ticket.master_pid
        proc = procfs.stat(pid)
        if proc is None or not proc.alive or proc.started != ticket.master_started:
            raise VerifyFailed(f"nginx master {pid} died after the reload signal", target=self.name)
        return proc

    def _emergencies(self, offset: int | None) -> list[str]:
        """``[emerg]`` lines since the signal. A failed ``bind() to …`` is retried by nginx
        (for ~2.5 s) and only final once it logs ``still could not bind()``. A failing
        ``init_by_lua`` (a broken Lua module) fails the reload with only an ``[error]``."""
        found: list[str] = []
        keep = False
        for line in self._appended(offset):
            if keep and line[:1].isspace():  # a Lua error goes on over indented lines
                found.append(line)
                continue
            keep = "init_by_lua error" in line
            if keep or ("[emerg]" in line and "bind() to " not in line):
                found.append(line)
        return found

    def _log_tail(self, offset: int | None) -> str:
        if self.target.error_log is None:
            return " (set error_log for this target to see nginx's reason)"
        lines = self._appended(offset)[-_LOG_TAIL_LINES:]
        shown = "\n".join(lines) if lines else "(nothing new)"
        return f"; {self.target.error_log} since the signal:\n{shown}"

    def _appended(self, offset: int | None) -> list[str]:
        """Error-log lines written since ``offset`` (bounded; a rotated log reads from 0)."""
        if self.target.error_log is None or offset is None:
            return []
        try:
            data = read_tail(self.target.error_log, offset, _LOG_TAIL_BYTES)
        except OSError:
            return []
        return data.decode(errors="replace").splitlines()


def first_look(recent: Collection[float]) -> float:
    """How long verify waits before its first look, given what recent reloads took."""
    expected = min(recent, default=0.0)
    return min(max(_POLL_FIRST, _FIRST_LOOK_SHARE * expected), _FIRST_LOOK_MAX)


def poll_pauses(recent: Collection[float]) -> tuple[float, float]:
    """verify's first pause after the first look, and the longest it doubles up to: at a
    1,000-upstream config (~300 ms reloads) 3 looks instead of 5-9 from 5 ms up."""
    expected = min(min(recent, default=0.0), _FIRST_LOOK_MAX)
    return max(_POLL_FIRST, _POLL_SHARE * expected), max(_POLL_MAX, expected / 4)


def _new_workers(master: int, old: set[int]) -> list[int]:
    """Worker children not in the old generation and not already shutting down."""
    fresh = []
    for pid in procfs.children(master):
        if pid in old:
            continue
        title = procfs.title(pid)
        if title is not None and "worker process" in title and "shutting down" not in title:
            fresh.append(pid)
    return fresh
