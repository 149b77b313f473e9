"""Each ``lbsync`` command imports only what it uses (issue 15: start-up).

Every command runs in a fresh interpreter, so a module pulled in at import time is paid by
every ``lbsync --version`` and by every ``lbsync mark`` a health monitor runs. These tests
run the command in a subprocess and look at ``sys.modules`` afterwards, so a top-level
import that brings a heavy package back fails here rather than only in a benchmark."""

from __future__ import annotations

import json
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
