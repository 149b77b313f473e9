"""A real HAProxy in master-worker mode in a temp dir, for integration tests.

Layout (one short temp dir: unix socket paths must stay under 108 bytes):

    <dir>/etc/haproxy.cfg      main config (the test renders it before ``start``)
    <dir>/run/master.sock      master CLI (-S)
    <dir>/run/admin.sock       stats socket, level admin (from the template)
    <dir>/run/server-state     server-state-file (from the template)
    <dir>/run/haproxy.pid      -p
    <dir>/haproxy.log          the master's stdout+stderr ("Loading success." etc.)

Sockets live outside the config directory on purpose: staging copies that directory.

The master runs in the foreground as our child (``-W``, no ``-D``), so we reap it.
Teardown always stops it (SIGTERM, then SIGKILL) and kills any process left behind that
runs with our config, including workers of a master a test killed on purpose.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbsync.config import HaproxyTarget, TemplateSettings
from lbsync.drivers.haproxy.master import Cli, Processes, parse_show_proc
from lbsync.drivers.haproxy.state import RuntimeServer, servers_state
from lbsync.errors import DriverError
from tests.harness.net import free_port, wait_for

HAPROXY = "/usr/sbin/haproxy"
REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "templates" / "haproxy" / "haproxy.cfg.j2"


class HaproxyServer:
    """One HAProxy master and its workers, configured in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.etc = workdir / "etc"
        self.run = workdir / "run"
        self.config = self.etc / "haproxy.cfg"
        self.master_socket = self.run / "master.sock"
        self.admin_socket = self.run / "admin.sock"
        self.state_file = self.run / "server-state"
        self.pid_file = self.run / "haproxy.pid"
        self.log = workdir / "haproxy.log"
        self.port = free_port()  # for the test's first frontend
        self.process: subprocess.Popen[bytes] | None = None
        for directory in (self.etc, self.run):
            directory.mkdir(parents=True, exist_ok=True)

    def target(self, **overrides: object) -> HaproxyTarget:
        """A ``HaproxyTarget`` for this server, rendering the stock template to ``config``."""
        fields: dict[str, object] = {
            "name": "haproxy-test",
            "driver": "haproxy",
            "templates": [TemplateSettings(src=TEMPLATE, dest=self.config)],
            "config": self.config,
            "pid_file": self.pid_file,
            "binary": HAPROXY,
            "master_socket": self.master_socket,
            "admin_socket": self.admin_socket,
            "state_file": self.state_file,
            "command_timeout": 30.0,
            "verify_timeout": 15.0,
        }
        fields.update(overrides)
        return HaproxyTarget.model_validate(fields)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start on the config already written; wait for ``Loading success.`` and a worker."""
        argv = [HAPROXY, "-W", "-S", str(self.master_socket), "-p", str(self.pid_file)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*argv, "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._loaded_or_dead, what="HAProxy to load its config")
        if self.process.poll() is not None:
            raise AssertionError(f"HAProxy did not start:\n{self.log_text()}")
        wait_for(lambda: self._try_show_proc() is not None, what="the master socket")
        wait_for(self.admin_socket.exists, what="the admin socket")

    def stop(self) -> None:
        """Hard stop, then SIGKILL for anything of ours that is still there."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
        finally:
            leftovers = self._strays()
            for proc in leftovers:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(leftovers, timeout=10)

    def _loaded_or_dead(self) -> bool:
        assert self.process is not None
        return self.process.poll() is not None or "Loading success." in self.log_text()

    def _strays(self) -> list[psutil.Process]:
        """Processes still running with our config (workers orphaned by a killed master)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(self.config) in (proc.info["cmdline"] or []):
                    found.append(proc)
        return found

    # --- observing --------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def loads(self) -> int:
        """How many times the master loaded a config successfully (start + reloads)."""
        return self.log_text().count("Loading success.")

    def show_proc(self) -> Processes:
        return parse_show_proc(Cli(self.master_socket, target="test").query("show proc"))

    def _try_show_proc(self) -> Processes | None:
        try:
            return self.show_proc()
        except (DriverError, ValueError):
            return None

    def servers(self, backend: str) -> dict[str, RuntimeServer]:
        """``show servers state <backend>``, by server name."""
        text = Cli(self.admin_socket, target="test").query(f"show servers state {backend}")
        return {server.name: server for server in servers_state(text)}

    def master_pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@pytest.fixture
def haproxy() -> Iterator[HaproxyServer]:
    """A configured-but-not-started HAProxy: render ``haproxy.config``, then ``start()``."""
    workdir = Path(tempfile.mkdtemp(prefix="lbsync-hap-"))
    server = HaproxyServer(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
