"""The models' computed views: cached per immutable object, never carried into a copy."""

from __future__ import annotations

from lbsync.model import Instance, Service, State


def _service() -> Service:
    return Service(
        name="web",
        instances=(
            Instance(id="a", host="10.0.0.1", port=80),
            Instance(id="b", host="10.0.0.2", port=80, state=State.DRAIN),
            Instance(id="c", host="::1", port=81, state=State.DOWN),
        ),
    )


def test_the_views_by_state_are_computed_once_per_service() -> None:
    service = _service()
    assert [i.id for i in service.up] == ["a"]
    assert [i.id for i in service.draining] == ["b"]
    assert [i.id for i in service.down] == ["c"]
    assert service.up is service.up


def test_address_brackets_ipv6_and_is_computed_once() -> None:
    instance = _service().instances[2]
    assert instance.address == "[::1]:81"
    assert instance.address is instance.address


def test_a_copy_with_new_fields_recomputes_what_was_cached() -> None:
    instance = Instance(id="a", host="10.0.0.1", port=80)
    assert instance.address == "10.0.0.1:80"
    assert instance.model_copy(update={"host": "10.0.0.9"}).address == "10.0.0.9:80"
    service = _service()
    assert len(service.up) == 1
    assert service.model_copy(update={"instances": ()}).up == ()
