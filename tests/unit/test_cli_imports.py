"""Each ``lbsync`` command imports only what it uses (issue 15: start-up).

Every command runs in a fresh interpreter, so a module pulled in at import time is paid by
every ``lbsync --version`` and by every ``lbsync mark`` a health monitor runs. These tests
run the command in a subprocess and look at ``sys.modules`` afterwards, so a top-level
import that brings a heavy package back fails here rather than only in a benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lbsync import __version__
from tests.harness.net import free_port

_RUN_AND_LIST_MODULES = """
import json, sys
from lbsync.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""

# Packages no command but the daemon (and render / probe) needs.
_RENDERING = {"jinja2"}
_DAEMON_ONLY = {"prometheus_client", "psutil"}
_PROBER_ONLY = {"aiohttp", "uvloop"}


def _run(*argv: str) -> tuple[object, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    return result["code"], set(result["modules"])


def test_version_imports_neither_pydantic_nor_grpc_nor_jinja2() -> None:
    code, modules = _run("--version")
    assert code == 0
    heavy = {"pydantic", "grpc", "google", "structlog", "importlib_metadata", *_RENDERING}
    assert modules & (heavy | _DAEMON_ONLY | _PROBER_ONLY) == set()


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert version("lbsync") == __version__


def test_status_imports_no_template_engine_metrics_or_prober(tmp_path: Path) -> None:
    config = tmp_path / "lbsync.toml"
    # Nothing listens on the port: status gets as far as the etcd read and fails quickly.
    config.write_text('[etcd]\ntimeout = "300ms"\n[http]\nlisten = "127.0.0.1:1"\n')
    endpoint = f"http://127.0.0.1:{free_port()}"
    code, modules = _run("status", "-c", str(config), "--endpoint", endpoint)
    assert code == 1
    assert "http" in modules  # it did get as far as talking to etcd (the JSON gateway)
    assert modules & (_RENDERING | _DAEMON_ONLY | _PROBER_ONLY) == set()


def test_mark_imports_no_template_engine_metrics_or_prober(tmp_path: Path) -> None:
    config = tmp_path / "lbsync.toml"
    config.write_text('[etcd]\ntimeout = "300ms"\n')
    endpoint = f"http://127.0.0.1:{free_port()}"
    code, modules = _run("mark", "web", "a", "down", "-c", str(config), "--endpoint", endpoint)
    assert code == 1
    assert "grpc" in modules
    assert modules & (_RENDERING | _DAEMON_ONLY | _PROBER_ONLY) == set()


_DAEMON_TO_FIRST_ROUND = """
import importlib, json, sys
from pathlib import Path
from lbsync.config_file import settings_from_dict
from lbsync.daemon import Daemon
from lbsync.testing import FakeSource

tmp = Path(sys.argv[1])
(tmp / "t.j2").write_text("{% for s in services.values() %}{{ s.name }}{% endfor %}\\n")
target = {"driver": "command", "reload_command": ["true"]}
target["template"] = [{"src": str(tmp / "t.j2"), "dest": str(tmp / "out.conf")}]
settings = settings_from_dict(
    {"wait": {"min": "0s", "max": "0s"}, "state_dir": str(tmp / "state"),
     "target": [{"name": "lb", **target}]},
    base_dir=tmp, source="test.toml",
)
source = FakeSource({"services": {"web": {"instances": {"a": "10.0.0.1:80"}}}})
daemon = Daemon(settings, source_factory=lambda _settings: source)
for driver in ("nginx", "haproxy"):  # the LB drivers' modules, as a daemon of each imports
    importlib.import_module(f"lbsync.drivers.{driver}")
daemon._start_source()
while "lb" not in daemon.health.outcomes:
    daemon.step()
daemon._stop_source()
print(json.dumps({"action": daemon.health.outcomes["lb"].action, "modules": sorted(sys.modules)}))
"""


def test_the_daemon_reaches_its_first_round_without_metrics_psutil_or_an_http_server(
    tmp_path: Path,
) -> None:
    """Without ``[http] listen`` nothing serves /metrics: prometheus_client is not even
    imported; psutil only where /proc lacks something; http.server only to serve; nginx's
    runtime mode only for a target that has it."""
    done = subprocess.run(
        [sys.executable, "-c", _DAEMON_TO_FIRST_ROUND, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["action"] == "reloaded"
    modules = set(result["modules"])
    assert "lbsync.drivers.nginx.driver" in modules  # it did import the drivers
    lazy = {"prometheus_client", "psutil", "http.server", "socketserver", "lbsync.http"}
    lazy.add("lbsync.drivers.nginx.runtime")  # nginx's runtime mode, off by default
    assert modules & lazy == set()


_SPY_PLUGIN = """
class _Spy:
    def new_schema_validator(self, *args, **kwargs):
        return None, None, None


plugin = _Spy()
"""

_IMPORT_AND_LIST_PLUGIN_MODULES = """
import json, sys
if sys.argv[1] == "command":
    from lbsync.cli import main
    main(["mark", "web", "a", "down", "-c", sys.argv[2], "--endpoint", sys.argv[3]])
else:
    import lbsync.config
print(json.dumps({m: m in sys.modules for m in ("spy_plugin", "importlib.metadata")}))
"""


def _plugin_modules(tmp_path: Path, how: str) -> dict[str, bool]:
    """Which of the spy plugin and importlib.metadata a fresh interpreter imported, with a
    pydantic plugin installed (a distribution on the path whose entry point names it)."""
    (tmp_path / "spy_plugin.py").write_text(_SPY_PLUGIN)
    dist = tmp_path / "spy_plugin-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: spy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pydantic]\nspy = spy_plugin:plugin\n")
    config = tmp_path / "lbsync.toml"
    config.write_text('[etcd]\ntimeout = "300ms"\n')
    endpoint = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_AND_LIST_PLUGIN_MODULES, how, str(config), endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )
    result: dict[str, bool] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_a_command_loads_no_pydantic_plugin_nor_importlib_metadata(tmp_path: Path) -> None:
    """pydantic's plugin loader costs ~13 ms of every command's start, and a plugin would run
    another package's code on every validation of what etcd holds."""
    modules = _plugin_modules(tmp_path, "command")
    assert modules == {"spy_plugin": False, "importlib.metadata": False}


def test_a_program_that_imports_lbsync_keeps_its_pydantic_plugins(tmp_path: Path) -> None:
    modules = _plugin_modules(tmp_path, "library")
    assert modules == {"spy_plugin": True, "importlib.metadata": True}
