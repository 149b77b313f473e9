import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync.catalog import Catalog
from lbsync.errors import InvalidValue
from lbsync.model import Instance, KeyEvent, KeyValue, Service, SourceEvents, State
from lbsync.probes import ProbePolicy
from lbsync.values import parse_host, parse_registration

P = "/lbsync"


def kv(key: str, value: object, rev: int = 1) -> KeyValue:
    raw = value if isinstance(value, str) else json.dumps(value)
    return KeyValue(key=P + key, value=raw.encode(), mod_revision=rev)


def put(key: str, value: object, rev: int) -> KeyEvent:
    raw = value if isinstance(value, str) else json.dumps(value)
    return KeyEvent(kind="put", key=P + key, value=raw.encode(), mod_revision=rev)


def delete(key: str, rev: int) -> KeyEvent:
    return KeyEvent(kind="delete", key=P + key, mod_revision=rev)


@pytest.fixture
def rejected() -> list[InvalidValue]:
    return []


@pytest.fixture
def catalog(rejected: list[InvalidValue]) -> Catalog:
    cat = Catalog(P, on_reject=rejected.append)
    cat.load(
        [
            kv("/services/web/instances/a", {"host": "10.0.0.1", "port": 80, "weight": 3}),
            kv("/services/web/instances/b", "10.0.0.2:8080"),
            kv("/services/api/instances/x", {"host": "api-1.internal", "port": 9000}),
            kv("/services/api/settings", {"balance": "least_conn", "keepalive": 16}),
        ],
        revision=10,
    )
    return cat


def test_reset_builds_sorted_services_with_parsed_instances(catalog: Catalog) -> None:
    snap = catalog.snapshot()
    assert snap.revision == 10
    assert list(snap.services) == ["api", "web"]
    web = snap.services["web"]
    assert [(i.id, i.address, i.weight) for i in web.instances] == [
        ("a", "10.0.0.1:80", 3),
        ("b", "10.0.0.2:8080", 1),
    ]
    assert snap.services["api"].settings == {"balance": "least_conn", "keepalive": 16}


@pytest.mark.parametrize(
    ("mark", "registered", "effective"),
    [
        ("down", "up", State.DOWN),
        ('{"status": "drain", "reason": "deploy", "by": "ops"}', "up", State.DRAIN),
        ("up", "drain", State.DRAIN),  # the worse of the two wins
        ("drain", "down", State.DOWN),
    ],
)
def test_health_mark_merges_as_worst_state(
    catalog: Catalog, mark: str, registered: str, effective: State
) -> None:
    value = {"host": "10.0.0.1", "port": 80, "state": registered}
    catalog.apply(
        SourceEvents(
            revision=12,
            events=(
                put("/services/web/instances/a", value, 11),
                put("/services/web/health/a", mark, 12),
            ),
        )
    )
    inst = catalog.snapshot().services["web"].instances[0]
    assert inst.state is effective
    assert inst.registered_state is State(registered)


def test_deleting_health_mark_restores_registration_state(catalog: Catalog) -> None:
    catalog.apply(SourceEvents(revision=11, events=(put("/services/web/health/a", "down", 11),)))
    assert catalog.snapshot().services["web"].instances[0].down
    catalog.apply(SourceEvents(revision=12, events=(delete("/services/web/health/a", 12),)))
    assert catalog.snapshot().services["web"].instances[0].up


def test_events_rebuild_only_touched_services(catalog: Catalog) -> None:
    before = catalog.snapshot()
    touched = catalog.apply(
        SourceEvents(revision=11, events=(delete("/services/web/instances/b", 11),))
    )
    after = catalog.snapshot()
    assert touched == {"web"}
    assert after.services["api"] is before.services["api"]
    assert [i.id for i in after.services["web"].instances] == ["a"]
    assert after.revision == 11


def test_service_disappears_with_its_last_key(catalog: Catalog) -> None:
    catalog.apply(
        SourceEvents(
            revision=12,
            events=(
                delete("/services/api/instances/x", 11),
                delete("/services/api/settings", 12),
            ),
        )
    )
    assert list(catalog.snapshot().services) == ["web"]


