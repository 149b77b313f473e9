"""Probe verdicts in the catalog: quorum of live probers, panic threshold, hostile values."""

import json

import pytest
import structlog

from lbsync import metrics
from lbsync.catalog import Catalog
from lbsync.errors import InvalidValue
from lbsync.model import KeyEvent, KeyValue, ProbeVerdict, Snapshot, SourceEvents, State
from lbsync.probes import DEFAULT_POLICY, PanicWatch, ProbePolicy, in_panic, quorum_down
from lbsync.testing import snapshot_from
from lbsync.values import parse_probe

P = "/lbsync"
DOWN = {"status": "down", "reason": "HTTP 503 on /healthz", "since": 1765000000}
UP = {"status": "up", "since": 1765000000}


def verdicts(*statuses: str) -> dict[str, ProbeVerdict]:
    return {f"p{n}": ProbeVerdict(status=State(s)) for n, s in enumerate(statuses)}


def kv(key: str, value: object) -> KeyValue:
    raw = value if isinstance(value, str) else json.dumps(value)
    return KeyValue(key=P + key, value=raw.encode(), mod_revision=1)


def event(key: str, value: object | None, rev: int) -> SourceEvents:
    if value is None:
        one = KeyEvent(kind="delete", key=P + key, mod_revision=rev)
    else:
        raw = value if isinstance(value, str) else json.dumps(value)
        one = KeyEvent(kind="put", key=P + key, value=raw.encode(), mod_revision=rev)
    return SourceEvents(revision=rev, events=(one,))


def probe(iid: str, prober: str, service: str = "web") -> str:
    return f"/services/{service}/probes/{iid}/{prober}"


@pytest.fixture
def rejected() -> list[InvalidValue]:
    return []


def fleet(rejected: list[InvalidValue], policy: ProbePolicy = DEFAULT_POLICY) -> Catalog:
    """web: four instances up; api: one."""
    catalog = Catalog(P, on_reject=rejected.append, probes=policy)
    kvs = [kv(f"/services/web/instances/{i}", f"10.0.0.{n}:80") for n, i in enumerate("abcd", 1)]
    catalog.load([*kvs, kv("/services/api/instances/x", "10.0.1.1:80")], revision=1)
    return catalog


def states(catalog: Catalog, service: str = "web") -> dict[str, State]:
    return {i.id: i.state for i in catalog.snapshot().services[service].instances}


# --- pure functions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "quorum", "down"),
    [
        ((), None, False),
        (("down",), None, True),  # a single prober is its own majority
        (("up",), None, False),
        (("down", "up"), None, False),  # two disagree: no majority
        (("down", "down"), None, True),
        (("down", "down", "up"), None, True),
        (("down", "up", "up"), None, False),
        (("down",), 2, False),  # a configured quorum is a count, not capped by reporters
        (("down", "up", "up"), 1, True),
    ],
)
def test_quorum_down(statuses: tuple[str, ...], quorum: int | None, down: bool) -> None:
    assert quorum_down(verdicts(*statuses), quorum) is down


@pytest.mark.parametrize(
    ("bases", "probed", "threshold", "panic"),
    [
        (["up"] * 4, [True, True, False, False], 0.5, False),  # exactly half: not more than
        (["up"] * 4, [True, True, True, False], 0.5, True),
        (["up"], [True], 0.5, True),  # the only instance: sending to it beats sending to none
        (["up", "up", "down", "down"], [True, False, True, True], 0.5, False),  # only up counts
        (["up"] * 4, [True] * 4, 1.0, False),  # 1.0 turns panic off
        (["up"] * 4, [False] * 4, 0.0, False),  # nothing probed down: never a panic
    ],
)
def test_in_panic(bases: list[str], probed: list[bool], threshold: float, panic: bool) -> None:
    assert in_panic([State(b) for b in bases], probed, threshold) is panic


# --- the catalog --------------------------------------------------------------------------------


def test_a_down_verdict_takes_the_instance_out_and_its_expiry_brings_it_back(
    rejected: list[InvalidValue],
) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(probe("a", "lb1"), DOWN, 2))
    web = catalog.snapshot().services["web"]
    a = web.instances[0]
    assert (a.state, a.probed_down, web.panic) == (State.DOWN, True, False)
    assert a.probes == {
        "lb1": ProbeVerdict(status=State.DOWN, reason=DOWN["reason"], since=DOWN["since"])
    }
    assert a.registered_state is State.UP
    catalog.apply(event(probe("a", "lb1"), None, 3))  # the prober's lease expired
    assert states(catalog)["a"] is State.UP
    assert rejected == []


