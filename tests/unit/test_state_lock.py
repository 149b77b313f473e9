"""One lbsync per state_dir: the lock, and how run, render --once and confirm use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbsync import state_lock
from lbsync.cli import main
from lbsync.errors import StageError, StateLocked


def _config_file(tmp_path: Path, state_dir: Path) -> Path:
    (tmp_path / "t.j2").write_text("{{ services | length }}\n")
    path = tmp_path / "lbsync.toml"
    path.write_text(
        f'state_dir = "{state_dir}"\n[etcd]\nendpoints = ["http://127.0.0.1:9"]\ntimeout = "1s"\n'
        f'[[target]]\nname = "lb"\ndriver = "command"\nreload_command = ["true"]\n'
        f'[[target.template]]\nsrc = "t.j2"\ndest = "{tmp_path / "out.conf"}"\n'
    )
    return path


def _tree(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``path`` with its inode, mtime and content: 'nothing touched'."""
    found = {}
    for item in sorted(path.rglob("*")):
        if item.is_file():
            info = item.stat()
            found[str(item)] = (info.st_ino, info.st_mtime_ns, item.read_bytes())
    return found


def test_the_holder_writes_its_pid_and_config_and_a_second_one_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "lbsync.toml"
    with state_lock.acquire(tmp_path, config) as lock:
        assert lock.path == tmp_path / state_lock.LOCK_FILE
        line = f"lbsync pid {os.getpid()} (config {config})"
        assert lock.path.read_text() == line + "\n"
        assert state_lock.holder(tmp_path) == line

        with pytest.raises(StateLocked) as info:
            state_lock.acquire(tmp_path, tmp_path / "other.toml")

        assert line in str(info.value)
        assert "\n" not in str(info.value)
        assert info.value.holder == line
    assert state_lock.holder(tmp_path) is None


def test_a_released_lock_is_taken_again_and_rewritten(tmp_path: Path) -> None:
    state_lock.acquire(tmp_path, Path("a.toml")).release()

    with state_lock.acquire(tmp_path, Path("b.toml")) as lock:
        assert "(config b.toml)" in lock.path.read_text()


def test_no_lock_file_means_no_holder(tmp_path: Path) -> None:
    assert state_lock.holder(tmp_path) is None
    assert state_lock.holder(tmp_path / "missing") is None
    assert list(tmp_path.iterdir()) == []


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib\n"
        "from lbsync import state_lock\n"
        "state_lock.acquire(pathlib.Path(sys.argv[1]), None)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "locked\n"
            assert state_lock.holder(tmp_path) == f"lbsync pid {child.pid} (config none)"
        finally:
            child.kill()
            child.wait(timeout=30)

    with state_lock.acquire(tmp_path, None):
        assert state_lock.holder(tmp_path) is not None


def test_a_symlink_at_the_lock_file_is_refused_and_its_target_left_alone(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / state_lock.LOCK_FILE).symlink_to(victim)

    with pytest.raises(StageError, match="the lock file is a symlink: refused"):
        state_lock.acquire(state, None)
    with pytest.raises(StageError, match="symlink"):
        state_lock.holder(state)

    assert victim.read_bytes() == b"keep me\n"


def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / state_lock.LOCK_FILE)

    with pytest.raises(StageError, match="not a regular file"):
        state_lock.acquire(tmp_path, None)


def test_a_second_run_exits_1_in_one_line_naming_the_holder_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = _config_file(tmp_path, state)
    with state_lock.acquire(state, tmp_path / "first.toml"):
        before = _tree(tmp_path)

        assert main(["run", "-c", str(config)]) == 1

        assert _tree(tmp_path) == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"lbsync pid {os.getpid()} (config {tmp_path / 'first.toml'})" in err
    assert not (tmp_path / "out.conf").exists()


def test_render_once_is_refused_while_a_daemon_holds_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = _config_file(tmp_path, state)
    with state_lock.acquire(state, config):
        before = _tree(tmp_path)

        assert main(["render", "--once", "-c", str(config)]) == 1

        assert _tree(tmp_path) == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"is in use by lbsync pid {os.getpid()}" in err


def test_confirm_without_a_daemon_says_so_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = _config_file(tmp_path, state)

    assert main(["confirm", "-c", str(config)]) == 1

    assert capsys.readouterr().err == f"lbsync: no daemon runs on {state}: nothing held\n"
    assert list(state.iterdir()) == []


def test_sighup_cannot_move_the_daemon_to_another_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lbsync.config_file import load_settings
    from lbsync.daemon import Daemon
    from lbsync.testing import FakeDriver

    config = _config_file(tmp_path, tmp_path / "state")
    daemon = Daemon(
        load_settings(config), driver_factory=lambda _t: FakeDriver(), config_path=config
    )
    before = daemon.settings
    _config_file(tmp_path, tmp_path / "elsewhere")

    daemon.reconfigure()

    assert daemon.settings is before
    out = capsys.readouterr().out
    assert "reconfigure.rejected" in out
    assert "restart lbsync to change it" in out