HOSTILE = [
    ("10.0.0.1:80; include /etc/passwd", "port"),
    ('{"host": "10.0.0.1\\nserver evil:1", "port": 80}', "host"),
    ('{"host": "10.0.0.1", "port": 99999}', "port"),
    ('{"host": "exämple.com", "port": 80}', "host"),
    ('{"host": "a b", "port": 80}', "host"),
    ('{"host": "10.0.0.1", "port": 80, "weight": 100000}', "weight"),
    ('{"host": "10.0.0.1", "port": true}', "port"),
    ('{"host": "10.0.0.1", "port": 80, "state": "sideways"}', "state"),
    ('{"host": "10.0.0.1", "port": 80, "meta": {"zone": "a;b"}}', "meta"),
    ('{"host": "10.0.0.1", "port": 80, "extra": 1}', "unknown"),
    ('{"host": "10.0.0.1", "port": 80', "JSON"),
    ("999.1.1.1:80", "host"),
    ("::1:80", "IPv6"),
]


@pytest.mark.parametrize(("value", "reason"), HOSTILE)
def test_hostile_registration_is_dropped_and_the_rest_kept(
    catalog: Catalog, rejected: list[InvalidValue], value: str, reason: str
) -> None:
    catalog.apply(
        SourceEvents(revision=11, events=(put("/services/web/instances/evil", value, 11),))
    )
    snap = catalog.snapshot()
    assert [i.id for i in snap.services["web"].instances] == ["a", "b"]
    assert len(rejected) == 1
    assert rejected[0].key == f"{P}/services/web/instances/evil"
    assert reason in str(rejected[0])
    assert f"{P}/services/web/instances/evil" in catalog.rejected


def test_bad_update_removes_the_instance_until_fixed(catalog: Catalog) -> None:
    catalog.apply(SourceEvents(revision=11, events=(put("/services/web/instances/a", "junk", 11),)))
    assert [i.id for i in catalog.snapshot().services["web"].instances] == ["b"]
    fixed = put("/services/web/instances/a", "10.0.0.9:81", 12)
    catalog.apply(SourceEvents(revision=12, events=(fixed,)))
    assert catalog.snapshot().services["web"].instances[0].address == "10.0.0.9:81"
    assert not catalog.rejected


def test_unsafe_names_are_never_services(catalog: Catalog) -> None:
    events = (
        put("/services/bad;name/instances/a", "10.0.0.1:80", 11),
        put("/services/web/instances/{evil}", "10.0.0.1:80", 12),
    )
    catalog.apply(SourceEvents(revision=12, events=events))
    snap = catalog.snapshot()
    assert set(snap.services) == {"api", "web"}
    assert [i.id for i in snap.services["web"].instances] == ["a", "b"]
    assert "/services/bad;name/instances/a" in snap.keys  # raw access still sees it


def test_keys_outside_prefix_are_ignored(catalog: Catalog) -> None:
    stray = KeyEvent(
        kind="put", key="/lbsyncother/services/web/instances/z", value=b"1.1.1.1:1", mod_revision=11
    )
    catalog.apply(SourceEvents(revision=11, events=(stray,)))
    assert [i.id for i in catalog.snapshot().services["web"].instances] == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("Web-1.Example.COM.", "web-1.example.com")],
)
def test_parse_host_accepts_ips_and_names(raw: str, expected: str) -> None:
    assert parse_host("k", raw) == expected


def test_ipv6_bare_value_is_bracketed_in_address() -> None:
    reg = parse_registration("k", b"[2001:db8::1]:443")
    assert (reg.host, reg.port) == ("2001:db8::1", 443)


def test_an_event_rebuilds_only_the_instance_it_touched(catalog: Catalog) -> None:
    before = catalog.snapshot()
    catalog.apply(SourceEvents(revision=5, events=(put("/services/web/health/b", "down", 5),)))
    after = catalog.snapshot()
    old, new = before.services["web"].instances, after.services["web"].instances
    assert new[0] is old[0]  # a: untouched, the very same object
    assert new[1] is not old[1]
    assert new[1].state is State.DOWN
    assert after.services["api"] is before.services["api"]
    catalog.apply(SourceEvents(revision=6, events=(delete("/services/web/health/b", 6),)))
    assert catalog.snapshot().services["web"].instances[1].state is State.UP


# --- issue 17: every failure while reading a value is one rejection of that key -----------

