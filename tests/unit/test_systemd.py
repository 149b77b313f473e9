"""sd_notify: datagrams on a socket the test listens on, as systemd would receive them."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync import systemd


class Listener:
    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> str:
        return self.sock.recv(4096).decode()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """A datagram socket at a filesystem path (short: sun_path is 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lbsync-sd-", dir="/tmp") as tmp:
        path = str(Path(tmp) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield Listener(sock, path)


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog() is False


def test_ready_watchdog_status_stopping(notify_socket: Listener) -> None:
    assert systemd.ready() is True
    assert notify_socket.receive() == "READY=1"
    assert systemd.watchdog() is True
    assert notify_socket.receive() == "WATCHDOG=1"
    assert systemd.status("revision 42,\n3 services") is True
    assert notify_socket.receive() == "STATUS=revision 42, 3 services"  # one line
    assert systemd.stopping() is True
    assert notify_socket.receive() == "STOPPING=1"


def test_ready_with_status_and_reloading(notify_socket: Listener) -> None:
    systemd.ready("synced at revision 7")
    assert notify_socket.receive() == "READY=1\nSTATUS=synced at revision 7"
    systemd.reloading()
    fields = dict(line.split("=", 1) for line in notify_socket.receive().splitlines())
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lbsync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_a_socket_nobody_listens_on_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("WATCHDOG=1") is False


def test_unsupported_socket_kind_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{me}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for someone else
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    env = {k: v.format(me=os.getpid()) for k, v in env.items()}
    assert systemd.watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 1.0
