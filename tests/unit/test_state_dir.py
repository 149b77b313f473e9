"""state_dir is lbsync's alone, and the confirm file in it is never a symlink followed."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from lbsync import state_lock
from lbsync.cli import main
from lbsync.config import Settings
from lbsync.config_file import settings_from_dict
from lbsync.daemon import Daemon
from lbsync.errors import ConfigError, StageError
from lbsync.guard import CONFIRM_FILE, confirm_held, confirmed_at
from lbsync.state_dir import prepare_state_dir
from lbsync.testing import FakeDriver

OTHER_UID = 12345


def _settings(tmp_path: Path, state_dir: Path) -> Settings:
    (tmp_path / "t.j2").write_text("{{ services | length }}\n")
    data = {
        "state_dir": str(state_dir),
        "target": [
            {
                "name": "lb",
                "driver": "command",
                "reload_command": ["true"],
                "template": [{"src": str(tmp_path / "t.j2"), "dest": str(tmp_path / "out.conf")}],
            }
        ],
    }
    return settings_from_dict(data, base_dir=tmp_path, source=str(tmp_path / "lbsync.toml"))


def _config_file(tmp_path: Path, state_dir: Path) -> Path:
    (tmp_path / "t.j2").write_text("{{ services | length }}\n")
    path = tmp_path / "lbsync.toml"
    path.write_text(
        f'state_dir = "{state_dir}"\n[[target]]\nname = "lb"\ndriver = "command"\n'
        f'reload_command = ["true"]\n[[target.template]]\nsrc = "t.j2"\n'
        f'dest = "{tmp_path / "out.conf"}"\n'
    )
    return path


def _victim(tmp_path: Path) -> tuple[Path, tuple[int, int, int, bytes]]:
    victim = tmp_path / "elsewhere" / "shadow"
    victim.parent.mkdir()
    victim.write_bytes(b"root:secret\n")
    os.chmod(victim, 0o600)
    os.utime(victim, (1_000_000, 1_000_000))
    return victim, _facts(victim)


def _facts(path: Path) -> tuple[int, int, int, bytes]:
    info = os.lstat(path)
    return info.st_mode, info.st_uid, info.st_mtime_ns, path.read_bytes()


# --- state_dir -------------------------------------------------------------------------------


def test_a_missing_state_dir_is_created_0750_with_its_parents(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "lbsync"

    assert prepare_state_dir(_settings(tmp_path, state)) == state

    info = os.lstat(state)
    assert stat.S_ISDIR(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o750 & ~_umask()
    assert info.st_uid == os.geteuid()


def test_a_private_state_dir_is_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)

    assert prepare_state_dir(_settings(tmp_path, state)) == state


def test_symlinks_before_the_state_dir_itself_are_the_operators(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lbsync").mkdir(mode=0o750)
    (tmp_path / "var").symlink_to(tmp_path / "data")

    assert prepare_state_dir(_settings(tmp_path, tmp_path / "var" / "lbsync"))


def _group_writable(state: Path) -> None:
    state.mkdir()
    os.chmod(state, 0o770)


def _world_writable(state: Path) -> None:
    state.mkdir()
    os.chmod(state, 0o1777)


def _other_owner(state: Path) -> None:
    state.mkdir(mode=0o750)
    os.chown(state, OTHER_UID, OTHER_UID)


def _symlink(state: Path) -> None:
    real = state.with_name("real")
    real.mkdir(mode=0o750)
    state.symlink_to(real)


def _a_file(state: Path) -> None:
    state.write_text("not a directory")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_group_writable, r"is group- or world-writable \(mode 0770\).*chmod go-w"),
        (_world_writable, r"is group- or world-writable \(mode 1777\)"),
        (_other_owner, rf"is owned by uid {OTHER_UID}, not by lbsync's user \(uid \d+\)"),
        (_symlink, r"is a symlink \(to '.*/real'\): give the real directory"),
        (_a_file, r"is not a directory"),
    ],
    ids=["group-writable", "world-writable", "other owner", "symlink", "a file"],
)
def test_an_unsafe_state_dir_is_refused(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    state = tmp_path / "state"
    make(state)
    before = os.lstat(state)

    with pytest.raises(ConfigError, match=message) as info:
        prepare_state_dir(_settings(tmp_path, state))

    assert info.value.field == "state_dir"
    assert info.value.path == str(tmp_path / "lbsync.toml")
    assert str(state) in str(info.value)
    after = os.lstat(state)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid), "left as it was"


@pytest.mark.parametrize("command", [["confirm"], ["render", "--once"]])
def test_the_cli_refuses_an_unsafe_state_dir_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    state = tmp_path / "state"
    _group_writable(state)
    config = _config_file(tmp_path, state)

    assert main([*command, "-c", str(config)]) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"lbsync: {config}: state_dir: {state} is group- or world-writable")
    assert os.listdir(state) == []
    assert not (tmp_path / "out.conf").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the confirm file ------------------------------------------------------------------------


def test_confirm_creates_a_private_file_and_touches_it_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = _settings(tmp_path, state)

    path = confirm_held(settings.state_dir)
    os.utime(path, (1_000_000, 1_000_000))
    confirm_held(settings.state_dir)

    assert path == state / CONFIRM_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 & ~_umask()
    assert path.stat().st_mtime > 1_000_000


def test_confirm_refuses_a_planted_symlink_and_leaves_its_target_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim, before = _victim(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    (state / CONFIRM_FILE).symlink_to(victim)

    with pytest.raises(StageError, match="the confirm file is a symlink: refused"):
        confirm_held(_settings(tmp_path, state).state_dir)
    with state_lock.acquire(state, None):  # a daemon runs: confirm goes as far as the file
        assert main(["confirm", "-c", str(_config_file(tmp_path, state))]) == 1

    assert "confirm file is a symlink" in capsys.readouterr().err
    assert _facts(victim) == before
    assert (state / CONFIRM_FILE).is_symlink()


def test_confirm_refuses_a_dangling_symlink_instead_of_creating_its_target(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    target = tmp_path / "etc" / "cron.d" / "planted"
    target.parent.mkdir(parents=True)
    (state / CONFIRM_FILE).symlink_to(target)

    with pytest.raises(StageError, match="symlink"):
        confirm_held(_settings(tmp_path, state).state_dir)

    assert not target.exists()


def test_the_daemon_reads_the_confirm_time_without_following_a_symlink(tmp_path: Path) -> None:
    victim, _ = _victim(tmp_path)
    os.utime(victim)  # a fresh mtime: what a followed link would report
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    daemon = Daemon(_settings(tmp_path, state), driver_factory=lambda _t: FakeDriver())
    (state / CONFIRM_FILE).symlink_to(victim)

    assert confirmed_at(daemon.settings.state_dir) == 0.0

    (state / CONFIRM_FILE).unlink()
    path = confirm_held(daemon.settings.state_dir)
    assert confirmed_at(daemon.settings.state_dir) == path.stat().st_mtime > 0.0


def test_confirm_service_takes_only_a_service_name_and_writes_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = _config_file(tmp_path, state)

    state.mkdir(mode=0o750)
    with state_lock.acquire(state, None):  # a daemon runs: confirm goes as far as the file
        assert main(["confirm", "-c", str(config), "--service", "../confirm"]) == 1
        assert "not a service name" in capsys.readouterr().err
        assert not (state / CONFIRM_FILE).exists()

        assert main(["confirm", "-c", str(config), "--service", "web"]) == 0
        assert "the held update of 'web'" in capsys.readouterr().out
        assert confirmed_at(state, "web") > 0.0
        assert not (state / CONFIRM_FILE).exists()
