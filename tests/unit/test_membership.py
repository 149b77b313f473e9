"""drivers/membership.py: the membership-only tests both runtime modes share."""

from __future__ import annotations

import pytest

from lbsync.drivers.membership import is_membership_key, meta_changed, other_keys_changed
from lbsync.model import Instance, Service, Snapshot


def inst(name: str, **meta: str) -> Instance:
    return Instance.model_validate({"id": name, "host": "10.0.0.1", "port": 80, "meta": meta})


def svc(*instances: Instance) -> Service:
    return Service.model_validate({"name": "web", "instances": instances})


def snap(keys: dict[str, str]) -> Snapshot:
    return Snapshot(revision=1, services={}, keys=keys)


@pytest.mark.parametrize(
    ("key", "membership"),
    [
        ("/services/web/instances/a", True),
        ("/services/web/health/a", True),
        ("/services/web/settings", False),
        ("/services/web/instances", False),
        ("/services/web/instances/a/extra", False),
        ("/services/web/other/a", False),
        ("/global/instances/web/a", False),
        # a service named like the kinds: only the 4th part decides
        ("/services/instances/settings/x", False),
        ("/services/health/instances/a", True),
    ],
)
def test_membership_keys_by_their_four_parts(key: str, membership: bool) -> None:
    assert is_membership_key(key) is membership


def test_other_keys_changed_ignores_registrations_and_health_marks() -> None:
    old = snap({"/services/web/instances/a": "1", "/global/x": "1"})
    same_other = snap({"/services/web/instances/b": "2", "/services/web/health/b": "down"})
    assert other_keys_changed(old, snap({**same_other.keys, "/global/x": "1"})) is False
    assert other_keys_changed(old, old) is False


@pytest.mark.parametrize(
    "new_keys",
    [
        {"/services/web/instances/a": "1", "/global/x": "2"},  # a value changed
        {"/services/web/instances/a": "1"},  # a key went
        {"/services/web/instances/a": "1", "/global/x": "1", "/global/y": "1"},  # one came
    ],
)
def test_other_keys_changed_sees_any_other_key(new_keys: dict[str, str]) -> None:
    old = snap({"/services/web/instances/a": "1", "/global/x": "1"})
    assert other_keys_changed(old, snap(new_keys)) is True


def test_meta_changed_names_the_instance_present_on_both_sides() -> None:
    assert meta_changed(svc(inst("a", zone="x")), svc(inst("a", zone="y"))) == (
        "instance a: meta changed"
    )
    assert meta_changed(svc(inst("a", zone="x")), svc(inst("b", zone="y"))) is None
    assert meta_changed(svc(inst("a", zone="x")), svc(inst("a", zone="x"), inst("b"))) is None
