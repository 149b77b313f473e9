"""The HAProxy reconcile tick against a real HAProxy: what it reads in full, and that a
change behind lbsync's back is found within the documented bound (docs/haproxy.md).

Each test calls ``repair_runtime`` directly, one call per tick; nothing waits for time
except the volatile-column test, which polls HAProxy until its clock column moved.
"""

from __future__ import annotations

import math
import re

import pytest

import lbsync.drivers.haproxy.driver as haproxy_driver
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.runtime import Plan
from lbsync.model import Snapshot
from tests.harness.backends import Backend, inst
from tests.harness.haproxy import HaproxyServer
from tests.harness.net import free_port, wait_for
from tests.integration.test_haproxy_driver import make_driver, serves, service, snap, start

pytestmark = pytest.mark.integration

_SHOWN = re.compile(r"show servers state (\S+)")


class Ticks:
    """A driver whose ticks record the backends each one read in full and compared
    server by server."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read: list[list[str]] = []
        self.compared: list[list[str]] = []
        ask_all, apply_plans = haproxy_driver.ask_all, haproxy_driver.apply_plans

        def ask_spy(admin: Cli, commands: list[str], *, target: str) -> list[bytes]:
            self.read[-1] += [m[1] for c in commands if (m := _SHOWN.fullmatch(c))]
            return ask_all(admin, commands, target=target)

        def apply_spy(admin: Cli, plans: list[Plan]) -> int:
            self.compared[-1] += [p.backend for p in plans]
            return apply_plans(admin, plans)

        monkeypatch.setattr(haproxy_driver, "ask_all", ask_spy)
        monkeypatch.setattr(haproxy_driver, "apply_plans", apply_spy)

    def tick(self, driver: HaproxyDriver, applied: Snapshot) -> bool:
        self.read.append([])
        self.compared.append([])
        return driver.repair_runtime(applied)


def two_services(
    haproxy: HaproxyServer, backends: list[Backend], **overrides: object
) -> tuple[HaproxyDriver, Snapshot]:
    b1, b2, b3 = backends
    driver = make_driver(haproxy, **overrides)
    web, api = free_port(), free_port()
    applied = snap(1, service("web", web, inst(b1), inst(b2)), service("api", api, inst(b3)))
    start(haproxy, driver, applied)
    serves(web, {"b1", "b2"})
    serves(api, {"b3"})
    return driver, applied


def slots(haproxy: HaproxyServer, backend: str) -> int:
    return len(haproxy.servers(backend))


def test_an_address_changed_in_a_backend_this_tick_does_not_read_is_found_within_the_bound(
    haproxy: HaproxyServer, backends: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the stock template gives both services the same pool size: one backend a tick
    pool = 16
    driver, applied = two_services(haproxy, backends, runtime_check_slots=pool)
    assert slots(haproxy, "web") == slots(haproxy, "api") == pool
    bound = math.ceil(2 * pool / pool)  # ceil(all slots / runtime_check_slots) ticks
    ticks = Ticks(monkeypatch)
    assert not ticks.tick(driver, applied)  # never found in step: both read and compared
    assert sorted(ticks.read[-1]) == ["api", "web"]
    assert not ticks.tick(driver, applied)
    (just_read,) = ticks.read[-1]  # in step: only the rotation's backend

    # an address change moves neither the weight nor the server counts of `show stat`
    Cli(haproxy.admin_socket, target="test").query(
        f"set server {just_read}/s1 addr 10.9.9.9 port 9"
    )
    found_at = next(n for n in range(1, bound + 1) if ticks.tick(driver, applied))
    assert found_at == bound  # the next tick read the other backend only
    assert just_read not in ticks.read[-2]
    assert ticks.read[-1] == [just_read]
    assert ticks.compared[-1] == [just_read]
    assert haproxy.servers(just_read)["s1"].addr == "127.0.0.1"
    assert not ticks.tick(driver, applied)


def test_a_server_set_to_maint_in_a_backend_this_tick_does_not_read_is_found_at_once(
    haproxy: HaproxyServer, backends: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, applied = two_services(haproxy, backends, runtime_check_slots=16)
    ticks = Ticks(monkeypatch)
    assert not ticks.tick(driver, applied)
    assert not ticks.tick(driver, applied)
    (just_read,) = ticks.read[-1]
    other = next(n for n in ("web", "api") if n != just_read)

    Cli(haproxy.admin_socket, target="test").query(f"set server {just_read}/s1 state maint")
    assert ticks.tick(driver, applied)  # the summary moved: read out of turn
    assert ticks.read[-1] == [other, just_read]
    assert ticks.compared[-1] == [just_read]
    assert haproxy.servers(just_read)["s1"].admin == "ready"


def test_the_clock_column_moving_alone_is_not_drift(
    haproxy: HaproxyServer, backends: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, applied = two_services(haproxy, backends)  # default budget: both every tick
    ticks = Ticks(monkeypatch)
    assert not ticks.tick(driver, applied)
    before = haproxy.servers("web")["s1"].line.split()[9]  # srv_time_since_last_change
    wait_for(
        lambda: haproxy.servers("web")["s1"].line.split()[9] != before,
        what="HAProxy's time-since-last-change column to move",
    )
    assert not ticks.tick(driver, applied)
    assert sorted(ticks.read[-1]) == ["api", "web"]
    assert ticks.compared[-1] == []  # read in full, in step without a server-by-server look
