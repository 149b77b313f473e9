"""Hypothesis strategies over every value position of the key schema, benign to hostile.

A drawn catalog is a list of ``(key, value bytes)`` puts. Values are built as Python data
and encoded by ``encode``, which also places ``Raw`` JSON fragments verbatim: numbers the
``json`` module cannot write (``1e400``, a 5,000-digit integer) and deep nesting.

``resolvable_only=True`` keeps every *valid* host name to ``localhost``: a checker run
(``nginx -t``, ``haproxy -c``) resolves the names it is given, and the fuzz suite must not
send DNS queries. Hostile host strings then always hold a character a DNS name cannot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hypothesis import strategies as st

from lbsync.service_settings import BALANCE

P = "/lbsync"


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is."""

    text: str


def encode(value: object) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    return json.dumps(value)


# --- building blocks ------------------------------------------------------------------------

# What has broken a config or a parser somewhere: directive enders, comment starters,
# quotes, line breaks (ASCII and unicode), zone IDs, NUL, terminal escapes, HAProxy sections.
INJECTIONS = [
    "\n", "\r", "\t", " ", ";", "{", "}", "#", '"', "'", "\\", "`", "$", "%", "%eth0",
    "%lo\n\nprogram pwn\n    command /bin/true\n", "\n}\nserver { listen 9999; }\n",
    "\nserver evil:1", "\x00", "\x1b[2J", "\u2028", "\u0085", "\u00a0", "ä", "\ufeff",
    " ssl crt /x", "unix:/tmp/x.sock", "\n", "()", "[", "]",
]  # fmt: skip
NAMES = ["web", "api", "a.b", "x_1", "s-2", "0", "default", "backend", "global", "upstream"]
IDS = ["a", "b", "web-1", "10.0.0.1:80", "x@y", "Z.9", "c_d"]
DEEP = Raw("{" + '"a": {' * 2000 + "}" * 2001)
HUGE_NUMBERS = [Raw("1e400"), Raw("-1e400"), Raw("1" * 5000), Raw("1e30"), Raw("NaN")]
DNS_ALPHABET = re.compile(r"[A-Za-z0-9.-]*")

plain = st.sampled_from(["a", "web", "x.y", "1", "p=q", "A_b-9"])


def mostly(
    good: st.SearchStrategy[object], bad: st.SearchStrategy[object]
) -> st.SearchStrategy[object]:
    """Mostly ``good``: a hostile value is then mostly valid, with one bad part."""
    return st.one_of(good, good, good, good, bad)


