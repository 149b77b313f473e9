"""What we ship for deployment, run outside containers and outside systemd.

1. The compose stack without Docker: the compose file's own nginx.conf, lbsync config,
   template and command lines, with container paths mapped into a temp dir and ports made
   free, against a real etcd, a real nginx and real backends.
2. The systemd unit's capability set, applied with setpriv to an unprivileged user: it
   is enough for what lbsync asks of nginx (``nginx -t``, the reload signal), and each
   capability in it is needed.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbsync.cli import build_parser
from tests.harness import miniyaml
from tests.harness.backends import Backend, only_served_by
from tests.harness.etcd import EtcdServer
from tests.harness.net import free_port, port_open, wait_for
from tests.harness.nginx import NGINX, old_workers_gone

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
UNIT = REPO / "deploy" / "systemd" / "lbsync.service"
LBSYNC = str(Path(sys.executable).parent / "lbsync")
CONTAINER_DIRS = (
    "/etc/nginx",
    "/etc/lbsync",
    "/run/nginx",
    "/var/log/nginx",
    "/var/lib/nginx",
    "/var/lib/lbsync",
)


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBSYNC_")}
    env["LBSYNC_CONFIG"] = str(tmp_path / "no-such-config.toml")
    return env


# --- 1. the compose stack, outside containers -------------------------------------------


class Stack:
    """The compose file's services mapped onto this host: paths, ports, etcd endpoint."""

    def __init__(self, root: Path, etcd: EtcdServer) -> None:
        self.root = root
        self.compose: dict[str, Any] = miniyaml.load(COMPOSE.read_text())["services"]
        self.dirs = {path: root / path.strip("/").replace("/", "-") for path in CONTAINER_DIRS}
        for directory in self.dirs.values():
            directory.mkdir(parents=True)
        self.front_port = free_port()
        self.http_port = free_port()
        self.replacements = [
            ("http://etcd:2379", etcd.endpoint),
            ("listen 8080;", f"listen 127.0.0.1:{self.front_port};"),
            ("0.0.0.0:9274", f"127.0.0.1:{self.http_port}"),
            ("127.0.0.1:9274", f"127.0.0.1:{self.http_port}"),
            *((path, str(host)) for path, host in self.dirs.items()),
        ]
        self.procs: list[tuple[subprocess.Popen[bytes], signal.Signals]] = []

    def local(self, text: str) -> str:
        for old, new in self.replacements:
            text = text.replace(old, new)
        return text

    def host_path(self, container_path: str) -> Path:
        return Path(self.local(container_path))

    def install_mounts(self, service: str) -> None:
        """Copy each bind mount of ``service`` to where it is mounted, localised."""
        for entry in self.compose[service]["volumes"]:
            source, target, *_ = entry.split(":")
            if not source.startswith("."):
                continue  # a named volume: a directory already made
            src, dest = REPO / source, self.host_path(target)
            files = sorted(src.iterdir()) if src.is_dir() else [src]
            for file in files:
                out = dest / file.name if src.is_dir() else dest
                out.parent.mkdir(parents=True, exist_ok=True)
                text = self.local(file.read_text())
                leftover = re.findall(r"(?:/etc/nginx|/run/nginx|/var/l[a-z]+/\w+|etcd:2379)", text)
                assert not [p for p in leftover if not p.startswith(str(self.root))], (
                    f"{file} still names container paths after localising: {leftover}"
                )
                out.write_text(text)

    def spawn(
        self,
        argv: list[str],
        log: str,
        env: dict[str, str],
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        with (self.root / log).open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs.append((proc, stop_signal))
        return proc

    def stop_all(self) -> None:
        for proc, stop_signal in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(stop_signal)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: nginx workers too
            proc.wait(timeout=10)


@pytest.fixture
def stack(etcd: EtcdServer, tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path / "stack", etcd)
    try:
        yield running
    finally:
        running.stop_all()


def start_nginx(stack: Stack, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """nginx's mounts, then its compose entrypoint. In the image the main config is the
    compiled-in /etc/nginx/nginx.conf; here it is named with -c."""
    stack.install_mounts("nginx")
    shutil.copy("/etc/nginx/mime.types", stack.dirs["/etc/nginx"] / "mime.types")
    conf = stack.host_path("/etc/nginx/nginx.conf")
    binary, *args = stack.compose["nginx"]["entrypoint"]
    assert binary == "nginx"
    error_log = stack.host_path("/var/log/nginx/error.log")
    argv = [NGINX, "-c", str(conf), "-e", str(error_log), *args]
    nginx = stack.spawn(argv, "nginx.out", env, stop_signal=signal.SIGQUIT)  # compose's too
    pid_file = stack.host_path("/run/nginx/nginx.pid")
    wait_for(pid_file.exists, what="nginx to start with nothing generated yet")
    assert nginx.poll() is None
    return nginx


def start_registers(
    stack: Stack, backends: dict[str, Backend], env: dict[str, str]
) -> dict[str, subprocess.Popen[bytes]]:
    """The backends' registration sidecars, with their compose command lines."""
    registers = {}
    for service, backend in backends.items():
        argv = list(stack.compose[f"{service}-register"]["command"])
        argv[argv.index("--host") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = str(backend.port)
        argv = [stack.local(arg) for arg in argv]
        registers[service] = stack.spawn([LBSYNC, *argv], f"{service}-register.log", env)
    return registers


def check_endpoints(stack: Stack) -> None:
    """The compose healthcheck (GET /readyz) passes, and /metrics tells the same story."""
    kind, *test = [stack.local(arg) for arg in stack.compose["lbsync"]["healthcheck"]["test"]]
    assert kind == "CMD"
    assert test[0] == "python"
    probe = [sys.executable, *test[1:]]
    wait_for(lambda: subprocess.run(probe, check=False).returncode == 0, what="healthcheck")
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/metrics") as response:
        scraped = response.read().decode()
    assert 'lbsync_instances{service="web",state="up"} 3.0' in scraped
    assert re.search(r'lbsync_rounds_total\{action="reloaded",target="nginx"\} [1-9]', scraped)


def tour_command(prefix: str) -> list[str]:
    """A command of the tour in the compose file's comments."""
    for line in COMPOSE.read_text().splitlines():
        if "exec lbsync lbsync " in line:
            command = line.split("exec lbsync lbsync ", 1)[1].split("#")[0].strip()
            if command.startswith(prefix):
                return shlex.split(command)
    raise AssertionError(f"no `{prefix}` in the compose file's tour")


def test_the_compose_stack_works_outside_containers(
    stack: Stack, etcd: EtcdServer, backends: list[Backend], tmp_path: Path
) -> None:
    env = cli_env(tmp_path)
    nginx = start_nginx(stack, env)
    assert not port_open(stack.front_port)  # nothing rendered: nothing served yet
    names = {f"web-{i}": backend for i, backend in enumerate(backends, 1)}
    registers = start_registers(stack, names, env)

    # lbsync: its mounts (config, template, nginx.conf) and its compose command.
    stack.install_mounts("lbsync")
    command = [stack.local(arg) for arg in stack.compose["lbsync"]["command"]]
    assert command[:2] == ["run", "-c"]
    config = command[2]
    daemon = stack.spawn([LBSYNC, *command, "--log-format", "json"], "lbsync.log", env)

    def front(expected: set[str]) -> bool:
        assert daemon.poll() is None, (stack.root / "lbsync.log").read_text()[-3000:]
        return only_served_by(stack.front_port, expected)

    wait_for(lambda: front({"b1", "b2", "b3"}), timeout=30, what="all three served")
    assert (stack.host_path("/etc/nginx/lbsync") / "front.conf").exists()
    assert nginx.poll() is None
    check_endpoints(stack)

    mark = [LBSYNC, *tour_command("mark web web-2 down"), "-c", config]
    done = subprocess.run(mark, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: front({"b1", "b3"}), what="web-2 out after `lbsync mark ... down`")

    registers["web-3"].send_signal(signal.SIGTERM)  # docker compose stop web-3-register
    assert registers["web-3"].wait(timeout=15) == 0
    wait_for(
        lambda: front({"b1"}) and old_workers_gone(nginx.pid),
        what="web-3 out once its sidecar stopped (and the old workers gone)",
    )

    status = subprocess.run(
        [LBSYNC, *tour_command("status"), "-c", config],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()]
    # columns: service, instance, address, weight, registered, health mark, probes, state
    assert ["web", "web-1", f"127.0.0.1:{names['web-1'].port}", "1", "up", "-", "-", "up"] in rows
    assert any(row[:2] == ["web", "web-2"] and row[-1] == "down" for row in rows)
    assert not any(row[:2] == ["web", "web-3"] for row in rows)
    assert f"daemon http://127.0.0.1:{stack.http_port}/status:\n" in status.stdout  # reachable

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert only_served_by(stack.front_port, {"b1"})


# --- 2. the systemd unit's capabilities -------------------------------------------------

SETPRIV = shutil.which("setpriv")


def unit_capabilities() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("AmbientCapabilities="):
            return line.split("=", 1)[1].split()
    raise AssertionError("no AmbientCapabilities= in the unit")


def privileged_free_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def as_nobody(
    caps: list[str], *argv: str, group: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``argv`` as user nobody with exactly ``caps`` (ambient + bounding), no new privs,
    and no supplementary group but ``group`` if given."""
    assert SETPRIV is not None
    wanted = "".join(",+" + cap.removeprefix("CAP_").lower() for cap in caps)
    options = [f"--{kind}=-all{wanted}" for kind in ("inh-caps", "ambient-caps", "bounding-set")]
    groups = f"--groups={group}" if group else "--clear-groups"
    drop = [SETPRIV, "--reuid=nobody", "--regid=nogroup", groups, "--no-new-privs"]
    return subprocess.run(
        [*drop, *options, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def debian_like_nginx() -> Iterator[tuple[Path, Path]]:
    """An nginx tree with Debian's ownership: root pid file, www-data 0640 logs, port < 1024.

    Under /tmp (not pytest's 0700 tmp dir) so that user nobody can reach it.
    """
    root = Path(tempfile.mkdtemp(prefix="lbsync-unit-", dir="/tmp"))
    try:
        root.chmod(0o755)
        www = (
            pwd.getpwnam("www-data") if "www-data" in {p.pw_name for p in pwd.getpwall()} else None
        )
        uid, gid = (www.pw_uid, www.pw_gid) if www else (33, 33)
        (root / "run").mkdir()
        (root / "run" / "nginx.pid").write_text("")  # root 0644, as a root master leaves it
        (root / "log").mkdir()
        for name in ("error.log", "access.log"):
            (root / "log" / name).write_text("")
            (root / "log" / name).chmod(0o640)
            os.chown(root / "log" / name, uid, gid)
        (root / "check").mkdir(mode=0o755)  # lbsync's own -e log for `nginx -t`
        os.chown(root / "check", 65534, 65534)
        conf = root / "nginx.conf"
        conf.write_text(
            f"pid {root}/run/nginx.pid;\nerror_log {root}/log/error.log;\n"
            "events { worker_connections 64; }\n"
            f"http {{\n    access_log {root}/log/access.log;\n"
            f"    client_body_temp_path {root}/tmp/body;\n"
            f"    proxy_temp_path {root}/tmp/proxy;\n"
            f"    fastcgi_temp_path {root}/tmp/fastcgi;\n"
            f"    uwsgi_temp_path {root}/tmp/uwsgi;\n"
            f"    scgi_temp_path {root}/tmp/scgi;\n"
            f"    server {{ listen 127.0.0.1:{privileged_free_port()}; return 204; }}\n}}\n"
        )
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / "tmp" / sub).mkdir(parents=True)
        yield root, conf
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to drop to a user"
)
def test_unit_capabilities_are_enough_and_each_is_needed(
    debian_like_nginx: tuple[Path, Path],
) -> None:
    root, conf = debian_like_nginx
    caps = unit_capabilities()
    check = [NGINX, "-t", "-q", "-c", str(conf), "-e", str(root / "check" / "t.log")]

    assert as_nobody([], "true").returncode == 0  # the dropping itself works
    ok = as_nobody(caps, *check)
    assert ok.returncode == 0, ok.stderr

    master = subprocess.Popen(["sleep", "600"])  # stands for the root nginx master
    try:
        assert as_nobody(caps, "kill", "-0", str(master.pid)).returncode == 0
        without_kill = [c for c in caps if c != "CAP_KILL"]
        assert as_nobody(without_kill, "kill", "-0", str(master.pid)).returncode != 0
    finally:
        master.kill()
        master.wait()

    reasons = {
        "CAP_NET_BIND_SERVICE": "bind()",
        "CAP_DAC_OVERRIDE": "Permission denied",
    }
    for cap, reason in reasons.items():
        if cap not in caps:
            continue
        refused = as_nobody([c for c in caps if c != cap], *check)
        assert refused.returncode != 0, f"{cap} is not needed after all"
        assert reason in refused.stderr, refused.stderr
    assert set(caps) <= {"CAP_KILL", *reasons}, f"unexplained capabilities in the unit: {caps}"


@pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to drop to a user"
)
def test_group_ownership_can_replace_cap_dac_override(
    debian_like_nginx: tuple[Path, Path],
) -> None:
    """docs/operations.md, "Without CAP_DAC_OVERRIDE": the pid file 0664 and the logs 0660
    in a group lbsync is in (``adm`` here, Debian's log group) make ``nginx -t`` pass."""
    root, conf = debian_like_nginx
    try:
        gid = grp.getgrnam("adm").gr_gid
    except KeyError:
        pytest.skip("no group adm")
    caps = [cap for cap in unit_capabilities() if cap != "CAP_DAC_OVERRIDE"]
    check = [NGINX, "-t", "-q", "-c", str(conf), "-e", str(root / "check" / "t.log")]
    assert as_nobody(caps, *check, group="adm").returncode != 0  # Debian's modes: refused
    for path, mode in [
        (root / "run" / "nginx.pid", 0o664),
        *[(log, 0o660) for log in (root / "log").iterdir()],
    ]:
        os.chown(path, -1, gid)
        path.chmod(mode)
    ok = as_nobody(caps, *check, group="adm")
    assert ok.returncode == 0, ok.stderr
    assert as_nobody(caps, *check).returncode != 0  # and it is the group that does it


def test_unit_commands_run(tmp_path: Path) -> None:
    """ExecStartPre (`lbsync check`) works on a config like the example's."""
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStartPre="))
    _binary, *argv = shlex.split(line.split("=", 1)[1])
    args = build_parser().parse_args(argv)
    assert args.config == Path("/etc/lbsync/lbsync.toml")
    config = tmp_path / "lbsync.toml"
    shutil.copy(REPO / "deploy" / "lbsync.toml.example", config)
    (tmp_path / "templates").symlink_to(REPO / "templates")
    argv[argv.index("-c") + 1] = str(config)
    done = subprocess.run(
        [LBSYNC, *argv], capture_output=True, text=True, env=cli_env(tmp_path), check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ok  nginx: " in done.stdout
