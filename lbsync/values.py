"""The schema of every etcd value: parse it into a typed value or reject it.

Everything here reads text written by someone lbsync must not trust (any backend can
register itself). The rules, applied to every position of the key schema:

- every pattern is a full-string match (``re.fullmatch``: ``$`` would accept a final
  ``\\n``), and no pattern admits a control character;
- a value is decoded with bounded size, nesting depth and number size *before* the JSON
  decoder sees it, so no value can exhaust the stack or build a 5,000-digit integer;
- numbers are bounded integers: booleans, floats, ``inf``/``nan`` and huge integers are
  refused wherever a number is expected;
- hosts are IP literals without a zone ID, or RFC 1123 DNS names;
- service settings are typed per known name (``service_settings``, built on the scalars
  here).

Every function raises ``InvalidValue`` only; the catalog turns anything else that might
still escape into one as well (see ``Catalog._put``).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

from lbsync.errors import InvalidValue
from lbsync.model import HealthMark, ProbeVerdict, State

MAX_WEIGHT = 256  # HAProxy's ceiling; nginx accepts it too
MAX_META_ITEMS = 32
MAX_VALUE_BYTES = 64 * 1024
MAX_DEPTH = 4  # deepest legitimate value: {"meta": {...}} is 2
MAX_NUMBER_CHARS = 20  # digits of a JSON number (2**63 has 19)
MAX_PLAIN_INT = 2**31 - 1  # unknown settings: integers in ±MAX_PLAIN_INT
MAX_SINCE = 2**40  # probe verdicts: Unix seconds, far beyond any real clock

# Lower case only: nginx compares upstream names without case, so "Web" next to "web" is a
# "duplicate upstream" that fails every round.
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
PROBER_NAME = INSTANCE_ID  # the last part of a probes/<id>/<prober> key
SETTING_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# Safe to place unquoted inside an nginx or HAProxy directive: no whitespace, no ; { } #,
# no quotes or backslashes, nothing outside printable ASCII.
SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.:/@=+,%~-]{1,256}")
# Free text (health reasons) may have spaces but nothing that ends a line or a directive.
SAFE_TEXT = re.compile(r"[A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]{0,200}")
DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
IP_TEXT = re.compile(r"[0-9A-Fa-f:.]{2,45}")  # what an IP literal without zone ID looks like
# A dotted quad in the form ``str(ipaddress.ip_address(...))`` gives back (no leading
# zeros, each octet ≤ 255): such a host is proven an IP literal without asking ipaddress.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


# --- decoding ---------------------------------------------------------------------------

# The fast path: most values are small, printable ASCII and shaped like what ``json.dumps``
# writes for a registration. For a value that matches one of these patterns the checks of
# the full path provably cannot fire, so it skips them (and the per-number hooks):
# - SIMPLE_JSON: an object nested at most twice, of strings without escapes, quotes,
#   braces or control characters, integers of at most 20 characters (``-`` included, no
#   leading zero, no fraction or exponent), ``true`` and ``false``. Decoded by the plain
#   decoder, it gives exactly what the bounded decoder gives (every number its hook would
#   see passes it; there is no float and no constant; the depth is ≤ 2; no strip needed).
# - SIMPLE_TEXT: printable ASCII not starting with ``{`` or ``"``, no space at either end:
#   the stripped text is the value itself and holds no control character.
# Anything else takes the full path; the property test holds both paths to equal results.
FAST_MAX_BYTES = 1024
_JSON_STR = rb'"[ !#-\[\]-z|~]*"'  # printable ASCII without " \ { }
_JSON_INT = rb"-?(?:0|[1-9][0-9]{0,18})"
_JSON_SCALAR = rb"(?:" + _JSON_STR + rb"|" + _JSON_INT + rb"|true|false)"


def _json_object(value: bytes) -> bytes:
    pair = _JSON_STR + rb" ?: ?" + value
    return rb"\{ ?(?:" + pair + rb"(?: ?, ?" + pair + rb")*)? ?\}"


SIMPLE_JSON = re.compile(
    _json_object(rb"(?:" + _JSON_SCALAR + rb"|" + _json_object(_JSON_SCALAR) + rb")")
)
SIMPLE_TEXT = re.compile(rb"[!#-z|~](?:[ -~]*[!-~])?")
# The plain decoder's C scanner, called directly: ``decode`` adds two Python calls and the
# "extra data" check that the full match has already made.
_scan_json: Callable[[str, int], tuple[object, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def decode_json_or_text(key: str, value: bytes) -> object:
    """JSON if it looks like JSON, else the stripped text; either way UTF-8 and bounded."""
    if len(value) <= FAST_MAX_BYTES:
        if SIMPLE_JSON.fullmatch(value):  # the whole value is one JSON object: scan it
            return _scan_json(value.decode("ascii"), 0)[0]
        if SIMPLE_TEXT.fullmatch(value):
            return value.decode("ascii")
    return decode_full(key, value)


def decode_full(key: str, value: bytes) -> object:
    """``decode_json_or_text`` without the fast path: every check, on any value."""
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidValue(key, value[:64], f"value is larger than {MAX_VALUE_BYTES} bytes")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidValue(key, value[:64], "value is not UTF-8") from exc
    stripped = text.strip()
    if stripped[:1] not in ("{", '"'):  # not "[": a bare "[::1]:80" is an address
        return no_control_chars(key, stripped)
    brackets = stripped.count("{") + stripped.count("[")  # cheap: most values have 1 or 2
    if brackets > MAX_DEPTH and json_depth(stripped) > MAX_DEPTH:
        raise InvalidValue(key, stripped[:64], f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(
            stripped,
            parse_int=_bounded_number(key, int),
            parse_float=_bounded_number(key, float),
            parse_constant=_no_constant(key),
        )
    except json.JSONDecodeError as exc:
        raise InvalidValue(key, text, f"invalid JSON: {exc.msg}") from exc


def json_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON text, strings skipped; linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_number(key: str, kind: Callable[[str], float]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if len(text) > MAX_NUMBER_CHARS:
            raise InvalidValue(key, text[:64], f"number longer than {MAX_NUMBER_CHARS} chars")
        number = kind(text)
        if not math.isfinite(number):
            raise InvalidValue(key, text, "number out of range")
        return number

    return parse


def _no_constant(key: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        raise InvalidValue(key, text, "NaN and Infinity are not numbers")

    return parse


def no_control_chars(key: str, text: str) -> str:
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise InvalidValue(key, text[:256], "control characters are not allowed")
    return text


# --- scalars ----------------------------------------------------------------------------


def bounded_int(key: str, raw: object, low: int, high: int, what: str) -> int:
    """An integer in ``[low, high]``: not a bool, not a float, not a digit string."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise InvalidValue(key, raw, f"{what} must be an integer from {low} to {high}")
    return raw


