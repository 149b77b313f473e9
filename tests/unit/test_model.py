"""The models' computed views: cached per immutable object, never carried into a copy."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lbsync.model import Instance, KeyValue, Service, SourceReset, State, source_reset


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


def test_source_reset_holds_the_read_as_key_values_in_order() -> None:
    read = [("/p/b", b"10.0.0.2:80", 7), ("/p/a", b"10.0.0.1:80", 5)]

    reset = source_reset(9, read, cluster_id=0xC1)

    assert (reset.revision, reset.cluster_id) == (9, 0xC1)
    assert reset.kvs == (
        KeyValue(key="/p/b", value=b"10.0.0.2:80", mod_revision=7),
        KeyValue(key="/p/a", value=b"10.0.0.1:80", mod_revision=5),
    )
    assert [kv.key for kv in reset.kvs] == ["/p/b", "/p/a"]  # etcd's order, not re-sorted


def test_source_reset_equals_the_validated_model_of_the_same_read() -> None:
    read = [("/p/a", b"x", 3)]

    built = source_reset(4, read)

    assert built == SourceReset(revision=4, kvs=(KeyValue("/p/a", b"x", 3),))
    with pytest.raises(ValidationError):
        built.revision = 5  # type: ignore[misc]  # frozen, as a validated one is