ZONE_HOST = "::1%eth0\n\nprogram pwn\n    command /bin/touch /tmp/lbsync-pwned\n"
DEEP = "{" + '"a": {' * 3000 + "}" * 3001


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("/services/web/instances/evil", {"host": ZONE_HOST, "port": 80}),
        ("/services/web/instances/evil", DEEP),
        ("/services/web/instances/evil", '{"host": "10.0.0.1", "port": 1e400}'),
        ("/services/web/instances/evil", '{"host": "10.0.0.1", "port": ' + "9" * 5000 + "}"),
        ("/services/web/instances/evil", {"host": "example.com\n", "port": 80}),
        ("/services/web/health/a", DEEP),
        ("/services/web/settings", {"keepalive": 1e30}),
        ("/services/web/settings", '{"keepalive": 1e400}'),
        ("/services/web/settings", {"listen": 99999}),
        ("/services/web/settings", {"listen": "unix:/tmp/x.sock"}),
        ("/services/web/settings", {"balance": "least_conn\n"}),
        ("/services/web/settings", {"web\n": 1}),
        ("/services/web/settings", DEEP),
    ],
)
def test_hostile_values_are_one_rejection_each(
    catalog: Catalog, rejected: list[InvalidValue], key: str, value: object
) -> None:
    catalog.apply(SourceEvents(revision=11, events=(put(key, value, 11),)))
    snap = catalog.snapshot()
    assert [err.key for err in rejected] == [P + key]
    assert set(catalog.rejected) == {P + key}
    assert [i.id for i in snap.services["web"].instances] == ["a", "b"]  # the rest renders
    assert snap.services["web"].settings == {}


def test_an_unexpected_exception_in_a_parser_is_a_rejection(
    catalog: Catalog, rejected: list[InvalidValue], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(key: str, value: bytes) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("lbsync.catalog.parse_registration", explode)
    catalog.apply(SourceEvents(revision=11, events=(put("/services/web/instances/a", "x", 11),)))
    assert [i.id for i in catalog.snapshot().services["web"].instances] == ["b"]
    assert len(rejected) == 1
    assert "RecursionError" in rejected[0].reason


def test_names_with_a_trailing_newline_are_not_services_or_ids(catalog: Catalog) -> None:
    events = (
        put("/services/web\n/instances/a", "10.0.0.7:80", 11),
        put("/services/web/instances/a\n", "10.0.0.8:80", 12),
        put("/services/web\n/settings", {"listen": 8080}, 13),
    )
    catalog.apply(SourceEvents(revision=13, events=events))
    snap = catalog.snapshot()
    assert set(snap.services) == {"api", "web"}
    assert [i.address for i in snap.services["web"].instances] == ["10.0.0.1:80", "10.0.0.2:8080"]
    assert snap.services["web"].settings == {}


def test_service_names_are_lower_case_so_nginx_sees_no_duplicate_upstream(
    catalog: Catalog,
) -> None:
    catalog.apply(
        SourceEvents(revision=11, events=(put("/services/WEB/instances/a", "1.1.1.1:1", 11),))
    )
    assert set(catalog.snapshot().services) == {"api", "web"}


def test_a_bad_setting_is_dropped_alone_and_reported_once(
    catalog: Catalog, rejected: list[InvalidValue]
) -> None:
    value = {"listen": 8080, "balance": "nonsense", "keepalive": 1e30}
    catalog.apply(SourceEvents(revision=11, events=(put("/services/web/settings", value, 11),)))
    assert catalog.snapshot().services["web"].settings == {"listen": "8080"}
    assert [err.key for err in rejected] == [f"{P}/services/web/settings"]
    assert "'balance'" in rejected[0].reason
    assert "'keepalive'" in rejected[0].reason
    fixed = put("/services/web/settings", {"listen": 8080}, 12)
    catalog.apply(SourceEvents(revision=12, events=(fixed,)))
    assert not catalog.rejected


def test_instances_are_built_as_model_construct_would() -> None:
    """The catalog sets the model's attributes itself (a tenth of ``model_construct``'s
    cost): the object must be what ``model_construct`` builds, field for field."""
    catalog = Catalog("/p")
    catalog.load(
        [KeyValue(key="/p/services/web/instances/a", value=b'{"host": "10.0.0.1", "port": 80, '
                  b'"weight": 3, "meta": {"zone": "a"}}', mod_revision=1)],
        revision=1,
    )  # fmt: skip
    built = catalog.snapshot().services["web"].instances[0]
    fields = {name: getattr(built, name) for name in Instance.model_fields}
    expected = Instance.model_construct(set(Instance.model_fields), **fields)
    assert built == expected
    assert built.__dict__ == expected.__dict__
    assert built.model_fields_set == expected.model_fields_set
    assert built.__pydantic_extra__ == expected.__pydantic_extra__
    assert built.__pydantic_private__ == expected.__pydantic_private__
    assert built.model_dump() == expected.model_dump()
    assert Instance.model_validate(built.model_dump()) == built


# --- a built service is the same however it was reached ----------------------------------

EVENT_KEYS = [
    *(f"/services/{s}/instances/{i}" for s in ("web", "api") for i in ("a", "b", "c", "d")),
    *(f"/services/web/health/{i}" for i in ("a", "b", "c")),
    *(f"/services/web/probes/{i}/{p}" for i in ("a", "b") for p in ("p1", "p2")),
    "/services/web/settings",
]
EVENT_VALUES = {
    "instances": [b'{"host": "10.0.0.1", "port": 80}', b"10.0.0.2:81", b'{"host": "x y"}',
                  b'{"host": "10.0.0.3", "port": 82, "state": "drain", "meta": {"z": "a"}}'],
    "health": [b"down", b"drain", b"up", b'{"status": "bad"}'],
    "probes": [b'{"status": "down"}', b'{"status": "up"}', b"junk"],
    "settings": [b'{"balance": "least_conn"}', b"[]"],
}  # fmt: skip


def _value_for(key: str, pick: int) -> bytes:
    choices = EVENT_VALUES[key.split("/")[3]]
    return choices[pick % len(choices)]


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(st.tuples(st.sampled_from(EVENT_KEYS), st.integers(0, 7), st.booleans()), max_size=60),
    st.sampled_from([None, 1, 2]),
)
def test_services_built_change_by_change_equal_a_fresh_load(
    script: list[tuple[str, int, bool]], quorum: int | None
) -> None:
    """Rebuilt in place (one instance patched in, instances reused) or from scratch, a
    service comes out equal: the catalog's snapshot after any sequence of events equals
    the snapshot of a new catalog loaded with the keys as they then are."""
    policy = ProbePolicy(quorum=quorum)
    catalog = Catalog(P, probes=policy)
    current: dict[str, bytes] = {}
    for revision, (key, pick, take) in enumerate(script, start=1):
        if pick == 7:
            current.pop(key, None)
            event = delete(key, revision)
        else:
            current[key] = _value_for(key, pick)
            event = KeyEvent(kind="put", key=P + key, value=current[key], mod_revision=revision)
        catalog.apply(SourceEvents(revision=revision, events=(event,)))
        if take or revision == len(script):
            fresh = Catalog(P, probes=policy)
            fresh.load(
                (KeyValue(key=P + k, value=v, mod_revision=1) for k, v in current.items()), 1
            )
            services = catalog.snapshot().services
            assert services == fresh.snapshot().services
            for service in services.values():
                assert_views_as_computed(service)


