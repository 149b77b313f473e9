"""HAProxy admin-socket commands: built only from arguments that pass the grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog.testing

from lbsync.drivers.haproxy import admin_commands as cmd
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.errors import DriverError
from lbsync.model import Instance, State
from tests.unit.test_haproxy_driver import inst, snap, svc, target

INJECTIONS = [
    "10.0.0.1\nshutdown sessions server web/s2",
    "10.0.0.1; disable frontend www",
    "fe80::1%x;disable frontend www",  # ipaddress accepts any scope id
    "fe80::1%eth0",
    "host name",
    "",
    "10.0.0.1 ",
    "[::1]",
    "a" * 64 + ".example",
]


def test_valid_arguments_make_the_commands() -> None:
    drain = cmd.set_server_state("web", "s1", "drain", target="lb")
    assert drain == "set server web/s1 state drain"
    assert (
        cmd.set_server_addr("web", "s1", "10.0.0.1", 8080, target="lb")
        == "set server web/s1 addr 10.0.0.1 port 8080"
    )
    assert (
        cmd.set_server_addr("be.api-v2", "s12", "2001:db8::1", 1, target="lb")
        == "set server be.api-v2/s12 addr 2001:db8::1 port 1"
    )
    assert (
        cmd.set_server_addr("web", "s1", "app-1.internal.example", 65535, target="lb")
        == "set server web/s1 addr app-1.internal.example port 65535"
    )
    assert cmd.set_weight("web", "s1", 0, target="lb") == "set weight web/s1 0"
    assert cmd.set_weight("web", "s1", 256, target="lb") == "set weight web/s1 256"
    assert cmd.show_servers_state("web", target="lb") == "show servers state web"


@pytest.mark.parametrize("host", INJECTIONS)
def test_a_bad_host_is_refused_and_quoted(host: str) -> None:
    with pytest.raises(DriverError, match="invalid host") as caught:
        cmd.set_server_addr("web", "s1", host, 8080, target="lb")
    assert repr(host) in str(caught.value)


@pytest.mark.parametrize("name", ["web\nshow info", "web;x", "web x", "", "w/b", "é", "a" * 129])
def test_a_bad_backend_or_server_name_is_refused(name: str) -> None:
    with pytest.raises(DriverError, match="invalid backend"):
        cmd.set_weight(name, "s1", 1, target="lb")
    with pytest.raises(DriverError, match="invalid server"):
        cmd.set_server_state("web", name, "ready", target="lb")
    with pytest.raises(DriverError, match="invalid backend"):
        cmd.show_servers_state(name, target="lb")


@pytest.mark.parametrize("port", [0, 65536, -1, True, 8080.0, "8080"])
def test_a_bad_port_is_refused(port: object) -> None:
    with pytest.raises(DriverError, match="invalid port"):
        cmd.set_server_addr("web", "s1", "10.0.0.1", port, target="lb")  # type: ignore[arg-type]


@pytest.mark.parametrize("weight", [-1, 257, False, "1", 1.0])
def test_a_bad_weight_is_refused(weight: object) -> None:
    with pytest.raises(DriverError, match="invalid weight"):
        cmd.set_weight("web", "s1", weight, target="lb")  # type: ignore[arg-type]


@pytest.mark.parametrize("state", ["up", "READY", "ready; shutdown", ""])
def test_a_bad_state_is_refused(state: str) -> None:
    with pytest.raises(DriverError, match="invalid state"):
        cmd.set_server_state("web", "s1", state, target="lb")


class RecordingSocket:
    """Stands in for the admin socket: records every line the driver would send."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def query(self, command: str) -> str:
        self.sent.append(command)
        return ""


def test_an_injected_host_never_reaches_the_admin_socket(tmp_path: Path) -> None:
    driver = HaproxyDriver(target(tmp_path))
    socket = RecordingSocket()
    driver._admin = lambda: socket  # type: ignore[assignment,method-assign,return-value]
    old = snap(1, svc("web", inst("a")))
    driver.template_context(old)  # the slots as rendered for the applied snapshot
    evil = Instance.model_construct(
        id="b",
        host="fe80::1%x;disable frontend www",  # built directly: the catalog never saw it
        port=8000,
        weight=1,
        state=State.UP,
        registered_state=State.UP,
        health=None,
        meta={},
    )
    new = snap(2, svc("web", inst("a"), evil))
    with structlog.testing.capture_logs() as events:
        assert driver.runtime_update(old, new) is False
    assert socket.sent == []
    assert "invalid host" in events[-1]["reason"]
    assert "disable frontend www" in events[-1]["reason"]  # quoted, not run
