"""The fast paths of ``lbsync.values`` accept and reject exactly what the full path does.

The fast path (issue 15) skips checks it has proven cannot fire: the bounded JSON decoder
for values that ``SIMPLE_JSON``/``SIMPLE_TEXT`` match, ``ipaddress`` for canonical dotted
quads, the meta validation for a meta seen before. Here every parser runs twice on the
same bytes, once as shipped and once with every fast path switched off, and the two
outcomes (the parsed value, or the rejection's reason) must be equal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbsync import service_settings, values
from lbsync.errors import InvalidValue
from tests.fuzz.strategies import (
    health_values,
    instance_values,
    probe_values,
    setting_values,
    valid_instance_values,
)

NEVER = re.compile(r"(?!)")
NEVER_BYTES = re.compile(rb"(?!)")

PARSERS: dict[str, Callable[[str, bytes], object]] = {
    "decode": values.decode_json_or_text,
    "registration": values.parse_registration,
    "health": values.parse_health,
    "probe": values.parse_probe,
    "settings": service_settings.parse_settings,
}


@contextmanager
def full_path_only() -> Iterator[None]:
    """Every fast path off: no pattern matches, the meta cache is empty and stays so."""
    with (
        mock.patch.object(values, "SIMPLE_JSON", NEVER_BYTES),
        mock.patch.object(values, "SIMPLE_TEXT", NEVER_BYTES),
        mock.patch.object(values, "CANONICAL_IPV4", NEVER),
        mock.patch.object(values, "FAST_REGISTRATIONS", ()),
        mock.patch.object(values, "FAST_BARE", NEVER_BYTES),
        mock.patch.object(values, "_metas_by_text", {}),
        mock.patch.object(values, "_shared_metas", {}),
        mock.patch.object(values, "MAX_SHARED_METAS", 0),
    ):
        yield


def comparable(result: object) -> object:
    """Errors compare by identity: ``parse_settings``' error is compared by its text."""
    if isinstance(result, tuple):
        return tuple(comparable(item) for item in result)
    if isinstance(result, InvalidValue):
        return "InvalidValue", str(result)
    return result


def outcome(parse: Callable[[str, bytes], object], value: bytes) -> tuple[str, object]:
    try:
        return "ok", comparable(parse("/k", value))
    except InvalidValue as err:
        return "rejected", err.reason
    except Exception as exc:  # the catalog turns these into rejections: same type both ways
        return "raised", type(exc).__name__


def assert_same_outcome(value: bytes) -> None:
    for name, parse in PARSERS.items():
        fast = outcome(parse, value)
        with full_path_only():
            full = outcome(parse, value)
        assert fast == full, (name, value)


def text(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda s: s.encode("utf-8", "surrogatepass"))


# Values the fast patterns match (and some they nearly match), not only the fuzz shapes.
fast_shaped = st.one_of(
    *(st.from_regex(shape, fullmatch=True) for shape in values.FAST_REGISTRATIONS),
    st.from_regex(values.FAST_BARE, fullmatch=True),
    st.from_regex(values.SIMPLE_JSON, fullmatch=True),
    st.from_regex(values.SIMPLE_TEXT, fullmatch=True),
)
near_misses = st.builds(
    lambda value, at, junk: value[:at] + junk + value[at:],
    fast_shaped,
    st.integers(0, 40),
    st.sampled_from(
        [b" ", b"\n", b"\\", b'"', b"0", b".5", b"e9", b"{", b"}", b"\x7f", b"\xc3\xa4"]
    ),
)
any_value = st.one_of(
    text(instance_values(resolvable_only=False)),
    text(valid_instance_values()),
    text(health_values()),
    text(probe_values()),
    text(setting_values()),
    fast_shaped,
    near_misses,
    st.binary(max_size=80),
)