def assert_views_as_computed(service: Service) -> None:
    """The views by state the catalog filled in equal those computed from the instances."""
    for state, view in ((State.UP, "up"), (State.DRAIN, "draining"), (State.DOWN, "down")):
        assert getattr(service, view) == tuple(i for i in service.instances if i.state is state)
    assert service.up_ids == frozenset(i.id for i in service.instances if i.state is State.UP)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(st.tuples(st.sampled_from(EVENT_KEYS), st.integers(0, 7), st.booleans()), max_size=60),
)
def test_views_by_state_follow_every_change(script: list[tuple[str, int, bool]]) -> None:
    """``up``, ``draining``, ``down`` and ``up_ids`` of every snapshot's services equal the
    views computed from their instances, whether the guard read the previous snapshot's
    ``up_ids`` (the catalog then patches them) or not."""
    catalog = Catalog(P)
    for revision, (key, pick, read) in enumerate(script, start=1):
        if pick == 7:
            event = delete(key, revision)
        else:
            event = KeyEvent(
                kind="put", key=P + key, value=_value_for(key, pick), mod_revision=revision
            )
        catalog.apply(SourceEvents(revision=revision, events=(event,)))
        snapshot = catalog.snapshot()
        if read:
            for service in snapshot.services.values():
                assert_views_as_computed(service)


def test_an_unchanged_set_of_ids_up_is_handed_over_as_the_same_object(catalog: Catalog) -> None:
    """What lets the guard skip comparing 100,000 ids when one instance's port changed."""
    before = catalog.snapshot().services["web"]
    assert before.up_ids == {"a", "b"}
    catalog.apply(
        SourceEvents(revision=11, events=(put("/services/web/instances/a", "10.0.0.9:81", 11),))
    )
    after = catalog.snapshot().services["web"]
    assert after is not before
    assert after.up_ids is before.up_ids
    assert after.up is after.instances
    catalog.apply(SourceEvents(revision=12, events=(put("/services/web/health/b", "down", 12),)))
    down = catalog.snapshot().services["web"]
    assert down.up_ids == {"a"}
    assert [i.id for i in down.up] == ["a"]
    assert [i.id for i in down.down] == ["b"]
