"""SIGHUP and SIGTERM against the real `lbsync run` process, real etcd and real nginx."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import config_file, instance, key, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"


@pytest.fixture
def config(etcd: EtcdServer, nginx_server: NginxServer, tmp_path: Path) -> Path:
    return config_file(settings_for(etcd, nginx_server, tmp_path / "state"), tmp_path / "l.toml")


@pytest.fixture
def daemon(config: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "lbsync.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbsync", "run", "-c", str(config), "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_sighup_rejects_a_broken_config_then_applies_a_good_one(
    daemon: tuple[subprocess.Popen[bytes], Path],
    config: Path,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> None:
    proc, log = daemon
    b1, b2, _ = backends
    writer.put(key("app", "instances", "b1"), instance(b1))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1"}), what="b1 served")

    good = config.read_text()
    config.write_text(good.replace("[[target]]", "[[target]\n"))  # not TOML any more
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reconfigure.rejected" in log.read_text(), what="rejection logged")
    writer.put(key("app", "instances", "b2"), instance(b2))
    wait_for(lambda: only_served_by(nginx_server.port, {"b1", "b2"}), what="old config at work")

    template = tmp_path / "weights.conf.j2"
    template.write_text(
        "upstream app {\n{% for i in services.app.up %}\n"
        "    server {{ i.address }} weight=7;\n{% endfor %}\n}\n"
    )
    config.write_text(
        good.replace(f'src = "{nginx_server.target().templates[0].src}"', f'src = "{template}"')
    )
    proc.send_signal(signal.SIGHUP)
    upstreams = nginx_server.conf_d / "upstreams.conf"
    wait_for(lambda: "weight=7" in upstreams.read_text(), what="re-rendered with new template")
    assert proc.poll() is None


def test_sigterm_exits_zero_after_the_current_round(
    daemon: tuple[subprocess.Popen[bytes], Path],
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
) -> None:
    proc, log = daemon
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    wait_for(
        lambda: only_served_by(nginx_server.port, {"b1"}) and nginx_server.settled(),
        what="b1 served, the placeholder's workers gone",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert '"daemon.stopped"' in log.read_text()
    assert only_served_by(nginx_server.port, {"b1"})  # the LB is left as it was