@settings(
    max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(any_value)
def test_fast_and_full_paths_agree(value: bytes) -> None:
    assert_same_outcome(value)


@pytest.mark.parametrize(
    "value",
    [
        b'{"host": "10.1.0.5", "port": 8001, "weight": 1, "meta": {"zone": "a"}}',
        b'{"host":"10.1.0.5","meta":{"zone":"a"},"port":8001,"state":"drain","weight":2}',
        b"10.0.0.1:80",
        b"10.0.0.1:65535",
        b"10.0.0.1:65536",
        b"10.0.0.1:99999",
        b"10.0.0.1:080",
        b"10.0.0.1:0",
        b"10.0.0.01:80",
        b"10.0.0.1:80\n",
        b" 10.0.0.1:80",
        b"[::1]:80",
        b'{"host": "010.1.0.5", "port": 80}',  # a leading zero: not an IP literal
        b'{"host": "256.1.0.5", "port": 80}',
        b'{"host": "10.1.0.5", "port": 99999999999999999999}',  # 20 characters
        b'{"host": "10.1.0.5", "port": 999999999999999999999}',  # 21: the bound
        b'{"host": "10.1.0.5", "port": -0}',
        b'{"host": "10.1.0.5", "port": 80, "meta": {"zone": true, "n": -5}}',
        b'{"host": "10.1.0.5", "port": 80, "meta": {"a": "x", "a": "b c"}}',  # last one wins
        b'{"host": "10.1.0.5", "port": 80, "meta": {"a": "x y"}}',
        b'{"host": "10.1.0.5", "port": 65536}',
        b'{"host": "10.1.0.5", "port": 80, "weight": 257}',
        b'{"host": "10.1.0.5", "meta": {}, "port": 80, "state": "down", "weight": 256}',
        b'{"host": "10.1.0.5", "port": 80, "host": "h"}',
        b'{"host": "10.1.0.5\\n", "port": 80}',
        b'{"status": "down", "reason": "HTTP 503 on /healthz", "since": 1765000000}',
        b'{"balance": "least_conn", "keepalive": 16, "listen": "8080"}',
        b"down",
        b" down ",
        b"{}",
        b"{ }",
    ],
)
def test_fast_and_full_paths_agree_on_edges(value: bytes) -> None:
    assert_same_outcome(value)


def test_the_fast_path_takes_the_common_values() -> None:
    common = b'{"host": "10.1.0.5", "port": 8001, "weight": 1, "meta": {"zone": "a"}}'
    assert values.SIMPLE_JSON.fullmatch(common)
    assert values.FAST_REGISTRATIONS[0].fullmatch(common)
    by_register = (
        b'{"host": "10.0.0.1", "meta": {"a": "b"}, "port": 80, "state": "drain", "weight": 3}'
    )
    assert values.FAST_REGISTRATIONS[1].fullmatch(by_register)
    assert values.SIMPLE_TEXT.fullmatch(b"10.0.0.1:80")
    assert values.FAST_BARE.fullmatch(b"10.0.0.1:80")
    assert values.CANONICAL_IPV4.fullmatch("10.1.0.5")
    assert not values.CANONICAL_IPV4.fullmatch("10.01.0.5")


def test_instances_share_one_parsed_meta() -> None:
    first = values.parse_registration("/a", b'{"host": "10.0.0.1", "port": 80, "meta": {"z": "a"}}')
    second = values.parse_registration(
        "/b", b'{"host": "10.0.0.2", "port": 80, "meta": {"z": "a"}}'
    )
    assert first.meta == {"z": "a"}
    assert first.meta is second.meta


def test_the_meta_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(values, "_shared_metas", {})
    monkeypatch.setattr(values, "MAX_SHARED_METAS", 3)
    for n in range(10):
        values.parse_meta("/k", {"n": f"v{n}"})
        assert len(values._shared_metas) <= 3


def test_only_small_metas_are_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(values, "_shared_metas", {})
    big = {f"k{n}": "v" for n in range(values.MAX_SHARED_META_ITEMS + 1)}
    assert values.parse_meta("/k", big) == big
    assert values.parse_meta("/k", big) is not values.parse_meta("/k", big)
    assert values._shared_metas == {}