def injected(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``base`` with something hostile before, inside or after it."""
    return st.builds(
        lambda head, bad, tail: head + bad + tail,
        base,
        st.sampled_from(INJECTIONS),
        st.one_of(st.just(""), base, st.text(max_size=6)),
    )


def hostile_text(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(injected(base), st.text(max_size=24))


def ints() -> st.SearchStrategy[object]:
    return st.one_of(
        st.integers(-3, 70_000),
        st.sampled_from([0, 1, 255, 256, 257, 4096, 4097, 10_000, 10_001, 65535, 65536]),
        st.integers(),
        st.sampled_from(HUGE_NUMBERS),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.sampled_from(["80", "8080", "٨٠", "80\n", " 80", "0x50", ""]),
    )


def scalars() -> st.SearchStrategy[object]:
    return st.one_of(ints(), plain, hostile_text(plain), st.lists(plain, max_size=2))


def valid_hosts(resolvable_only: bool) -> st.SearchStrategy[str]:
    """IPs and localhost; with ``resolvable_only=False`` any DNS name too."""
    ips = st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"]),
    )
    names = st.sampled_from(["localhost", "LOCALHOST", "localhost."])
    if not resolvable_only:
        dns = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{1,5}){0,2}", fullmatch=True)
        names = st.one_of(names, dns)
    return st.one_of(ips, names)


def bad_hosts(resolvable_only: bool) -> st.SearchStrategy[str]:
    """Malformed addresses, IPv6 zone IDs carrying anything, injected IPs and names."""
    malformed = st.sampled_from(["999.1.1.1", "1.2.3", "1.2.3.4.5", "::1::", "[::1]", ""])
    zoned = st.builds(
        lambda ip, zone: f"{ip}%{zone}",
        st.one_of(st.ip_addresses(v=6).map(str), st.sampled_from(["::1", "::", "fe80::1"])),
        st.one_of(st.sampled_from(INJECTIONS), st.text(max_size=12)),
    )
    hostile = st.one_of(zoned, hostile_text(valid_hosts(True)))
    if resolvable_only:  # never a valid name other than localhost: no DNS query
        hostile = hostile.filter(lambda s: not DNS_ALPHABET.fullmatch(s.strip()))
    return st.one_of(malformed, zoned, zoned, hostile)


def hosts(resolvable_only: bool) -> st.SearchStrategy[str]:
    return st.one_of(valid_hosts(resolvable_only), bad_hosts(resolvable_only))


# --- value positions ------------------------------------------------------------------------


def instance_values(resolvable_only: bool) -> st.SearchStrategy[str]:
    host = hosts(resolvable_only)
    port = mostly(st.integers(1, 65535), ints())
    tokens = st.dictionaries(st.sampled_from(["zone", "v", "rack"]), plain, max_size=3)
    meta = mostly(
        tokens, st.dictionaries(st.one_of(plain, hostile_text(plain)), scalars(), max_size=3)
    )
    fields = st.fixed_dictionaries(
        {"host": host, "port": port},
        optional={
            "weight": mostly(st.integers(1, 256), ints()),
            "state": mostly(st.sampled_from(["up", "drain", "down"]), hostile_text(plain)),
            "meta": mostly(meta, scalars()),
        },
    )
    extra = st.builds(lambda f, v: {**f, "extra": v}, fields, scalars())
    bare = st.builds(
        lambda h, p: f"[{h}]:{p}" if ":" in h else f"{h}:{p}",
        host,
        mostly(st.integers(1, 65535).map(str), hostile_text(st.just("80"))),
    )
    return mostly(
        st.one_of(fields.map(encode), bare), st.one_of(extra.map(encode), st.just(encode(DEEP)))
    )


def health_values() -> st.SearchStrategy[str]:
    status = mostly(st.sampled_from(["up", "drain", "down"]), hostile_text(plain))
    text = mostly(st.sampled_from(["", "HTTP 503", "deploy [v2] 50%"]), hostile_text(plain))
    mark = st.fixed_dictionaries({"status": status}, optional={"reason": text, "by": text})
    return st.one_of(
        status, mark.map(encode), st.just(encode({"reason": "x"})), st.just(encode(DEEP))
    )


def probe_values() -> st.SearchStrategy[str]:
    status = mostly(st.sampled_from(["up", "down"]), hostile_text(plain))
    text = mostly(
        st.sampled_from(["", "HTTP 503 on /healthz", "timeout (2s)"]), hostile_text(plain)
    )
    since = mostly(st.integers(0, 2**40), st.one_of(ints(), scalars()))
    verdict = st.fixed_dictionaries({"status": status}, optional={"reason": text, "since": since})
    return st.one_of(
        verdict.map(encode), status, st.just(encode({"since": 1})), st.just(encode(DEEP))
    )


def setting_values() -> st.SearchStrategy[str]:
    known = st.fixed_dictionaries(
        {},
        optional={
            "balance": mostly(
                st.sampled_from(["least_conn", "ip_hash", "random", "roundrobin", "leastconn",
                                 "source", "static-rr", "first", "round_robin", "uri"]),
                hostile_text(st.just("least_conn")),
            ),
            "keepalive": mostly(st.integers(0, 10_000), ints()),
            "listen": mostly(
                st.one_of(
                    st.integers(1, 65535),
                    st.sampled_from(["8080", "*:8080", "127.0.0.1:8081", "[::1]:8082", "0"]),
                ),
                st.one_of(
                    hostile_text(st.sampled_from(["8080", "127.0.0.1:80", "[::1]:80"])), ints()
                ),
            ),
            "slots": mostly(st.integers(1, 4096), ints()),
            "custom": mostly(plain, scalars()),
        },
    )  # fmt: skip
    unknown = st.dictionaries(st.one_of(plain, hostile_text(plain)), scalars(), max_size=2)
    merged = st.builds(lambda a, b: {**b, **a}, known, unknown)
    return mostly(
        known.map(encode),
        st.one_of(merged.map(encode), scalars().map(encode), st.just(encode(DEEP))),
    )


def service_names() -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(NAMES), hostile_text(st.sampled_from(NAMES)))


def instance_ids() -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(IDS), hostile_text(st.sampled_from(IDS)))


def _placed(
    names: st.SearchStrategy[str],
    ids: st.SearchStrategy[str],
    instance: st.SearchStrategy[str],
    health: st.SearchStrategy[str],
    settings: st.SearchStrategy[str],
    probes: st.SearchStrategy[str],
) -> st.SearchStrategy[tuple[str, bytes]]:
    """A put at one of the schema's positions, the value encoded as UTF-8."""
    return st.one_of(
        st.builds(lambda s, i, v: (f"{P}/services/{s}/instances/{i}", v), names, ids, instance),
        st.builds(lambda s, i, v: (f"{P}/services/{s}/health/{i}", v), names, ids, health),
        st.builds(lambda s, v: (f"{P}/services/{s}/settings", v), names, settings),
        st.builds(
            lambda s, i, p, v: (f"{P}/services/{s}/probes/{i}/{p}", v), names, ids, ids, probes
        ),
    ).map(lambda kv: (kv[0], kv[1].encode("utf-8", "surrogatepass")))


# --- valid values, at their boundaries ---------------------------------------------------------

TOKEN_CHARS = "A-Za-z0-9_.:/@=+,%~-"


def valid_instance_values() -> st.SearchStrategy[str]:
    host = valid_hosts(resolvable_only=True)
    token = st.from_regex(f"[{TOKEN_CHARS}]{{1,20}}", fullmatch=True)
    fields = st.fixed_dictionaries(
        {"host": host, "port": st.one_of(st.integers(1, 65535), st.sampled_from(["80", "65535"]))},
        optional={
            "weight": st.integers(1, 256),
            "state": st.sampled_from(["up", "drain", "down"]),
            "meta": st.dictionaries(
                st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True),
                st.one_of(token, st.integers(-(2**31) + 1, 2**31 - 1), st.booleans()),
                max_size=3,
            ),
        },
    )
    bare = st.builds(
        lambda h, p: f"[{h}]:{p}" if ":" in h else f"{h}:{p}", host, st.integers(1, 65535)
    )
    return st.one_of(fields.map(encode), bare)