def token(key: str, raw: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(raw, str) or not pattern.fullmatch(raw):
        raise InvalidValue(key, raw, f"{what} must match {pattern.pattern}")
    return raw


def parse_host(key: str, raw: object) -> str:
    """An IP literal without zone ID, or an RFC 1123 DNS name; nothing else."""
    if not isinstance(raw, str) or not raw:
        raise InvalidValue(key, raw, "host must be a non-empty string")
    if CANONICAL_IPV4.fullmatch(raw):
        return raw
    if "%" in raw:  # ipaddress accepts a zone ID with almost anything in it
        raise InvalidValue(key, raw, "host must not carry an IPv6 zone ID")
    if IP_TEXT.fullmatch(raw):
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            pass
        else:
            normal = str(ip)
            if getattr(ip, "scope_id", None) is not None or not IP_TEXT.fullmatch(normal):
                raise InvalidValue(key, raw, "host must be a plain IP address")
            return normal
    return _dns_name(key, raw)


def _dns_name(key: str, raw: str) -> str:
    name = raw.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidValue(key, raw, "host must be an IP address or a DNS name")
    if labels[-1].isdigit():
        raise InvalidValue(key, raw, "host looks like a malformed IP address")
    return name.lower()


def parse_port(key: str, raw: object) -> int:
    if type(raw) is int and 1 <= raw <= 65535:
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 5:
        raw = int(raw)
    return bounded_int(key, raw, 1, 65535, "port")


def parse_weight(key: str, raw: object) -> int:
    if type(raw) is int and 1 <= raw <= MAX_WEIGHT:
        return raw
    return bounded_int(key, raw, 1, MAX_WEIGHT, "weight")


_STATES: Mapping[str, State] = {state.value: state for state in State}


def parse_state(key: str, raw: object) -> State:
    state = _STATES.get(raw) if isinstance(raw, str) else None
    if state is None:
        raise InvalidValue(key, raw, "state must be one of up, drain, down")
    return state


# Parsed metas by their items, when every value is a string: instances of a service
# mostly share a few (``{"zone": "a"}``), and sharing the dict saves ~200 bytes each. The
# values are never mutated (frozen models hand them out read-only). Bounded: untrusted
# writers choose the metas, so only metas of at most MAX_SHARED_META_ITEMS items are
# kept, and past MAX_SHARED_METAS distinct ones the cache starts over (at most ~2.5 MB
# even when every item is as long as the schema allows).
MAX_SHARED_METAS = 1024
MAX_SHARED_META_ITEMS = 8
_shared_metas: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
_K = TypeVar("_K")


def parse_meta(key: str, raw: object) -> dict[str, str]:
    """Meta values are plain tokens; numbers and bools are kept as their text."""
    if not isinstance(raw, dict) or len(raw) > MAX_META_ITEMS:
        raise InvalidValue(key, raw, f"meta must be an object of at most {MAX_META_ITEMS} items")
    if len(raw) > MAX_SHARED_META_ITEMS or not all(type(v) is str for v in raw.values()):
        return _parse_meta_items(key, raw)
    items = tuple(raw.items())
    meta = _shared_metas.get(items)
    return _share(_shared_metas, items, _parse_meta_items(key, raw)) if meta is None else meta


def _share(cache: dict[_K, dict[str, str]], key: _K, meta: dict[str, str]) -> dict[str, str]:
    """Keep ``meta`` for sharing under ``key``; past MAX_SHARED_METAS the cache starts over."""
    if len(cache) >= MAX_SHARED_METAS:
        cache.clear()
    cache[key] = meta
    return meta


def _parse_meta_items(key: str, raw: dict[str, object]) -> dict[str, str]:
    meta = {}
    for name, value in raw.items():
        if isinstance(value, bool):
            text: object = str(value).lower()
        elif isinstance(value, int):
            text = str(bounded_int(key, value, -MAX_PLAIN_INT, MAX_PLAIN_INT, "meta number"))
        else:
            text = value
        if not SETTING_NAME.fullmatch(name) or not isinstance(text, str):
            raise InvalidValue(key, {name: value}, "meta values must be short plain tokens")
        meta[name] = token(key, text, SAFE_TOKEN, "meta values")
    return meta


# --- instances and health -----------------------------------------------------------------


class Registration(NamedTuple):
    """A parsed instance key, before its health mark is merged in.

    A named tuple: a full load builds one per instance, ~0.7 µs each against ~2 µs for
    a frozen dataclass (whose ``__init__`` sets each field through ``object.__setattr__``).
    """

    host: str
    port: int
    weight: int
    state: State
    meta: Mapping[str, str]


_NO_META: dict[str, str] = {}
REGISTRATION_FIELDS = frozenset({"host", "port", "weight", "state", "meta"})

# The registrations ``json.dumps`` writes, field by field (insertion order as most writers
# build the dict, and ``sort_keys`` order as ``lbsync register`` writes it), with a
# canonical dotted quad, numbers that can only be in range or too big, and a meta of
# plain strings: what the general path would conclude, read off the match (the property
# test in test_values_fast holds the two equal).
_FAST_INT = rb"[1-9][0-9]{0,4}"
_FAST_FIELDS = {
    "host": rb'"host": ?"(?P<host>' + CANONICAL_IPV4.pattern.encode() + rb')"',
    "port": rb'"port": ?(?P<port>' + _FAST_INT + rb")",
    "weight": rb'"weight": ?(?P<weight>' + _FAST_INT + rb")",
    "state": rb'"state": ?"(?P<state>up|drain|down)"',
    "meta": rb'"meta": ?(?P<meta>' + _json_object(_JSON_STR) + rb")",
}


def _registration_shape(*after_host: tuple[str, bool]) -> re.Pattern[bytes]:
    """``{"host": ...`` then the fields named, each ``(name, optional)``, in that order."""
    body = [_FAST_FIELDS["host"]]
    for name, optional in after_host:
        field = rb", ?" + _FAST_FIELDS[name]
        body.append(rb"(?:" + field + rb")?" if optional else field)
    return re.compile(rb"\{" + b"".join(body) + rb"\}")


FAST_REGISTRATIONS = (
    _registration_shape(("port", False), ("weight", True), ("state", True), ("meta", True)),
    _registration_shape(("meta", True), ("port", False), ("state", True), ("weight", True)),
)
# Parsed metas by their JSON text, as _shared_metas by their items (same bound, same why).
_metas_by_text: dict[bytes, dict[str, str]] = {}


# A bare "10.0.0.1:80": the issue-15 shape (confd's users register bare addresses).
FAST_BARE = re.compile(
    rb"(?P<host>" + CANONICAL_IPV4.pattern.encode() + rb"):(?P<port>" + _FAST_INT + rb")"
)


def _fast_registration(key: str, value: bytes) -> Registration | None:
    """The registration, if ``value`` is FAST_BARE or one of FAST_REGISTRATIONS' shapes;
    else None."""
    bare = FAST_BARE.fullmatch(value)
    if bare is not None:
        port_number = int(bare.group("port"))
        if port_number > 65535:
            return None  # the general path words the rejection
        return Registration(bare.group("host").decode("ascii"), port_number, 1, State.UP, {})
    for pattern in FAST_REGISTRATIONS:
        match = pattern.fullmatch(value)
        if match is not None:
            break
    else:
        return None
    host, port, weight, state, meta = match.group("host", "port", "weight", "state", "meta")
    port_number, weight_number = int(port), int(weight) if weight else 1
    if port_number > 65535 or weight_number > MAX_WEIGHT:
        return None  # the general path words the rejection
    return Registration(
        host.decode("ascii"),
        port_number,
        weight_number,
        _STATES[state.decode("ascii")] if state else State.UP,
        _meta_from_text(key, meta),
    )


def _meta_from_text(key: str, text: bytes | None) -> dict[str, str]:
    if text is None:
        return parse_meta(key, _NO_META)
    meta = _metas_by_text.get(text)
    if meta is None:
        return _share(_metas_by_text, text, parse_meta(key, _scan_json(text.decode("ascii"), 0)[0]))
    return meta


def parse_registration(key: str, value: bytes) -> Registration:
    if len(value) <= FAST_MAX_BYTES:
        fast = _fast_registration(key, value)
        if fast is not None:
            return fast
    data = decode_json_or_text(key, value)
    if isinstance(data, str):
        return _registration_from_text(key, data)
    if not isinstance(data, dict):
        raise InvalidValue(key, data, 'expected {"host": ..., "port": ...} or "host:port"')
    if not data.keys() <= REGISTRATION_FIELDS:
        unknown = data.keys() - REGISTRATION_FIELDS
        raise InvalidValue(key, data, f"unknown fields {sorted(unknown)}")
    get = data.get
    return Registration(
        parse_host(key, get("host")),
        parse_port(key, get("port")),
        parse_weight(key, get("weight", 1)),
        parse_state(key, get("state", "up")),
        parse_meta(key, get("meta", _NO_META)),
    )


def _registration_from_text(key: str, text: str) -> Registration:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise InvalidValue(key, text, 'a bare value must be "host:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidValue(key, text, 'IPv6 hosts must be bracketed: "[::1]:80"')
    return Registration(parse_host(key, host), parse_port(key, port), 1, State.UP, {})


def parse_health(key: str, value: bytes) -> HealthMark:
    data = decode_json_or_text(key, value)
    if isinstance(data, str):
        return HealthMark(status=parse_state(key, data))
    if not isinstance(data, dict) or "status" not in data:
        raise InvalidValue(key, data, 'expected {"status": "down", ...} or "down"/"drain"/"up"')
    reason = token(key, data.get("reason", ""), SAFE_TEXT, "reason")
    by = token(key, data.get("by", ""), SAFE_TEXT, "by")
    return HealthMark(status=parse_state(key, data["status"]), reason=reason, by=by)


PROBE_STATUS = frozenset({State.UP, State.DOWN})  # a prober never drains an instance


def parse_probe(key: str, value: bytes) -> ProbeVerdict:
    """``{"status": "down", "reason": "HTTP 503 on /healthz", "since": 1765000000}``."""
    data = decode_json_or_text(key, value)
    if not isinstance(data, dict) or "status" not in data:
        raise InvalidValue(
            key, data, 'expected {"status": "up"|"down", "reason": ..., "since": ...}'
        )
    unknown = set(data) - {"status", "reason", "since"}
    if unknown:
        raise InvalidValue(key, data, f"unknown fields {sorted(unknown)}")
    status = data["status"]
    if not isinstance(status, str) or status not in PROBE_STATUS:
        raise InvalidValue(key, status, "probe status must be up or down")
    return ProbeVerdict(
        status=State(status),
        reason=token(key, data.get("reason", ""), SAFE_TEXT, "reason"),
        since=bounded_int(key, data.get("since", 0), 0, MAX_SINCE, "since"),
    )
