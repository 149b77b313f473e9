"""The value schema (lbsync/values.py, service_settings.py): one regression per finding of
issue 17, and the rules."""

import json

import pytest

from lbsync.errors import InvalidValue
from lbsync.model import State
from lbsync.service_settings import BALANCE, parse_listen, parse_settings
from lbsync.values import (
    MAX_DEPTH,
    json_depth,
    parse_health,
    parse_host,
    parse_registration,
)

K = "/lbsync/services/web/instances/a"

# The finding: a zone ID carrying HAProxy sections, one of them a root `program`.
ZONE_INJECTION = "::1%eth0\n\nprogram pwn\n    command /bin/touch /tmp/lbsync-pwned\n\nbackend x"


def settings(value: object) -> dict[str, object]:
    """The settings of ``value``; raises the error when a setting was dropped."""
    parsed, refused = parse_settings(K, json.dumps(value).encode())
    if refused is not None:
        raise refused
    return dict(parsed)


def rejected(parse: object, value: bytes) -> InvalidValue:
    with pytest.raises(InvalidValue) as caught:
        parse(K, value)  # type: ignore[operator]
    return caught.value


# --- hosts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        ZONE_INJECTION,
        "::1%eth0",
        "fe80::1%1",
        "example.com\n",
        "10.0.0.1\n",
        "exa mple.com",
        "-bad.example",
        "bad-.example",
        "a" * 64 + ".example",
        ("a" * 63 + ".") * 4 + "com",
        "exämple.com",
        "1.2.3",
        "999.1.1.1",
        "[::1]",
        "",
        "example.com\x00",
    ],
)
def test_host_rejects_zone_ids_newlines_and_non_names(host: str) -> None:
    with pytest.raises(InvalidValue):
        parse_host(K, host)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("2001:DB8::0:1", "2001:db8::1"),
        ("0:0::1", "::1"),
        ("Web-1.Example.COM.", "web-1.example.com"),
        ("abc", "abc"),  # hex letters only: a name, not an address
        ("a" * 63 + ".example", "a" * 63 + ".example"),
    ],
)
def test_host_accepts_ip_literals_and_rfc1123_names(raw: str, expected: str) -> None:
    assert parse_host(K, raw) == expected


def test_zone_id_registration_is_rejected_as_json_and_as_bare_text() -> None:
    value = json.dumps({"host": ZONE_INJECTION, "port": 80}).encode()
    assert "zone ID" in rejected(parse_registration, value).reason
    assert "zone ID" in rejected(parse_registration, b"[::1%eth0]:80").reason


# --- decoding -----------------------------------------------------------------------------


def test_deep_nesting_is_rejected_before_the_decoder_recurses() -> None:
    deep = b'{"host": ' + b"[" * 5000 + b"]" * 5000 + b', "port": 80}'  # ~10 KB
    assert "nested deeper" in rejected(parse_registration, deep).reason


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth('{"a": "[[[[[[{{{{\\"]]"}') == 1
    assert json_depth('{"a": {"b": [1, [2]]}}') == 4
    assert json_depth('{"host": "h", "port": 1, "meta": {"a": "b"}}') <= MAX_DEPTH


@pytest.mark.parametrize(
    "number",
    [b"1e400", b"-1e400", b"1" * 5000, b"NaN", b"Infinity", b"-Infinity"],
)
def test_huge_and_non_finite_numbers_are_rejected_while_decoding(number: bytes) -> None:
    value = b'{"host": "10.0.0.1", "port": ' + number + b"}"
    rejected(parse_registration, value)


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xfe",
        b"10.0.0.1:80\x00",
        b"10.0.0.1\x1b[2J:80",
        b'"10.0.0.1:80\\u0000"',
        b"x" * (64 * 1024 + 1),
    ],
)
def test_undecodable_or_control_character_values_are_rejected(value: bytes) -> None:
    rejected(parse_registration, value)


# --- numbers and tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 80.0},
        {"port": "80\n"},
        {"port": "٨٠"},  # Arabic-Indic digits: str.isdigit() says yes
        {"port": True},
        {"weight": 1.5},
        {"weight": False},
        {"weight": 10**30},
        {"meta": {"zone": "a\n"}},
        {"meta": {"zone\n": "a"}},
        {"meta": {"zone": 1.5}},
        {"meta": {"zone": 10**12}},
        {"meta": {"zone": ["a"]}},
    ],
)
def test_numbers_are_bounded_integers_and_meta_plain_tokens(fields: dict[str, object]) -> None:
    value = json.dumps({"host": "10.0.0.1", "port": 80, **fields}).encode()
    rejected(parse_registration, value)


