"""Issue 2 end to end: real etcd → lbsync daemon → real nginx → real backends, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.cli import main as cli
from lbsync.config import Settings
from lbsync.config_file import settings_from_dict
from lbsync.source.writer import EtcdWriter
from tests.harness.backends import Backend, http_get, only_served_by
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for
from tests.harness.nginx import UPSTREAMS_TEMPLATE, NginxServer

pytestmark = pytest.mark.integration

P = "/lbsync"


def instance(backend: Backend) -> str:
    return f"127.0.0.1:{backend.port}"


def key(service: str, kind: str, iid: str) -> str:
    return f"{P}/services/{service}/{kind}/{iid}"


def settings_for(
    etcd: EtcdServer,
    nginx: NginxServer,
    state_dir: Path,
    template: Path = UPSTREAMS_TEMPLATE,
    **sections: object,
) -> Settings:
    """``sections``: more top-level tables of lbsync.toml (``reconcile={...}``)."""
    target = nginx.target((template, nginx.conf_d / "upstreams.conf"))
    data = {
        "etcd": {"endpoints": [etcd.endpoint], "prefix": P},
        "wait": {"min": "0s", "max": "0s"},
        **sections,
        "state_dir": str(state_dir),
        "target": [target.model_dump(by_alias=True, mode="json")],
    }
    return settings_from_dict(data, base_dir=state_dir, source="test")


def config_file(settings: Settings, path: Path) -> Path:
    """The same settings as a TOML file, for CLI tests."""
    target = settings.targets[0]
    template = target.templates[0]
    path.write_text(
        f'state_dir = "{settings.state_dir}"\n'
        f'[etcd]\nendpoints = ["{settings.etcd.endpoints[0]}"]\nprefix = "{P}"\n'
        f'[[target]]\nname = "{target.name}"\ndriver = "nginx"\nconfig = "{target.config}"\n'
        f'pid_file = "{target.pid_file}"\nprefix = "{target.prefix}"\n'
        f'error_log = "{target.error_log}"\n'
        f'[[target.template]]\nsrc = "{template.src}"\ndest = "{template.dest}"\n'
    )
    return path


@pytest.fixture
def live(nginx_server: NginxServer) -> NginxServer:
    return nginx_server


@pytest.fixture
def settings(etcd: EtcdServer, live: NginxServer, tmp_path: Path) -> Settings:
    return settings_for(etcd, live, tmp_path / "state")


@pytest.fixture
def daemon(settings: Settings) -> Iterator[RunningDaemon]:
    running = RunningDaemon(settings)
    yield running
    running.stop()


def serving(port: int, expected: set[str]) -> bool:
    return only_served_by(port, expected)


def test_instances_up_are_served_and_down_ones_are_not(
    daemon: RunningDaemon, writer: EtcdWriter, live: NginxServer, backends: list[Backend]
) -> None:
    b1, b2, b3 = backends
    writer.put(key("app", "instances", "b1"), instance(b1))
    writer.put(key("app", "instances", "b2"), f'{{"host": "127.0.0.1", "port": {b2.port}}}')
    wait_for(lambda: serving(live.port, {"b1", "b2"}), what="b1 and b2 served")

    writer.put(key("app", "health", "b2"), '{"status": "down", "reason": "5xx", "by": "monitor"}')
    wait_for(lambda: serving(live.port, {"b1"}), what="b2 out after health mark")

    writer.delete(key("app", "instances", "b1"))
    writer.put(key("app", "instances", "b3"), instance(b3))
    wait_for(lambda: serving(live.port, {"b3"}), what="b1 deleted, b3 in")

    writer.delete(key("app", "health", "b2"))
    wait_for(lambda: serving(live.port, {"b2", "b3"}), what="b2 back when the mark is cleared")


def test_expired_lease_takes_the_instance_out(
    daemon: RunningDaemon, writer: EtcdWriter, live: NginxServer, backends: list[Backend]
) -> None:
    b1, b2, _ = backends
    writer.put(key("app", "instances", "b1"), instance(b1))
    writer.put(key("app", "instances", "b2"), instance(b2), ttl=2)
    wait_for(lambda: serving(live.port, {"b1", "b2"}), what="both served")
    wait_for(lambda: serving(live.port, {"b1"}), what="b2 gone when its lease expires")


HOSTILE = {
    "semicolon": "10.0.0.1:80; include /etc/passwd",
    "newline": '{"host": "10.0.0.1\\n}\\nserver { listen 9999; }", "port": 80}',
    "huge-port": '{"host": "10.0.0.1", "port": 700000}',
    "unicode": '{"host": "bäckend.example", "port": 80}',
    "brace": '{"host": "10.0.0.1", "port": 80, "meta": {"x": "}"}}',
}


def test_hostile_values_never_reach_nginx_conf_and_cause_no_reload(
    daemon: RunningDaemon, writer: EtcdWriter, live: NginxServer, backends: list[Backend]
) -> None:
    writer.put(key("app", "instances", "good"), instance(backends[0]))
    wait_for(lambda: serving(live.port, {"b1"}) and live.settled(), what="good instance served")
    workers = live.worker_pids()
    rendered = (live.conf_d / "upstreams.conf").read_text()

    for name, value in HOSTILE.items():
        writer.put(key("app", "instances", name), value)
    wait_for(lambda: daemon.caught_up(writer), what="daemon caught up")
    wait_for(lambda: len(daemon.daemon.catalog.rejected) == len(HOSTILE), what="all rejected")

    assert (live.conf_d / "upstreams.conf").read_text() == rendered
    assert live.worker_pids() == workers  # nothing changed, so no reload
    assert serving(live.port, {"b1"})


def test_template_error_leaves_files_and_nginx_untouched(
    etcd: EtcdServer,
    writer: EtcdWriter,
    live: NginxServer,
    tmp_path: Path,
    backends: list[Backend],
) -> None:
    template = tmp_path / "needs-key.conf.j2"
    template.write_text(
        "upstream app {\n{% for i in services.app.up %}\n"
        "    server {{ i.address }};\n{% endfor %}\n"
        "    # {{ getv('/required') }}\n}\n"
    )
    before = (live.conf_d / "upstreams.conf").read_bytes()
    workers = live.worker_pids()
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    running = RunningDaemon(settings_for(etcd, live, tmp_path / "state", template))
    try:
        wait_for(lambda: running.outcome() == "failed", what="render failure")
        error = running.daemon.health.outcomes["nginx-test"].error
        assert "needs-key.conf.j2:5" in str(error)
        assert (live.conf_d / "upstreams.conf").read_bytes() == before
        assert live.worker_pids() == workers
        writer.put(f"{P}/required", "present")
        wait_for(lambda: serving(live.port, {"b1"}), what="served once the template renders")
    finally:
        running.stop()


def test_nginx_check_failure_leaves_files_and_nginx_untouched(
    etcd: EtcdServer,
    writer: EtcdWriter,
    live: NginxServer,
    tmp_path: Path,
    backends: list[Backend],
) -> None:
    template = tmp_path / "fragile.conf.j2"
    template.write_text(
        "upstream app {\n{% for i in services.app.up %}\n"
        "    server {{ i.address }};\n{% endfor %}\n"
        "{% if services.app.settings.get('broken') %}\n    no_such_directive on;\n{% endif %}\n}\n"
    )
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    running = RunningDaemon(settings_for(etcd, live, tmp_path / "state", template))
    try:
        wait_for(lambda: serving(live.port, {"b1"}) and live.settled(), what="b1 served")
        before = (live.conf_d / "upstreams.conf").read_bytes()
        workers = live.worker_pids()
        writer.put(f"{P}/services/app/settings", '{"broken": true}')
        writer.put(key("app", "instances", "b2"), instance(backends[1]))
        wait_for(lambda: running.caught_up(writer), what="a round on the refused change")
        latest = running.latest()
        assert latest is not None
        # app's own change is refused: app is held back at what nginx runs, nothing fails
        assert latest.action == "unchanged"
        assert "no_such_directive" in str(latest.held["app"].error)
        assert (live.conf_d / "upstreams.conf").read_bytes() == before
        assert live.worker_pids() == workers
        assert serving(live.port, {"b1"})
    finally:
        running.stop()


POISONABLE = """\
{% for s in services.values() %}
upstream {{ s.name }} {
{% for i in s.up %}
    server {{ i.address }};
{% else %}
    server 127.0.0.1:1 down;
{% endfor %}
    # share {{ 100 // s.settings.get('div', 1) }}
}
{% endfor %}
"""


def test_a_poisoned_service_does_not_stop_another_services_health_mark(
    etcd: EtcdServer,
    writer: EtcdWriter,
    live: NginxServer,
    tmp_path: Path,
    backends: list[Backend],
) -> None:
    """``div`` = 0 passes value validation but makes this template raise for that service."""
    b1, b2, b3 = backends
    template = tmp_path / "poisonable.conf.j2"
    template.write_text(POISONABLE)
    writer.put(key("app", "instances", "b1"), instance(b1))
    writer.put(key("app", "instances", "b2"), instance(b2))
    writer.put(key("other", "instances", "b3"), instance(b3))
    running = RunningDaemon(settings_for(etcd, live, tmp_path / "state", template))
    try:
        wait_for(lambda: serving(live.port, {"b1", "b2"}), what="b1 and b2 served")
        writer.put(f"{P}/services/other/settings", '{"div": 0}')
        wait_for(lambda: running.caught_up(writer), what="a round on the poisoned service")
        writer.put(key("app", "health", "b2"), '{"status": "down", "reason": "5xx"}')

        wait_for(lambda: serving(live.port, {"b1"}), what="b2 out although 'other' fails")
        wait_for(lambda: running.caught_up(writer), what="the daemon to catch up")
        status = running.daemon.status_document()["targets"]["nginx-test"]
        assert status["action"] in ("reloaded", "unchanged")
        held = status["held"]["other"]
        assert held["keys"] == ["/services/other/settings"]
        assert "ZeroDivisionError" in held["error"]
        assert "share 100" in (live.conf_d / "upstreams.conf").read_text()

        writer.put(f"{P}/services/other/settings", '{"div": 4}')
        wait_for(
            lambda: "share 25" in (live.conf_d / "upstreams.conf").read_text(),
            what="'other' applied once fixed",
        )
        wait_for(lambda: running.caught_up(writer), what="the daemon to catch up")
        assert running.daemon.status_document()["targets"]["nginx-test"]["held"] == {}
    finally:
        running.stop()


def test_empty_service_renders_a_valid_placeholder(
    daemon: RunningDaemon, writer: EtcdWriter, live: NginxServer, backends: list[Backend]
) -> None:
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    wait_for(lambda: serving(live.port, {"b1"}), what="b1 served")
    writer.delete(key("app", "instances", "b1"))
    writer.put(f"{P}/services/app/settings", '{"balance": "least_conn"}')  # service remains
    wait_for(lambda: daemon.caught_up(writer), what="daemon caught up")
    assert daemon.outcome() == "reloaded"
    text = (live.conf_d / "upstreams.conf").read_text()
    assert "server 127.0.0.1:1 down;" in text
    wait_for(lambda: http_get(live.port)[0] == 502, what="502 from the placeholder")


def test_dry_run_writes_and_reloads_nothing_then_once_applies(
    settings: Settings,
    writer: EtcdWriter,
    live: NginxServer,
    backends: list[Backend],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = config_file(settings, tmp_path / "lbsync.toml")
    writer.put(key("app", "instances", "b1"), instance(backends[0]))
    before = (live.conf_d / "upstreams.conf").read_bytes()
    workers = live.worker_pids()

    assert cli(["render", "--dry-run", "-c", str(config)]) == 2
    out = capsys.readouterr().out
    assert f"+    server 127.0.0.1:{backends[0].port} weight=1;" in out
    assert "validator: accepted" in out
    assert f"etcd revision {writer.revision()}" in out
    assert (live.conf_d / "upstreams.conf").read_bytes() == before
    assert live.worker_pids() == workers

    assert cli(["render", "--once", "-c", str(config)]) == 0
    wait_for(lambda: serving(live.port, {"b1"}), what="served after --once")

    assert cli(["render", "--dry-run", "-c", str(config)]) == 0
    assert "0 file(s) would change" in capsys.readouterr().out


def test_dry_run_reports_a_refused_config_with_exit_1(
    settings: Settings,
    writer: EtcdWriter,
    live: NginxServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = config_file(settings, tmp_path / "lbsync.toml")
    writer.put(key("app", "instances", "dns"), '{"host": "no-such-host.invalid", "port": 80}')
    assert cli(["render", "--dry-run", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "validator: refused" in out
    assert "no-such-host.invalid" in out
