"""register, mark and status as an operator runs them: the real `lbsync` executable, real
etcd, and for mark a real daemon in front of a real nginx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.http import StatusServer
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import free_port, wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import instance, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"
LBSYNC = str(Path(sys.executable).parent / "lbsync")


def cli_env(tmp_path: Path) -> dict[str, str]:
    """No LBSYNC_* from the caller, and no /etc/lbsync/lbsync.toml read by accident."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBSYNC_")}
    env["LBSYNC_CONFIG"] = str(tmp_path / "no-such-config.toml")
    return env


def lbsync(etcd: EtcdServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LBSYNC, *args, "--endpoint", etcd.endpoint, "--prefix", P],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(tmp_path),
        check=False,
    )


class Registration:
    """`lbsync register ...` as a child process, with its log kept for failures."""

    def __init__(self, etcd: EtcdServer, tmp_path: Path, iid: str, port: int, ttl: str) -> None:
        self.log = tmp_path / f"register-{iid}.log"
        argv = [
            LBSYNC, "register", "--endpoint", etcd.endpoint, "--prefix", P,
            "--service", "app", "--id", iid, "--host", "127.0.0.1", "--port", str(port),
            "--ttl", ttl, "--meta", "zone=a", "--log-format", "json",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=cli_env(tmp_path)
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def registrations() -> Iterator[list[Registration]]:
    started: list[Registration] = []
    yield started
    for registration in started:
        registration.kill()


def lease_of(etcd: EtcdServer, name: str) -> int | None:
    """The lease id the key is attached to; None when the key does not exist."""
    kvs = json.loads(etcd.etcdctl("get", name, "-w", "json")).get("kvs", [])
    return int(kvs[0].get("lease", 0)) if kvs else None


def remaining_ttl(etcd: EtcdServer, lease: int) -> int:
    return int(json.loads(etcd.etcdctl("lease", "timetolive", f"{lease:x}", "-w", "json"))["ttl"])


def test_register_keeps_its_lease_alive_and_removes_the_key_on_sigterm(
    etcd: EtcdServer, tmp_path: Path, registrations: list[Registration]
) -> None:
    name = key("app", "instances", "i1")
    reg = Registration(etcd, tmp_path, "i1", 8081, ttl="9s")
    registrations.append(reg)
    lease = wait_for(lambda: lease_of(etcd, name), what=f"{name} with a lease")
    value = json.loads(etcd.dump(name)[name])
    assert value == {"host": "127.0.0.1", "port": 8081, "weight": 1, "meta": {"zone": "a"}}

    # The remaining TTL goes down, then back up when the registrar refreshes the lease.
    lowest = remaining_ttl(etcd, lease)

    def refreshed() -> bool:
        nonlocal lowest
        now = remaining_ttl(etcd, lease)
        if now > lowest:
            return True
        lowest = now
        return False

    wait_for(refreshed, interval=0.2, what="the lease to be refreshed")
    assert lease_of(etcd, name) == lease

    reg.proc.send_signal(signal.SIGTERM)
    assert reg.proc.wait(timeout=15) == 0
    # Gone at once: the lease had seconds left, so only the revoke can explain it.
    assert lease_of(etcd, name) is None
    assert remaining_ttl(etcd, lease) == -1  # revoked, not expired later


def test_register_killed_with_sigkill_disappears_within_its_ttl(
    etcd: EtcdServer, tmp_path: Path, registrations: list[Registration]
) -> None:
    name = key("app", "instances", "doomed")
    reg = Registration(etcd, tmp_path, "doomed", 8082, ttl="2s")
    registrations.append(reg)
    lease = wait_for(lambda: lease_of(etcd, name), what=f"{name} registered")
    granted = json.loads(etcd.etcdctl("lease", "timetolive", f"{lease:x}", "-w", "json"))
    assert granted["granted-ttl"] == 2

    reg.proc.send_signal(signal.SIGKILL)
    reg.proc.wait(timeout=10)
    assert lease_of(etcd, name) == lease  # nobody revoked it: it must expire
    wait_for(lambda: lease_of(etcd, name) is None, timeout=2 + 10, what="lease expiry")


def test_register_refuses_a_bad_value_without_touching_etcd(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    argv = [LBSYNC, "register", "--endpoint", etcd.endpoint, "--service", "app", "--id", "x"]
    argv += ["--host", "10.0.0.1;", "--port", "80"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=cli_env(tmp_path), check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith("lbsync: ")
    assert "Traceback" not in done.stderr
    assert etcd.dump(P) == {}


def test_mark_down_takes_the_instance_out_of_nginx_and_up_brings_it_back(
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    registrations: list[Registration],
) -> None:
    b1, b2, _ = backends
    for backend in (b1, b2):
        registrations.append(Registration(etcd, tmp_path, backend.name, backend.port, "10s"))
    daemon = RunningDaemon(settings_for(etcd, nginx_server, tmp_path / "state"))
    try:
        served = nginx_server.port
        wait_for(lambda: only_served_by(served, {"b1", "b2"}), what="both registered, served")

        done = lbsync(etcd, tmp_path, "mark", "app", "b2", "down", "--reason", "5xx rate")
        assert done.returncode == 0, done.stderr
        assert "app/b2 marked down at revision" in done.stdout
        mark = json.loads(etcd.dump(key("app", "health", "b2"))[key("app", "health", "b2")])
        assert mark == {"status": "down", "reason": "5xx rate", "by": "lbsync mark"}
        wait_for(lambda: only_served_by(served, {"b1"}), what="b2 out after mark down")

        assert lbsync(etcd, tmp_path, "mark", "app", "b2", "drain").returncode == 0
        wait_for(lambda: daemon.caught_up(writer), what="daemon at the drain mark")
        assert only_served_by(served, {"b1"})  # draining: no new requests either
        assert "# draining" in (nginx_server.conf_d / "upstreams.conf").read_text()

        assert lbsync(etcd, tmp_path, "mark", "app", "b2", "up").returncode == 0
        assert key("app", "health", "b2") not in etcd.dump(P)  # up clears the mark
        wait_for(lambda: only_served_by(served, {"b1", "b2"}), what="b2 back after mark up")
    finally:
        daemon.stop()


def test_status_against_real_etcd(
    etcd: EtcdServer, writer: EtcdWriter, tmp_path: Path, backends: list[Backend]
) -> None:
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    writer.put(key("app", "instances", "b2"), instance(backends[1]))
    writer.put(key("app", "instances", "bad"), "10.0.0.1:80; include /etc/passwd")
    writer.put(f"{P}/services/idle/settings", '{"balance": "least_conn"}')
    assert lbsync(etcd, tmp_path, "mark", "app", "b2", "down", "--reason", "5xx").returncode == 0
    revision = writer.revision()

    done = lbsync(etcd, tmp_path, "status")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    # columns: service, instance, address, weight, registered, health mark, probes, state
    assert ["app", "b1", instance(backends[0]), "1", "up", "-", "-", "up"] in rows
    b2_row = ["app", "b2", instance(backends[1]), "1", "up", "down", "(5xx)", "by", "lbsync"]
    assert [*b2_row, "mark", "-", "down"] in rows
    assert ["idle", "-", "-", "-", "-", "-", "-", "(no", "instances)"] in rows
    assert f"etcd revision {revision}: 2 service(s), 2 instance(s): 1 up, 0 drain, 1 down" in (
        done.stdout
    )
    assert f"{P}/services/app/instances/bad: " in done.stdout

    as_json = lbsync(etcd, tmp_path, "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["revision"] == revision
    assert document["counts"] == {"services": 2, "up": 1, "drain": 0, "down": 1}
    assert document["daemon"] is None


def test_status_shows_the_daemon_when_its_endpoint_answers(
    etcd: EtcdServer, writer: EtcdWriter, tmp_path: Path
) -> None:
    writer.put(key("app", "instances", "a"), "10.0.0.1:80")
    server = StatusServer(
        "127.0.0.1:0",
        status=lambda: {"ready": True, "etcd": {"connected": True, "revision": 2}},
        healthy=lambda: (True, ""),
        ready=lambda: (True, ""),
    )
    server.start()
    try:
        listen = f"127.0.0.1:{server.port}"
        done = lbsync(etcd, tmp_path, "status", "--http", listen)
        assert done.returncode == 0, done.stderr
        assert f"daemon http://{listen}/status:\n  etcd.connected: true\n" in done.stdout
        document = json.loads(lbsync(etcd, tmp_path, "status", "--json", "--http", listen).stdout)
        assert document["daemon"]["status"]["ready"] is True
    finally:
        server.stop()

    closed = f"127.0.0.1:{free_port()}"
    done = lbsync(etcd, tmp_path, "status", "--http", closed)
    assert done.returncode == 0, done.stderr  # the daemon being down is shown, not fatal
    assert f"daemon http://{closed}/status: unreachable" in done.stdout


def test_status_reads_listen_from_the_config_file(etcd: EtcdServer, tmp_path: Path) -> None:
    server = StatusServer(
        "127.0.0.1:0",
        status=lambda: {"from": "config"},
        healthy=lambda: (True, ""),
        ready=lambda: (True, ""),
    )
    server.start()
    try:
        config = tmp_path / "lbsync.toml"
        config.write_text(
            f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nprefix = "{P}"\n'
            f'[http]\nlisten = "127.0.0.1:{server.port}"\n'
            '[[target]]\nname = "lb"\ndriver = "command"\nreload_command = ["true"]\n'
            f'[[target.template]]\nsrc = "t.j2"\ndest = "{tmp_path / "out.conf"}"\n'
        )
        done = subprocess.run(
            [LBSYNC, "status", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(tmp_path),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "no services under /lbsync/services/" in done.stdout
        assert f"daemon http://127.0.0.1:{server.port}/status:\n  from: config\n" in done.stdout
    finally:
        server.stop()


def test_status_with_etcd_down_is_one_clean_error(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [LBSYNC, "status", "--endpoint", dead],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(tmp_path),
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("lbsync: etcd")
    assert "Traceback" not in done.stderr
