"""nginx: ``nginx -t`` on the staged tree, SIGHUP to the master, psutil to verify.

Verification follows what nginx does on SIGHUP (measured, see lb-mechanics.md): the master
(same pid) re-reads the config and, if it is good, starts a new generation of workers
while the old ones are retitled ``worker process is shutting down``; if it is bad, it
logs ``[emerg]`` and keeps the old workers. So "new workers appeared" is the success
signal, and an ``[emerg]`` appended to the error log since the signal is an early failure.

Runtime mode (``runtime = true``, see ``nginx_runtime`` and docs/nginx-runtime.md) adds:
membership changes pushed to a Lua balancer instead of a reload, a re-push after every
reload, ``tick`` to notice restarts done by others, and a Lua syntax check in ``validate``
(``nginx -t`` never runs Lua). Lua blocks in rendered files are checked in either mode.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import structlog

from lbsync.commands import run_command
from lbsync.config import NginxTarget
from lbsync.drivers.base import Driver, ReloadTicket, StagedConfig, register_driver
from lbsync.drivers.listen import check_listen, nginx_listens
from lbsync.drivers.lua import check_lua, luajit_available
from lbsync.drivers.nginx_runtime import RuntimeSync
from lbsync.errors import ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.model import Snapshot
from lbsync.stage import EXTERNAL_DIR

log = structlog.get_logger("lbsync.drivers.nginx")

_POLL_FIRST = 0.005
_POLL_MAX = 0.05
_LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 64 * 1024


@register_driver("nginx")
class NginxDriver(Driver):
    target: NginxTarget

    def __init__(self, target: NginxTarget) -> None:
        super().__init__(target)
        self.runtime = RuntimeSync(target) if target.runtime else None
        self._warned_no_luajit = False
        self._lua_good: set[str] = set()  # digests of Lua code that compiled

    # --- template context and runtime mode -----------------------------------------------

    def template_context(self, snapshot: Snapshot) -> Mapping[str, Any]:
        """Runtime mode: ``nginx_runtime`` (Lua path, control listener, Lua upstreams)."""
        return {} if self.runtime is None else self.runtime.template_context(snapshot)

    def runtime_update(self, old: Snapshot | None, new: Snapshot) -> bool:
        """Runtime mode: push a membership-only change to the Lua balancer, no reload."""
        return False if self.runtime is None else self.runtime.update(old, new)

    def tick(self, applied: Snapshot | None) -> bool:
        """Runtime mode: every ``poll_interval``, re-push if nginx lost the pushed lists."""
        return True if self.runtime is None else self.runtime.tick(applied)

    # --- validate ----------------------------------------------------------------------

    def validate(self, staged: StagedConfig) -> None:
        """``nginx -t`` on the staged main config, the Lua check, the listen pre-check."""
        if staged.main is None:
            raise ValidationFailed("no main config was staged", command=[self.target.binary])
        self._run_check(staged)
        self._check_lua(staged)
        self._check_new_listens(staged.main)

    def _check_lua(self, staged: StagedConfig) -> None:
        """Compile the Lua module (runtime mode) and every Lua block of the rendered files."""
        configs = {}
        for dest, path in staged.files.items():
            try:
                text = path.read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as exc:
                raise ValidationFailed(
                    f"cannot read the staged file {path}: {exc.strerror}", command=[str(path)]
                ) from exc
            if "_by_lua_block" in text:
                configs[str(dest)] = text
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
        fd, error_log = tempfile.mkstemp(prefix="lbsync-nginx-t-", suffix=".log")
        os.close(fd)
        argv = [self.target.binary, "-t", "-q", "-c", str(staged.main)]
        if self.target.prefix is not None:
            argv += ["-p", str(self.target.prefix)]
        argv += ["-e", error_log]  # a failed check never lands in the live error log
        try:
            run_command(
                argv,
                timeout=self.target.command_timeout,
                error=ValidationFailed,
                what="nginx -t refused the new config",
            )
        except ValidationFailed as err:
            if err.returncode is None:  # did not run or timed out: nothing to translate
                raise
            log.debug("nginx.check_failed", target=self.name, staged=str(staged.root))
            raise ValidationFailed(
                f"nginx -t refused the new config (exit {err.returncode})",
                command=err.command,
                returncode=err.returncode,
                stderr=self._live_paths(err.stderr, staged),
            ) from err
        finally:
            with contextlib.suppress(OSError):
                os.unlink(error_log)
        log.debug("nginx.validated", target=self.name, main=str(staged.main))

    def _live_paths(self, text: str, staged: StagedConfig) -> str:
        """Name files as the operator knows them (``/etc/nginx/…``), not the staging dir."""
        root = str(staged.root)
        text = text.replace(f"{root}/{EXTERNAL_DIR}/", "/")
        return text.replace(root, os.path.dirname(os.path.abspath(self.target.config)))

    def _check_new_listens(self, staged_main: Path) -> None:
        live = set(nginx_listens(self.target.config))
        new = [a for a in dict.fromkeys(nginx_listens(staged_main)) if a not in live]
        if not new:
            return
        log.info("nginx.new_listens", target=self.name, addresses=[str(a) for a in new])
        check_listen(new, own_pids=self._own_pids(), target=self.name)

    def _own_pids(self) -> list[int]:
        try:
            master = self._master()
        except ReloadFailed:
            return []  # nginx not running: nothing of ours holds anything
        with contextlib.suppress(psutil.Error):
            return [master.pid, *(c.pid for c in master.children(recursive=True))]
        return [master.pid]

    # --- reload ------------------------------------------------------------------------

    def reload(self) -> ReloadTicket:
        """Remember the current workers and error-log size, then SIGHUP the master."""
        master = self._master()
        try:
            created = master.create_time()
            old = tuple(sorted(c.pid for c in _children(master)))
        except psutil.Error as exc:
            raise ReloadFailed(f"nginx master {master.pid} vanished", target=self.name) from exc
        details: dict[str, Any] = {
            "master_pid": master.pid,
            "master_created": created,
            "old_workers": old,
            "error_log_offset": self._error_log_size(),
        }
        if self.runtime is not None:
            details.update(self.runtime.before_reload())
        started = time.time()
        try:
            os.kill(master.pid, signal.SIGHUP)
        except OSError as exc:
            raise ReloadFailed(
                f"cannot signal nginx master {master.pid}: {exc.strerror}", target=self.name
            ) from exc
        log.info("nginx.reload_sent", target=self.name, master_pid=master.pid, workers=list(old))
        return ReloadTicket(started_at=started, details=details)

    def _master(self) -> psutil.Process:
        """The master named by the pid file; ``ReloadFailed`` naming the file otherwise."""
        path = self.target.pid_file
        try:
            pid = int(Path(path).read_text().strip())
        except FileNotFoundError as exc:
            raise ReloadFailed(
                f"pid file {path} does not exist (nginx not running?)", target=self.name
            ) from exc
        except (OSError, ValueError) as exc:
            raise ReloadFailed(f"pid file {path} is unreadable: {exc}", target=self.name) from exc
        try:
            proc = psutil.Process(pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE and self._is_master(proc)
        except psutil.Error:
            alive = False
        if not alive:
            raise ReloadFailed(
                f"pid {pid} from {path} is not a running nginx master (stale pid file?)",
                target=self.name,
            )
        return proc

    def _is_master(self, proc: psutil.Process) -> bool:
        """Guards against a stale pid file whose pid now belongs to something else."""
        name = proc.name()
        if "nginx" not in name and Path(self.target.binary).name not in name:
            return False
        try:
            title = " ".join(proc.cmdline())
        except psutil.AccessDenied:
            return True
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
        """Wait (bounded) for a new worker generation under the same master."""
        details = ticket.details
        deadline = time.monotonic() + self.target.verify_timeout
        pause = _POLL_FIRST
        while True:
            master = self._same_master(details)
            emerg = self._emergencies(details.get("error_log_offset"))
            if emerg:
                raise VerifyFailed(
                    "nginx refused the new config on reload:\n" + "\n".join(emerg),
                    target=self.name,
                )
            fresh = _new_workers(master, set(details["old_workers"]))
            if fresh:
                log.info("nginx.reloaded", target=self.name, master_pid=master.pid, workers=fresh)
                if self.runtime is not None:
                    self.runtime.after_reload(details)
                return
            if time.monotonic() >= deadline:
                raise VerifyFailed(
                    f"no new nginx workers within {self.target.verify_timeout:g}s of the "
                    f"reload signal{self._log_tail(details.get('error_log_offset'))}",
                    target=self.name,
                )
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)

    def _same_master(self, details: Mapping[str, Any]) -> psutil.Process:
        pid = int(details["master_pid"])
        try:
            proc = psutil.Process(pid)
            same = (
                proc.create_time() == details["master_created"]
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            same = False
        if not same:
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
            with open(self.target.error_log, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                start = offset if size >= offset else 0
                handle.seek(max(start, size - _LOG_TAIL_BYTES))
                data = handle.read()
        except OSError:
            return []
        return data.decode(errors="replace").splitlines()


def _new_workers(master: psutil.Process, old: set[int]) -> list[int]:
    """Worker children not in the old generation and not already shutting down."""
    fresh = []
    try:
        children = _children(master)
    except psutil.Error:
        return []
    for child in children:
        if child.pid in old:
            continue
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "worker process" in title and "shutting down" not in title:
            fresh.append(child.pid)
    return fresh


def _children(proc: psutil.Process) -> list[psutil.Process]:
    """The direct children of a single-threaded process (the nginx master).

    Linux lists them in ``/proc/<pid>/task/<pid>/children`` (one small read, ~0.07 ms);
    psutil's ``children()`` reads every process's stat file instead (~3.7 ms with ~90
    processes, more on a busy host), and verify polls it. Falls back to psutil where the
    file is missing (kernels without CONFIG_PROC_CHILDREN).
    """
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children", encoding="ascii") as handle:
            pids = handle.read().split()
    except OSError:
        return proc.children()
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(int(pid)))
    return found
