import sys

import pytest

from lbsync.commands import run_command
from lbsync.errors import CommandError, ValidationFailed


def test_timeout_is_an_error_naming_the_command() -> None:
    argv = [
        sys.executable,
        "-c",
        "import time, sys; print('started', file=sys.stderr, flush=True); time.sleep(60)",
    ]
    with pytest.raises(CommandError, match=r"timed out after 0\.5s") as info:
        run_command(argv, timeout=0.5)
    assert info.value.command == argv
    assert info.value.returncode is None


def test_failure_keeps_exit_code_and_stderr() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('bad line 3\\n'); sys.exit(4)"]
    with pytest.raises(ValidationFailed) as info:
        run_command(argv, timeout=30, error=ValidationFailed, what="checker refused")
    assert info.value.returncode == 4
    assert "bad line 3" in info.value.stderr
    assert "checker refused (exit 4)" in str(info.value)
    assert info.value.context()["stderr"] == "bad line 3\n"


def test_missing_binary_is_a_clean_error() -> None:
    with pytest.raises(CommandError, match="could not start"):
        run_command(["/nonexistent/lbsync-checker"], timeout=5)


def test_shell_only_when_asked() -> None:
    assert run_command(["echo", "$HOME"], timeout=5).stdout == "$HOME\n"
    assert run_command(["echo", "$((1+1))"], timeout=5, shell=True).stdout == "2\n"
