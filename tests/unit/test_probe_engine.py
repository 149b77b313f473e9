"""The prober's pure parts: rise/fall, which instances it checks, reasons etcd accepts."""

from __future__ import annotations

import pytest

from lbsync.config import CheckSettings, ProbeSettings
from lbsync.model import State
from lbsync.probe.checks import safe_reason
from lbsync.probe.engine import RiseFall, targets, wait_after
from lbsync.probe.run import _is_verdict
from lbsync.testing import snapshot_from
from lbsync.values import SAFE_TEXT


def run(results: str, rise: int = 2, fall: int = 3) -> list[State | None]:
    """Feed ``results`` ("+" ok, "-" failure); the transitions, None where there is none."""
    state = RiseFall()
    return [state.observe(r == "+", rise, fall) for r in results]


def test_the_first_verdict_needs_rise_successes_or_fall_failures() -> None:
    assert run("++") == [None, State.UP]
    assert run("---") == [None, None, State.DOWN]
    assert run("+-+-+-") == [None] * 6  # flapping never decides


def test_fall_failures_in_a_row_take_it_down_and_rise_successes_bring_it_back() -> None:
    assert run("++--+---++") == [
        None, State.UP, None, None, None, None, None, State.DOWN, None, State.UP,
    ]  # fmt: skip


def test_a_verdict_is_reported_once_not_on_every_check() -> None:
    transitions = [t for t in run("++++++------") if t is not None]
    assert transitions == [State.UP, State.DOWN]


CATALOG = {
    "services": {
        "web": {"instances": {"a": "10.0.0.1:80", "b": "10.0.0.2:80"}},
        "api": {"instances": {"x": "10.0.1.1:9000"}, "health": {"x": "down"}},
        "bad": {"instances": {"evil": "10.0.0.9:80; include /etc/passwd"}},
    }
}


def test_every_registered_instance_is_checked_with_its_services_check() -> None:
    tcp = CheckSettings(type="tcp")
    settings = ProbeSettings(services={"api": tcp})
    found = targets(snapshot_from(CATALOG), settings)
    assert sorted(found) == [("api", "x"), ("web", "a"), ("web", "b")]  # never a rejected value
    assert found["api", "x"].check is tcp  # marked down, still checked: a verdict for later
    assert found["web", "a"].check is settings.check


def test_all_services_false_checks_only_the_named_ones() -> None:
    settings = ProbeSettings(all_services=False, services={"web": CheckSettings()})
    assert sorted(targets(snapshot_from(CATALOG), settings)) == [("web", "a"), ("web", "b")]


@pytest.mark.parametrize(
    "text",
    ["HTTP 503 on /healthz", "ClientOSError: [Errno 104] reset\nby peer", 'a"b;c{d}#e' * 40, "é"],
)
def test_reasons_always_pass_the_schema(text: str) -> None:
    assert SAFE_TEXT.fullmatch(safe_reason(text))


def test_only_the_touched_services_are_looked_at() -> None:
    found = targets(snapshot_from(CATALOG), ProbeSettings(), only={"api", "gone"})
    assert sorted(found) == [("api", "x")]


@pytest.mark.parametrize(
    ("key", "verdict"),
    [
        ("/lbsync/services/web/probes/a/lb-1", True),
        ("/lbsync/services/web/instances/a", False),
        ("/lbsync/services/web/health/a", False),
        ("/lbsync/services/web/probes/a", False),  # off-schema: the catalog judges it
        ("/other/services/web/probes/a/lb-1", False),
    ],
)
def test_the_prober_ignores_only_verdicts_on_its_watch(key: str, verdict: bool) -> None:
    assert _is_verdict("/lbsync", key) is verdict


def test_checks_keep_their_cadence_from_start_to_start() -> None:
    steady = CheckSettings(interval=5.0, jitter=0.0)
    assert wait_after(steady, started=100.0, now=100.1) == pytest.approx(4.9)
    assert wait_after(steady, started=100.0, now=101.5) == pytest.approx(3.5)  # a slow check
    assert wait_after(steady, started=100.0, now=107.0) == 0.0  # later than the interval


@pytest.mark.parametrize("taken", [0.0, 1.0, 4.0])
def test_jitter_only_shortens_the_wait(taken: float) -> None:
    check = CheckSettings(interval=5.0, jitter=0.2)
    waits = {wait_after(check, started=0.0, now=taken) for _ in range(200)}
    assert all(4.0 - taken <= wait <= 5.0 - taken for wait in waits)
    assert len(waits) > 1  # drawn, not fixed
