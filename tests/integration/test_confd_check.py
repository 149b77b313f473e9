"""A migrated confd directory against a real etcd: ``migrate-confd --check`` shows no diff
where confd's output is current and the change where a key moved on; the daemon run on
the migrated config writes what confd would have written, before and after a change."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbsync.cli import EXIT_OK, EXIT_PENDING, main
from lbsync.confd import migrate
from lbsync.confd.resources import read_resources
from lbsync.confd.store import go_path_join
from lbsync.config import EtcdSettings
from lbsync.config_file import load_settings
from lbsync.source import EtcdWriter
from tests.confd.reference import FIXTURES, GoRender, fixture_keys, go_render
from tests.harness.daemon import RunningDaemon
from tests.harness.etcd import EtcdServer
from tests.harness.net import wait_for

__all__ = ["go_render"]  # the fixture, imported to be used here

pytestmark = pytest.mark.integration


@pytest.fixture
def confdir(tmp_path: Path, etcd: EtcdServer) -> Path:
    """The fixture confd directory, pointed at this etcd and at dests under tmp_path.

    Its check commands become ``test -s`` (nginx -t cannot check an upstreams fragment
    alone) and its reload commands ``true``: these tests are about what is written.
    """
    root = tmp_path / "confd"
    shutil.copytree(FIXTURES, root)
    config = root / "confd.toml"
    config.write_text(config.read_text().replace("127.0.0.1:2379", etcd.endpoint.split("//")[1]))
    for resource in (root / "conf.d").glob("*.toml"):
        text = resource.read_text()
        text = re.sub(r'dest = "/etc/[^"]*/([^/"]+)"', f'dest = "{tmp_path}/live/\\1"', text)
        text = re.sub(r'check_cmd = "[^"]*"', 'check_cmd = "test -s {{.src}}"', text)
        text = re.sub(r'reload_cmd = "[^"]*"', 'reload_cmd = "true"', text)
        resource.write_text(text)
    (tmp_path / "live").mkdir()
    return root


@pytest.fixture
def writer(etcd: EtcdServer) -> Iterator[EtcdWriter]:
    with EtcdWriter(EtcdSettings(endpoints=[etcd.endpoint], prefix="/production")) as w:
        yield w


def confd_writes(go_render: GoRender, confdir: Path, keys: dict[str, str]) -> None:
    """What confd would have written to each dest: Go's render of the original template."""
    for resource in read_resources(confdir):
        prefix = go_path_join("/production", resource.prefix)
        output = go_render(confdir / "templates" / resource.src, keys, prefix, resource.keys)
        Path(resource.dest).write_bytes(output)


def test_check_shows_no_diff_then_the_change_of_a_key(
    go_render: GoRender,
    confdir: Path,
    writer: EtcdWriter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = fixture_keys()
    for key, value in keys.items():
        writer.put(key, value)
    confd_writes(go_render, confdir, keys)

    args = ["migrate-confd", "--confdir", str(confdir), "--check", "--out"]
    assert main([*args, str(tmp_path / "first")]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "---" not in printed
    assert "+++" not in printed

    writer.put("/production/upstreams/web/a", "10.0.0.7:8080")
    assert main([*args, str(tmp_path / "second")]) == EXIT_PENDING
    diff = capsys.readouterr().out
    assert "-    server 10.0.0.1:8080;" in diff
    assert "+    server 10.0.0.7:8080;" in diff
    assert "upstreams.conf" in diff
    assert "haproxy.cfg" not in diff


def test_the_daemon_keeps_a_migrated_config_writing_what_confd_would(
    go_render: GoRender, confdir: Path, writer: EtcdWriter, tmp_path: Path
) -> None:
    """The migrated config run by the daemon: every file equals Go's render of the original
    template, before and after a change in etcd."""
    keys = fixture_keys()
    for key, value in keys.items():
        writer.put(key, value)
    config = migrate.write(migrate.convert(confdir), tmp_path / "migrated")
    settings = load_settings(config).model_copy(update={"state_dir": tmp_path / "state"})
    resources = read_resources(confdir)

    def confd_would_write() -> Callable[[], bool]:
        """A probe: every dest holds Go's render of the original over ``keys`` as they are."""
        expected = {}
        for resource in resources:
            prefix = go_path_join("/production", resource.prefix)
            src = confdir / "templates" / resource.src
            expected[Path(resource.dest)] = go_render(src, keys, prefix, resource.keys)
        return lambda: all(d.exists() and d.read_bytes() == b for d, b in expected.items())

    running = RunningDaemon(settings)
    try:
        wait_for(confd_would_write(), what="the first round writes confd's bytes")
        keys["/production/lb/haproxy/backends/static/s2"] = "10.0.2.2:80"
        writer.put("/production/lb/haproxy/backends/static/s2", "10.0.2.2:80")
        wait_for(confd_would_write(), what="a new server reaches haproxy.cfg")
        assert b"10.0.2.2:80" in (tmp_path / "live" / "haproxy.cfg").read_bytes()
    finally:
        running.stop()
