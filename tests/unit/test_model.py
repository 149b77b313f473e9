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


def test_address_brackets_ipv6() -> None:
    assert _service().instances[2].address == "[::1]:81"
    assert _service().instances[0].address == "10.0.0.1:80"


def test_a_copy_with_new_fields_recomputes_what_was_cached() -> None:
    service = _service()
    assert len(service.up) == 1
    assert service.model_copy(update={"instances": ()}).up == ()