def valid_health_values() -> st.SearchStrategy[str]:
    status = st.sampled_from(["up", "drain", "down"])
    text = st.from_regex(r"[A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]{0,40}", fullmatch=True)
    mark = st.fixed_dictionaries({"status": status}, optional={"reason": text, "by": text})
    return st.one_of(status, mark.map(encode))


def valid_probe_values() -> st.SearchStrategy[str]:
    text = st.from_regex(r"[A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]{0,40}", fullmatch=True)
    return st.fixed_dictionaries(
        {"status": st.sampled_from(["up", "down"])},
        optional={"reason": text, "since": st.integers(0, 2**40)},
    ).map(encode)


def valid_setting_values() -> st.SearchStrategy[str]:
    return st.fixed_dictionaries(
        {},
        optional={
            "balance": st.sampled_from(sorted(BALANCE)),
            "keepalive": st.integers(0, 10_000),
            "listen": st.one_of(
                st.integers(1, 65535),
                st.sampled_from(["8080", "*:8080", "127.0.0.1:8081", "[::1]:8082"]),
            ),
            "slots": st.integers(1, 4096),
            "custom": st.one_of(
                st.from_regex(f"[{TOKEN_CHARS}]{{1,20}}", fullmatch=True), st.booleans()
            ),
        },
    ).map(encode)


def valid_puts() -> st.SearchStrategy[tuple[str, bytes]]:
    names = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,12}", fullmatch=True)
    ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,12}", fullmatch=True)
    return _placed(
        st.one_of(st.sampled_from(NAMES), names),
        st.one_of(st.sampled_from(IDS), ids),
        valid_instance_values(),
        valid_health_values(),
        valid_setting_values(),
        valid_probe_values(),
    )


# --- anything -----------------------------------------------------------------------------------


def hostile_puts(resolvable_only: bool) -> st.SearchStrategy[tuple[str, bytes]]:
    """Hostile or odd values at valid keys, and puts anywhere under the prefix."""
    at_valid_keys = _placed(
        st.sampled_from(NAMES),
        st.sampled_from(IDS),
        instance_values(resolvable_only),
        health_values(),
        setting_values(),
        probe_values(),
    )
    anywhere = _placed(
        service_names(),
        instance_ids(),
        instance_values(resolvable_only),
        health_values(),
        setting_values(),
        probe_values(),
    )
    bad_host = st.builds(
        lambda s, i, h, p: (f"{P}/services/{s}/instances/{i}", encode({"host": h, "port": p})),
        st.sampled_from(NAMES), st.sampled_from(IDS), bad_hosts(resolvable_only),
        st.integers(1, 65535),
    ).map(lambda kv: (kv[0], kv[1].encode("utf-8", "surrogatepass")))  # fmt: skip
    binary = st.tuples(st.just(f"{P}/services/web/instances/bytes"), st.binary(max_size=32))
    return st.one_of(at_valid_keys, bad_host, anywhere, binary)


def catalogs(resolvable_only: bool = True) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    """Valid puts, then hostile ones (which may replace a valid key's value)."""
    return st.builds(
        lambda valid, hostile: valid + hostile,
        st.lists(valid_puts(), min_size=1, max_size=15),
        st.lists(hostile_puts(resolvable_only), max_size=15),
    )
