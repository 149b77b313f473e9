"""Issue 12, per-service guard holds, end to end: real etcd → lbsync daemon → real nginx.

A mass removal in one service is held while the other's changes apply; ``lbsync confirm
--service`` releases one hold, ``lbsync confirm`` all of them; the empty-catalog rule
stays global.

The site proxies to ``upstream app`` (served by backends b1-b3); ``other`` is a second
service whose upstream is checked in the rendered file. Instances to be removed together
share an id prefix (``gone-``) and go in one ``etcdctl del --prefix``: one revision, so
no round can see half the removal (which the guard would rightly let through).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lbsync.cli import main as cli
from lbsync.config import Settings
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import NginxServer
from tests.integration.test_pipeline_nginx import config_file, settings_for

pytestmark = pytest.mark.integration

P = "/lbsync"
OTHER = ("127.0.0.2:8001", "127.0.0.2:8002", "127.0.0.2:8003")
OTHER_IDS = ("keep-1", "gone-2", "gone-3")
APP_IDS = {"b1": "keep-1", "b2": "gone-2", "b3": "gone-3"}


def key(service: str, iid: str) -> str:
    return f"{P}/services/{service}/instances/{iid}"


def remove_most(etcd: EtcdServer, service: str) -> None:
    """Delete two of ``service``'s three instances in one revision."""
    etcd.etcdctl("del", "--prefix", key(service, "gone-"))


def rendered(nginx: NginxServer) -> str:
    return (nginx.conf_d / "upstreams.conf").read_text()


def guarded(settings: Settings, hold: float) -> Settings:
    guard = settings.guard.model_copy(update={"hold": hold})
    return settings.model_copy(update={"guard": guard})


@pytest.fixture
def started(
    etcd: EtcdServer,
    writer: EtcdWriter,
    nginx_server: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
) -> tuple[Settings, NginxServer]:
    """app on b1, b2, b3 and other on three addresses, written before the daemon starts."""
    for backend in backends:
        writer.put(key("app", APP_IDS[backend.name]), f"127.0.0.1:{backend.port}")
    for iid, address in zip(OTHER_IDS, OTHER, strict=True):
        writer.put(key("other", iid), address)
    return settings_for(etcd, nginx_server, tmp_path / "state"), nginx_server


def run_confirm(settings: Settings, tmp_path: Path, service: str | None = None) -> None:
    config = config_file(settings, tmp_path / "lbsync.toml")
    extra = [] if service is None else ["--service", service]
    assert cli(["confirm", "-c", str(config), *extra]) == 0


def test_one_services_mass_removal_is_held_while_another_services_new_instance_is_served(
    started: tuple[Settings, NginxServer], etcd: EtcdServer, writer: EtcdWriter, tmp_path: Path
) -> None:
    settings, nginx = started
    running = RunningDaemon(guarded(settings, hold=3600.0))
    try:
        wait_for(lambda: only_served_by(nginx.port, {"b1", "b2", "b3"}), what="app served")
        remove_most(etcd, "app")
        wait_for(lambda: "app" in running.daemon.guard.holds, what="app's removal held")

        writer.put(key("other", "new-4"), "127.0.0.2:8004")
        wait_for(lambda: "127.0.0.2:8004" in rendered(nginx), what="other's new instance")
        assert only_served_by(nginx.port, {"b1", "b2", "b3"})  # app still at its admitted set
        held = running.daemon.status_document()["held"]
        assert isinstance(held, dict)
        assert list(held["services"]) == ["app"]
        assert "2 of 3" in held["services"]["app"]["reason"]
        assert held["catalog"] is None

        run_confirm(settings, tmp_path, "app")
        wait_for(lambda: only_served_by(nginx.port, {"b1"}), what="app's removal applied")
        assert not running.daemon.guard.holding
        assert "127.0.0.2:8004" in rendered(nginx)
    finally:
        running.stop()


def test_confirming_one_service_leaves_the_other_holds_then_confirm_releases_all(
    started: tuple[Settings, NginxServer], etcd: EtcdServer, writer: EtcdWriter, tmp_path: Path
) -> None:
    settings, nginx = started
    running = RunningDaemon(guarded(settings, hold=3600.0))
    try:
        wait_for(lambda: only_served_by(nginx.port, {"b1", "b2", "b3"}), what="app served")
        remove_most(etcd, "app")
        remove_most(etcd, "other")
        wait_for(lambda: running.daemon.guard.holds.keys() == {"app", "other"}, what="two holds")

        run_confirm(settings, tmp_path, "other")
        wait_for(lambda: OTHER[1] not in rendered(nginx), what="other's removal applied")
        assert OTHER[0] in rendered(nginx)
        assert list(running.daemon.guard.holds) == ["app"]
        assert only_served_by(nginx.port, {"b1", "b2", "b3"})

        run_confirm(settings, tmp_path)
        wait_for(lambda: only_served_by(nginx.port, {"b1"}), what="app's removal applied")
        assert not running.daemon.guard.holding
    finally:
        running.stop()


def test_each_services_hold_expires_on_its_own(
    started: tuple[Settings, NginxServer], etcd: EtcdServer, writer: EtcdWriter
) -> None:
    settings, nginx = started
    running = RunningDaemon(guarded(settings, hold=2.0))
    try:
        wait_for(lambda: only_served_by(nginx.port, {"b1", "b2", "b3"}), what="app served")
        remove_most(etcd, "app")
        wait_for(lambda: "app" in running.daemon.guard.holds, what="app's removal held")
        writer.put(key("other", "new-4"), "127.0.0.2:8004")
        wait_for(lambda: "127.0.0.2:8004" in rendered(nginx), what="other applied meanwhile")

        wait_for(lambda: only_served_by(nginx.port, {"b1"}), what="app released by time")
        assert not running.daemon.guard.holding
    finally:
        running.stop()


def test_an_empty_prefix_is_held_whole_and_only_a_global_confirm_applies_it(
    started: tuple[Settings, NginxServer], etcd: EtcdServer, writer: EtcdWriter, tmp_path: Path
) -> None:
    settings, nginx = started
    running = RunningDaemon(guarded(settings, hold=0.1))
    try:
        wait_for(lambda: only_served_by(nginx.port, {"b1", "b2", "b3"}), what="app served")
        before = rendered(nginx)
        etcd.etcdctl("del", "--prefix", f"{P}/services/")
        wait_for(lambda: running.daemon.guard.catalog_hold is not None, what="the catalog held")

        run_confirm(settings, tmp_path, "app")  # one service's confirm is not enough
        writer.put(f"{P}/unrelated", "tick")  # another round, well past the hold time
        revision = writer.revision()
        wait_for(lambda: running.daemon.catalog.revision >= revision, what="caught up")
        assert running.daemon.guard.catalog_hold is not None
        assert rendered(nginx) == before

        run_confirm(settings, tmp_path)
        wait_for(lambda: "127.0.0.2" not in rendered(nginx), what="the empty catalog applied")
        assert not running.daemon.guard.holding
    finally:
        running.stop()
