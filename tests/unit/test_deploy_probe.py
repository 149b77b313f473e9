"""deploy/systemd/lbsync-probe.service: least privilege, and commands lbsync accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from lbsync.cli import build_parser, cmd_probe
from tests.unit.test_deploy import SYSTEMD_ANALYZE, read_unit, verified_exposure

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "lbsync-probe.service"


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    return read_unit(UNIT)


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
    # 1.1 as written; lbsync.service (capabilities): 2.0
    assert verified_exposure(UNIT, tmp_path) <= 1.5
