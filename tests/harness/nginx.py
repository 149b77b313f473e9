"""A real nginx master with a private prefix in a temp dir, for integration tests.

Layout (everything under one temp dir, nothing under /etc or /var):

    <dir>/nginx.conf            main config; ``include <dir>/conf.d/*.conf;`` (absolute)
    <dir>/conf.d/upstreams.conf ``upstream app`` (a placeholder until a test renders one)
    <dir>/conf.d/site.conf      ``server { listen 127.0.0.1:<port>; proxy_pass http://app; }``
    <dir>/nginx.pid, error.log, tmp/

The master runs as root with ``user root`` so workers can read a pytest temp dir. Teardown
always stops it (SIGQUIT, then SIGKILL) and kills any worker left behind, including
orphans of a master a test killed on purpose.

``daemon on`` makes the master an orphan. Where PID 1 does not reap (some container and VM
inits), every stopped master would stay a zombie; so while the fixture runs, the test
process is a child subreaper (Linux) and reaps the masters itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbsync.config import NginxTarget, TemplateSettings
from tests.harness.net import free_port, port_open, wait_for

NGINX = "/usr/sbin/nginx"
REPO = Path(__file__).resolve().parents[2]
UPSTREAMS_TEMPLATE = REPO / "templates" / "nginx" / "upstreams.conf.j2"

PLACEHOLDER_UPSTREAM = "upstream app {\n    server 127.0.0.1:1 down;\n}\n"
# Debian's paths; the NDK must be loaded before the Lua module (undefined symbol otherwise).
LUA_MODULES = (
    "/usr/share/nginx/modules/ndk_http_module.so",
    "/usr/share/nginx/modules/ngx_http_lua_module.so",
)


class NginxServer:
    """One nginx master and its workers, configured in ``workdir``.

    ``lua=True``: the Lua module is loaded (NDK first) and the site's location has the
    runtime mode's access check and upstream keep-alive; ``control_port`` is free for the
    control listener, which lbsync's rendered upstreams file adds.
    """

    def __init__(self, workdir: Path, *, lua: bool = False) -> None:
        self.lua = lua
        self.control_port = free_port() if lua else 0
        self.dir = workdir
        self.conf = workdir / "nginx.conf"
        self.conf_d = workdir / "conf.d"
        self.pid_file = workdir / "nginx.pid"
        self.error_log = workdir / "error.log"
        self.port = free_port()
        self._seen: dict[int, psutil.Process] = {}

    # --- configuration ----------------------------------------------------------------

    def write_config(self) -> None:
        tmp = self.dir / "tmp"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        self.conf_d.mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        modules = "".join(f"load_module {m};\n" for m in LUA_MODULES) if self.lua else ""
        self.conf.write_text(
            f"{modules}"
            "daemon on;\n"
            "master_process on;\n"
            "worker_processes 1;\n"
            f"{user}"
            f"pid {self.pid_file};\n"
            f"error_log {self.error_log} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "    access_log off;\n"
            f"    client_body_temp_path {tmp}/body;\n"
            f"    proxy_temp_path {tmp}/proxy;\n"
            f"    fastcgi_temp_path {tmp}/fastcgi;\n"
            f"    uwsgi_temp_path {tmp}/uwsgi;\n"
            f"    scgi_temp_path {tmp}/scgi;\n"
            f"    include {self.conf_d}/*.conf;\n"
            "}\n"
        )
        (self.conf_d / "upstreams.conf").write_text(PLACEHOLDER_UPSTREAM)
        runtime = (
            '        access_by_lua_block { require("lbsync.runtime").access("app") }\n'
            "        proxy_http_version 1.1;\n"
            '        proxy_set_header Connection "";\n'
            if self.lua
            else ""
        )
        (self.conf_d / "site.conf").write_text(
            "server {\n"
            f"    listen 127.0.0.1:{self.port};\n"
            "    location / {\n"
            f"{runtime}"
            "        proxy_pass http://app;\n"
            "        proxy_next_upstream error timeout;\n"
            "    }\n"
            "}\n"
        )

    def target(self, *templates: tuple[Path, Path], **overrides: object) -> NginxTarget:
        """An ``NginxTarget`` for this server; default template: stock upstreams → conf.d."""
        pairs = templates or ((UPSTREAMS_TEMPLATE, self.conf_d / "upstreams.conf"),)
        fields: dict[str, object] = {
            "name": "nginx-test",
            "driver": "nginx",
            "templates": [TemplateSettings(src=src, dest=dest) for src, dest in pairs],
            "config": self.conf,
            "pid_file": self.pid_file,
            "binary": NGINX,
            "prefix": self.dir,
            "error_log": self.error_log,
            "command_timeout": 30.0,
            "verify_timeout": 15.0,
        }
        if self.lua:
            fields["runtime"] = True
            fields["control_url"] = self.control_url
            fields["control_token_file"] = self.control_token_file
        fields.update(overrides)
        return NginxTarget.model_validate(fields)

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}/lbsync/"

    @property
    def control_token_file(self) -> Path:
        """Where lbsync keeps the control token (created by lbsync on first use)."""
        return self.dir / "control.token"

    def control_token(self) -> str:
        """The token, read as a root attacker (or a test) could read it."""
        return self.control_token_file.read_text().strip()

    def reconfigurations(self) -> int:
        """How many times the master re-read its config (SIGHUP) since it started."""
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return 0
        return text.count("signal 1 (SIGHUP) received")

    # --- lifecycle --------------------------------------------------------------------

    def _nginx(self, *args: str) -> list[str]:
        return [NGINX, "-p", str(self.dir), "-c", str(self.conf), "-e", str(self.error_log), *args]

    def start(self) -> None:
        done = subprocess.run(
            self._nginx(), capture_output=True, text=True, check=False, timeout=30
        )
        if done.returncode != 0:
            raise AssertionError(f"nginx did not start: {done.stderr}\n{self.log_tail()}")
        wait_for(self._running_master, what="nginx master")
        wait_for(lambda: port_open(self.port), what=f"nginx listening on {self.port}")
        wait_for(self.worker_pids, what="an nginx worker")

    def stop(self) -> None:
        """Graceful quit, then SIGKILL for anything of ours that is still there."""
        master = self._running_master()
        if master is not None:
            self._remember([master, *_children(master)])
            with contextlib.suppress(psutil.Error):
                master.send_signal(signal.SIGQUIT)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not _alive(master), timeout=10, what="nginx to quit")
        leftovers = [p for p in [*self._seen.values(), *self._strays()] if _alive(p)]
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        for proc in self._seen.values():  # adopted while we were the subreaper: reap
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if proc.is_running() and proc.ppid() == os.getpid():
                    os.waitpid(proc.pid, os.WNOHANG)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- processes --------------------------------------------------------------------

    def master_pid(self) -> int:
        master = self._running_master()
        if master is None:
            raise AssertionError(f"no running nginx master\n{self.log_tail()}")
        return master.pid

    def worker_pids(self) -> list[int]:
        """Current-generation workers: the newest ``worker process`` (the configs run one).

        Titles alone can't tell: on a reload the master starts the new workers, sleeps
        100 ms (ngx_master_process_cycle), and only then tells the old ones to quit, so for
        that long the old worker still has its plain title (and accepts connections).
        """
        master = self._running_master()
        if master is None:
            return []
        workers = []
        for child in _children(master):
            with contextlib.suppress(psutil.Error):
                title = " ".join(child.cmdline())
                if "worker process" in title and "shutting down" not in title:
                    workers.append((child.create_time(), child.pid))
        return [pid for _, pid in sorted(workers)[-1:]]

    def settled(self) -> bool:
        """No worker of an earlier generation is left: after a reload, old workers keep
        accepting new connections for a while and answer them with the old config, so a
        one-shot traffic check is only sound once they are gone."""
        master = self._running_master()
        return master is not None and old_workers_gone(master.pid)

    def _running_master(self) -> psutil.Process | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            proc = psutil.Process(pid)
        except (OSError, ValueError, psutil.Error):
            return None
        if not _alive(proc):
            return None
        self._remember([proc, *_children(proc)])
        return proc

    def _remember(self, procs: list[psutil.Process]) -> None:
        for proc in procs:
            self._seen.setdefault(proc.pid, proc)

    def _strays(self) -> list[psutil.Process]:
        """nginx processes holding a file of this server's dir open (orphaned workers)."""
        strays = []
        for proc in psutil.process_iter(["name"]):
            if "nginx" not in (proc.info.get("name") or ""):
                continue
            with contextlib.suppress(psutil.Error):
                if any(f.path.startswith(f"{self.dir}/") for f in proc.open_files()):
                    strays.append(proc)
        return strays


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children()
    except psutil.Error:
        return []