def test_meta_numbers_and_bools_become_text() -> None:
    value = {"host": "h.example", "port": "8080", "meta": {"a": 1, "b": True, "c": "x=y"}}
    reg = parse_registration(K, json.dumps(value).encode())
    assert (reg.port, dict(reg.meta)) == (8080, {"a": "1", "b": "true", "c": "x=y"})


@pytest.mark.parametrize(
    "mark",
    [
        {"status": "down", "reason": "HTTP 503\n"},
        {"status": "down", "reason": "a\rb"},
        {"status": "down", "by": "monitor\n"},
        {"status": "down", "by": 1},
        {"status": "down\n"},
        {"status": "sideways"},
        {"reason": "no status"},
    ],
)
def test_health_text_is_single_line_and_fully_matched(mark: dict[str, object]) -> None:
    rejected(parse_health, json.dumps(mark).encode())


def test_health_mark_with_reason_is_accepted() -> None:
    raw = {"status": "drain", "reason": "deploy [v2] 50%", "by": "ops"}
    mark = parse_health(K, json.dumps(raw).encode())
    assert (mark.status, mark.reason, mark.by) == (State.DRAIN, "deploy [v2] 50%", "ops")


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"keepalive": 1e30},
        {"keepalive": 16.0},
        {"keepalive": True},
        {"keepalive": "16"},
        {"keepalive": 10_001},
        {"keepalive": -1},
        {"listen": 99999},
        {"listen": 0},
        {"listen": "unix:/tmp/anywhere.sock"},
        {"listen": "localhost:8080"},
        {"listen": "0.0.0.0:80 ssl"},
        {"listen": "8080\n"},
        {"listen": "[::1%lo]:8080"},
        {"listen": "::1:8080"},
        {"listen": "[10.0.0.1]:8080"},
        {"listen": True},
        {"balance": "least_conn\n"},
        {"balance": "roundrobin; evil"},
        {"balance": "uri"},
        {"balance": 1},
        {"slots": 4097},
        {"slots": 0},
        {"slots": "16"},
        {"custom": "a b"},
        {"custom": "a\n"},
        {"custom": 1.5},
        {"custom": 2**31},
        {"custom": ["a"]},
        {"custom": None},
        {"custom\n": "a"},
        {"": "a"},
    ],
)
def test_settings_are_typed_and_a_bad_one_is_dropped_alone(value: dict[str, object]) -> None:
    parsed, refused = parse_settings(K, json.dumps({**value, "keep": "x"}).encode())
    assert parsed == {"keep": "x"}
    assert refused is not None
    assert refused.key == K
    assert repr(next(iter(value))) in refused.reason


@pytest.mark.parametrize(
    "value",
    [
        b'{"keepalive": 1e400}',  # decoded as inf: OverflowError in the template before
        b'{"slots": ' + b"1" * 5000 + b"}",
        b"[1]",
        b"16",
        b'"x"',
        b"{" + b'"a": {' * 10 + b"}" * 11,
    ],
)
def test_settings_that_cannot_be_read_as_an_object_raise(value: bytes) -> None:
    rejected(parse_settings, value)


def test_settings_are_normalized() -> None:
    value = {
        "balance": "least_conn",
        "keepalive": 0,
        "listen": 8080,
        "slots": 4096,
        "custom": "a.b:c",
        "flag": True,
        "count": -3,
    }
    assert settings(value) == {**value, "listen": "8080"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8080", "8080"),
        ("*:8080", "8080"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "[::1]:8080"),
        ("[2001:DB8::1]:443", "[2001:db8::1]:443"),
    ],
)
def test_listen_is_a_port_or_an_ip_and_port(raw: str, expected: str) -> None:
    assert parse_listen(K, raw) == expected


def test_balance_allowlist_covers_what_the_stock_templates_render() -> None:
    assert {"least_conn", "ip_hash", "random"} <= BALANCE  # nginx
    assert {"roundrobin", "leastconn", "source", "static-rr", "first"} <= BALANCE  # HAProxy
