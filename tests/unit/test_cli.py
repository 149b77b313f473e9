import subprocess
import sys
from pathlib import Path

import pytest

from lbsync import __version__
from lbsync.cli import main

CONFIG = """
state_dir = "{tmp}/state"
[[target]]
name = "lb"
driver = "command"
reload_command = ["true"]
  [[target.template]]
  src = "t.j2"
  dest = "{tmp}/out.conf"
"""


def write_config(tmp_path: Path, template: str = "{{ services | length }}\n") -> Path:
    (tmp_path / "t.j2").write_text(template)
    path = tmp_path / "lbsync.toml"
    path.write_text(CONFIG.format(tmp=tmp_path))
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "render", "check", "register", "mark"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"lbsync {command}" in capsys.readouterr().out


def test_check_compiles_templates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(write_config(tmp_path))]) == 0
    assert "ok  lb:" in capsys.readouterr().out


def test_check_reports_template_syntax_error_with_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "fine\n{% if %}\n")
    assert main(["check", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lbsync: ")
    assert "t.j2:2" in err


def test_bad_config_is_one_message_and_exit_1_without_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('reload_command = ["true"]', "reload_command = 7"))
    done = subprocess.run(
        [sys.executable, "-m", "lbsync", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert str(config) in done.stderr
    assert "target[0] (name='lb').reload_command" in done.stderr
    assert "7" in done.stderr


def test_missing_config_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.toml")]) == 1
    assert "nope.toml: no such file" in capsys.readouterr().err


def test_register_refuses_values_lbsync_would_reject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["register", "-c", str(tmp_path / "none.toml"), "--service", "web", "--id", "a"]
    assert main([*argv, "--host", "10.0.0.1;", "--port", "80"]) == 1
    assert "host must be an IP address or a DNS name" in capsys.readouterr().err
    assert main(["mark", "-c", str(tmp_path / "none.toml"), "bad name", "a", "down"]) == 1
    assert "service name 'bad name'" in capsys.readouterr().err


def test_mark_offers_every_state_and_only_those() -> None:
    from lbsync.cli import MARK_STATES
    from lbsync.model import State

    assert sorted(MARK_STATES) == sorted(s.value for s in State)


@pytest.mark.parametrize(("command", "held"), [("run", True), ("check", False)])
def test_run_holds_the_collector_before_logging_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, held: bool
) -> None:
    """``run`` holds the cyclic collector from before structlog is imported (its
    collections were ~2.5 ms of start-up); other commands leave it alone."""
    import lbsync.logging
    from lbsync import cli, memory

    calls: list[str] = []
    monkeypatch.setattr(memory, "hold", lambda: calls.append("hold"))
    monkeypatch.setattr(lbsync.logging, "configure_logging", lambda *args: calls.append("logging"))
    monkeypatch.setattr(cli, "cmd_run", lambda args: calls.append("run") or 0)
    monkeypatch.setattr(cli, "cmd_check", lambda args: calls.append("check") or 0)
    assert main([command, "-c", str(write_config(tmp_path))]) == 0
    assert calls == (["hold", "logging", "run"] if held else ["logging", "check"])