def old_workers_gone(master_pid: int, worker_processes: int = 1) -> bool:
    """The nginx master's only children are its ``worker_processes`` current workers.

    Counting matters: for 100 ms after a reload the old worker still has its plain
    ``worker process`` title (see ``NginxServer.worker_pids``; seen in CI). The test
    configs run one worker and no cache processes.
    """
    try:
        children = psutil.Process(master_pid).children()
        titles = [" ".join(child.cmdline()) for child in children]
    except psutil.Error:
        return False
    current = [t for t in titles if "worker process" in t and "shutting down" not in t]
    return len(titles) == len(current) == worker_processes


def process_gone(proc: psutil.Process) -> bool:
    """Exited (or a zombie nobody reaped yet): what a test waits for after killing one."""
    return not _alive(proc)


def _alive(proc: psutil.Process) -> bool:
    """Running, same process (psutil checks the create time), and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> bool:
    """Adopt orphaned descendants (Linux ``prctl``); False where that is not available."""
    if os.uname().sysname != "Linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)  # the running process's libc
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)


@pytest.fixture
def nginx_server(tmp_path: Path) -> Iterator[NginxServer]:
    """A started nginx with an ``upstream app`` placeholder and a site on ``.port``."""
    yield from _running(NginxServer(tmp_path / "nginx"))


@pytest.fixture
def nginx_lua_server(tmp_path: Path) -> Iterator[NginxServer]:
    """Like ``nginx_server``, with the Lua module loaded (``lua=True``); not started: the
    test renders the upstreams file (which sets up the Lua side) and calls ``start``."""
    yield from _running(NginxServer(tmp_path / "nginx", lua=True), start=False)


def _running(server: NginxServer, *, start: bool = True) -> Iterator[NginxServer]:
    server.dir.mkdir()
    server.write_config()
    reaping = _set_subreaper(True)
    try:
        if start:
            server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            if reaping:
                _set_subreaper(False)