def test_two_probers_disagreeing_change_nothing_and_two_of_three_take_it_out(
    rejected: list[InvalidValue],
) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(probe("a", "lb1"), DOWN, 2))
    catalog.apply(event(probe("a", "lb2"), UP, 3))
    assert states(catalog)["a"] is State.UP
    catalog.apply(event(probe("a", "lb3"), DOWN, 4))
    assert states(catalog)["a"] is State.DOWN


def test_a_configured_quorum_of_two_ignores_one_prober(rejected: list[InvalidValue]) -> None:
    catalog = fleet(rejected, ProbePolicy(quorum=2))
    catalog.apply(event(probe("a", "lb1"), DOWN, 2))
    assert states(catalog)["a"] is State.UP
    catalog.apply(event(probe("a", "lb2"), DOWN, 3))
    assert states(catalog)["a"] is State.DOWN


def test_panic_keeps_every_registered_up_instance_and_spares_other_services(
    rejected: list[InvalidValue],
) -> None:
    catalog = fleet(rejected)
    for rev, iid in enumerate("abc", start=2):
        catalog.apply(event(probe(iid, "lb1"), DOWN, rev))
    snap = catalog.snapshot()
    web = snap.services["web"]
    assert web.panic
    assert all(i.up for i in web.instances)
    assert [i.probed_down for i in web.instances] == [True, True, True, False]
    assert not snap.services["api"].panic
    catalog.apply(event(probe("c", "lb1"), UP, 9))  # two of four: at the threshold, not over
    assert not catalog.snapshot().services["web"].panic
    assert states(catalog) == {"a": State.DOWN, "b": State.DOWN, "c": State.UP, "d": State.UP}


def test_panic_leaves_health_marks_and_registrations_alone(rejected: list[InvalidValue]) -> None:
    catalog = fleet(rejected)
    catalog.apply(event("/services/web/health/d", "down", 2))
    for rev, iid in enumerate("abc", start=3):
        catalog.apply(event(probe(iid, "lb1"), DOWN, rev))
    snap = catalog.snapshot().services["web"]
    assert snap.panic
    assert {i.id: i.state for i in snap.instances}["d"] is State.DOWN


def test_a_verdict_rebuilds_one_instance_and_shares_the_others(
    rejected: list[InvalidValue],
) -> None:
    catalog = fleet(rejected)
    before = catalog.snapshot()
    catalog.apply(event(probe("b", "lb1"), DOWN, 2))
    after = catalog.snapshot()
    old, new = before.services["web"].instances, after.services["web"].instances
    assert [n is o for n, o in zip(new, old, strict=True)] == [True, False, True, True]
    assert after.services["api"] is before.services["api"]


def test_entering_panic_rebuilds_the_instances_whose_verdict_stops_counting(
    rejected: list[InvalidValue],
) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(probe("a", "lb1"), DOWN, 2))
    assert states(catalog)["a"] is State.DOWN
    catalog.apply(event(probe("b", "lb1"), DOWN, 3))
    catalog.apply(event(probe("c", "lb1"), DOWN, 4))
    assert states(catalog)["a"] is State.UP


def test_verdicts_for_an_unregistered_instance_build_nothing(rejected: list[InvalidValue]) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(probe("zz", "lb1"), DOWN, 2))
    assert [i.id for i in catalog.snapshot().services["web"].instances] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "value",
    [
        "down",  # a bare status is not a verdict
        {"status": "drain"},  # a prober never drains
        {"status": "DOWN"},
        {"status": "down", "reason": "HTTP 503\nserver evil:1;"},
        {"status": "down", "reason": "x" * 201},
        {"status": "down", "since": 1.5},
        {"status": "down", "since": True},
        {"status": "down", "since": -1},
        {"status": "down", "since": 2**41},
        {"status": "down", "extra": 1},
        {"reason": "no status"},
        '{"status": "down", "since": 1e400}',
        "[[[[[[[[[[]]]]]]]]]]",
    ],
)
def test_hostile_verdicts_are_rejected_and_the_instance_stays(
    rejected: list[InvalidValue], value: object
) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(probe("a", "lb1"), DOWN, 2))
    catalog.apply(event(probe("a", "lb1"), value, 3))  # the bad value replaces the good one
    assert [err.key for err in rejected] == [P + probe("a", "lb1")]
    assert states(catalog)["a"] is State.UP


