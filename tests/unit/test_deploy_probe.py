"""deploy/systemd/lbsync-probe.service: least privilege, and commands lbsync accepts."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lbsync.cli import build_parser, cmd_probe

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "lbsync-probe.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_prober_runs_without_any_capability_or_writable_path(
    unit: configparser.ConfigParser,
) -> None:
    service = unit["Service"]
    assert service["CapabilityBoundingSet"] == ""
    assert service["AmbientCapabilities"] == ""
    assert "ReadWritePaths" not in service
    assert "StateDirectory" not in service
    for key in ("NoNewPrivileges", "PrivateUsers", "MemoryDenyWriteExecute", "PrivateDevices"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["User"] == "lbsync"
    assert service["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_the_unit_command_is_lbsync_probe(unit: configparser.ConfigParser) -> None:
    binary, *argv = shlex.split(unit["Service"]["ExecStart"])
    assert binary == "/usr/local/bin/lbsync"
    assert build_parser().parse_args(argv).handler is cmd_probe


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    lbsync = Path(sys.executable).parent / "lbsync"
    copy = tmp_path / "lbsync-probe.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/lbsync", str(lbsync)))
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert score is not None, security.stdout[-2000:]
    assert float(score.group(1)) <= 1.5  # 1.1 as written; lbsync.service (capabilities): 2.0
