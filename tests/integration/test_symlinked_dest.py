"""Issue 17 end to end: a symlink planted at a destination never redirects lbsync's write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lbsync.config import TemplateSettings
from lbsync.config_file import settings_from_dict
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import UPSTREAMS_TEMPLATE, NginxServer
from tests.integration.test_pipeline_nginx import instance, key, settings_for

pytestmark = pytest.mark.integration


def _root_only_file(tmp_path: Path) -> tuple[Path, tuple[int, int, int, int, bytes]]:
    victim = tmp_path / "elsewhere" / "shadow"
    victim.parent.mkdir()
    victim.write_bytes(b"root:secret\n")
    os.chmod(victim, 0o600)
    return victim, _facts(victim)


def _facts(path: Path) -> tuple[int, int, int, int, bytes]:
    info = os.lstat(path)
    return info.st_ino, info.st_mode, info.st_uid, info.st_mtime_ns, path.read_bytes()


def test_a_planted_symlink_dest_fails_the_round_and_nothing_is_written_or_reloaded(
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    tmp_path: Path,
    backends: list[Backend],
) -> None:
    live = nginx_server
    victim, before = _root_only_file(tmp_path)
    dest = live.conf_d / "upstreams.conf"
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    running = RunningDaemon(settings_for(etcd, live, tmp_path / "state"))
    try:
        wait_for(lambda: only_served_by(live.port, {"b1"}) and live.settled(), what="b1 served")
        workers = live.worker_pids()
        dest.unlink()
        dest.symlink_to(victim)  # what a local user who can write to conf.d could do

        writer.put(key("app", "instances", "b2"), instance(backends[1]))
        wait_for(lambda: running.outcome() == "failed", what="the round refused")

        error = running.daemon.health.outcomes["nginx-test"].error
        assert "is a symlink" in str(error)
        assert str(victim) in str(error)
        assert _facts(victim) == before
        assert dest.is_symlink()
        assert live.worker_pids() == workers, "nginx was not reloaded"
        assert only_served_by(live.port, {"b1"})
    finally:
        running.stop()


def test_a_dest_symlinked_on_purpose_is_followed_when_the_template_says_so(
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    tmp_path: Path,
    backends: list[Backend],
) -> None:
    live = nginx_server
    shared = tmp_path / "shared-volume"
    shared.mkdir()
    real = shared / "upstreams.conf"
    dest = live.conf_d / "upstreams.conf"
    os.replace(dest, real)
    dest.symlink_to(real)
    settings = settings_for(etcd, live, tmp_path / "state")
    target = settings.targets[0].model_copy(
        update={
            "templates": [TemplateSettings(src=UPSTREAMS_TEMPLATE, dest=dest, follow_symlinks=True)]
        }
    )
    data = settings.model_dump(by_alias=True, mode="json", exclude={"targets"})
    data["target"] = [target.model_dump(by_alias=True, mode="json")]
    settings = settings_from_dict(data, base_dir=tmp_path, source="test")
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    running = RunningDaemon(settings)
    try:
        wait_for(lambda: only_served_by(live.port, {"b1"}) and live.settled(), what="b1 served")
        writer.put(key("app", "instances", "b2"), instance(backends[1]))
        wait_for(lambda: only_served_by(live.port, {"b1", "b2"}), what="b1 and b2 served")

        assert running.outcome() == "reloaded"
        assert dest.is_symlink()
        assert os.readlink(dest) == str(real)
        assert f":{backends[1].port}" in real.read_text()
    finally:
        running.stop()