@pytest.mark.parametrize("prober", ["-lb", "lb 1", "lb\n1", "x" * 129, ""])
def test_a_verdict_under_an_unsafe_prober_name_is_off_schema(
    rejected: list[InvalidValue], prober: str
) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(f"/services/web/probes/a/{prober}", DOWN, 2))
    catalog.apply(event("/services/web/probes/a/lb1/extra", DOWN, 3))
    assert states(catalog)["a"] is State.UP
    assert rejected == []


def test_parse_probe_reads_a_full_verdict() -> None:
    verdict = parse_probe("k", json.dumps(DOWN).encode())
    assert verdict == ProbeVerdict(
        status=State.DOWN, reason="HTTP 503 on /healthz", since=1765000000
    )
    assert parse_probe("k", b'{"status": "up"}') == ProbeVerdict(status=State.UP)


def test_a_new_policy_rebuilds_every_service_with_it(rejected: list[InvalidValue]) -> None:
    catalog = fleet(rejected)
    catalog.apply(event(probe("a", "lb1"), DOWN, 2))
    catalog.apply(event(probe("a", "lb2"), UP, 3))
    assert states(catalog)["a"] is State.UP
    catalog.set_probe_policy(ProbePolicy(quorum=1))
    assert states(catalog)["a"] is State.DOWN
    catalog.set_probe_policy(ProbePolicy(quorum=1, panic_threshold=0.0))
    assert catalog.snapshot().services["web"].panic


def test_panic_is_one_event_on_entry_and_one_on_exit_with_a_metric(
    rejected: list[InvalidValue],
) -> None:
    series = metrics.enable()  # recording from the start
    catalog, watch = fleet(rejected), PanicWatch()
    for rev, iid in enumerate("abc", start=2):
        catalog.apply(event(probe(iid, "lb1"), DOWN, rev))
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            snapshot = catalog.snapshot()
            watch.update(snapshot)
            metrics.set_catalog(snapshot)
        assert series.probe_panic.labels("web")._value.get() == 1
        assert series.probe_panic.labels("api")._value.get() == 0
        catalog.apply(event(probe("c", "lb1"), None, 9))
        snapshot = catalog.snapshot()
        watch.update(snapshot)
        metrics.set_catalog(snapshot)
    assert [(e["event"], e["service"]) for e in logs] == [
        ("probe.panic", "web"),
        ("probe.panic_over", "web"),
    ]
    assert logs[0]["probed_down"] == 3
    assert watch.services == frozenset()
    assert series.probe_panic.labels("web")._value.get() == 0


def test_the_panic_watch_follows_changed_added_and_removed_services() -> None:
    """It looks only at the services that changed: its set stays the full one."""
    base = snapshot_from(
        {"services": {n: {"instances": {"a": "10.0.0.1:80"}} for n in ("api", "db", "web")}}
    )

    def with_services(**changes: bool | None) -> Snapshot:
        services = dict(base.services)
        for name, panic in changes.items():
            if panic is None:
                services.pop(name, None)
            else:
                services[name] = base.services.get(
                    name, base.services["api"].model_copy(update={"name": name})
                ).model_copy(update={"panic": panic})
        return Snapshot.model_construct(revision=2, services=services, keys=base.keys)

    rounds = [
        with_services(web=True),
        with_services(web=True),  # equal, not the same objects
        with_services(web=True, db=True),
        with_services(db=True),  # web calm again
        with_services(db=None, extra=True),  # db gone while in panic, a new one in panic
        with_services(extra=False),
        base,
    ]
    watch = PanicWatch()
    watch.update(base)
    with structlog.testing.capture_logs() as logs:
        for snapshot in rounds:
            watch.update(snapshot)
            expected = {n for n, s in snapshot.services.items() if s.panic}
            assert watch.services == expected
    assert [(e["event"], e["service"]) for e in logs] == [
        ("probe.panic", "web"),
        ("probe.panic", "db"),
        ("probe.panic_over", "web"),
        ("probe.panic", "extra"),
        ("probe.panic_over", "db"),
        ("probe.panic_over", "extra"),
    ]
