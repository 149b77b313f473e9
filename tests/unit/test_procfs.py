"""The /proc readers the nginx driver uses instead of psutil, on real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.drivers import procfs
from tests.harness.net import wait_for


@pytest.fixture
def odd_sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep`` whose process name has a space and a parenthesis in it."""
    binary = tmp_path / "sl ee) p"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_stat_reads_name_state_and_start_time(odd_sleeper: subprocess.Popen[bytes]) -> None:
    found = wait_for(  # the name is set by exec, which may still be under way
        lambda: (
            (stat := procfs.stat(odd_sleeper.pid)) is not None and stat.name == "sl ee) p" and stat
        ),
        what="the exec'd name",
    )

    assert found.pid == odd_sleeper.pid
    assert found.alive
    assert found.started > 0
    again = procfs.stat(odd_sleeper.pid)
    assert again is not None
    assert (again.name, again.started) == (found.name, found.started)  # names this process


def test_title_and_children(odd_sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    # Right after exec the command line can read empty for a moment (seen under load).
    wanted = f"{tmp_path / 'sl ee) p'} 30"
    wait_for(lambda: procfs.title(odd_sleeper.pid) == wanted, what=f"title {wanted!r}")
    assert odd_sleeper.pid in procfs.children(os.getpid())
    assert procfs.children(odd_sleeper.pid) == []


def test_a_dead_process_reads_as_gone() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()

    assert procfs.stat(proc.pid) is None
    assert procfs.title(proc.pid) is None
    assert procfs.children(proc.pid) == []


def test_a_zombie_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    try:
        zombie = wait_for(
            lambda: (found := procfs.stat(proc.pid)) is not None and not found.alive and found,
            what="`true` to exit (not yet reaped)",
        )
        assert zombie.state == "Z"
    finally:
        proc.wait()
