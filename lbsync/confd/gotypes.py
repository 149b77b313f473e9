"""What a Go-template expression certainly yields, where the converter can tell.

Knowing that a value is a string, an int or a memkv KVPair lets the emitter write the
direct Jinja2 form (``{{ kv_1.Value }}``, ``a == b``) instead of a ``confd.*`` call with
Go's general semantics: the same bytes, and several times faster in a loop over
thousands of keys (every Jinja2 function call goes through ``Context.call``). Where the
kind is not certain (JSON values, map keys, floats), ``None`` keeps the general form.
"""

from __future__ import annotations

from collections.abc import Mapping

from lbsync.confd.goast import Call, Const, Expr, Field, Ref

Kind = str | None  # "str", "int", "bool", "kv" (a memkv KVPair), or None: not certain

_STRINGS = "getv printf base dir join toUpper toLower replace trimSuffix getenv base64Encode"
_INTS = "len atoi add sub mul div mod"
_BOOLS = "eq ne lt le gt ge not exists contains parseBool fileExists"
_RESULT: dict[str, Kind] = {
    **dict.fromkeys(f"{_STRINGS} base64Decode".split(), "str"),
    **dict.fromkeys(_INTS.split(), "int"),
    **dict.fromkeys(_BOOLS.split(), "bool"),
    "get": "kv",
}
# Functions returning a list, with the kind of its elements.
_ELEMENTS: dict[str, Kind] = {
    **dict.fromkeys(["gets", "sortKVByLength"], "kv"),
    **dict.fromkeys(["getvs", "ls", "lsdir", "split", "sortByLength"], "str"),
    "seq": "int",
}


def kind_of(expr: Expr, known: Mapping[str, Kind]) -> Kind:
    """The kind ``expr`` certainly has, given the kinds of the variables in scope."""
    if isinstance(expr, Const):
        value = expr.value
        if isinstance(value, bool):
            return "bool"
        return {str: "str", int: "int"}.get(type(value))
    if isinstance(expr, Ref):
        return known.get(expr.name) if expr.name else None
    if isinstance(expr, Field):
        return "str" if kind_of(expr.base, known) == "kv" else None
    if expr.function in ("and", "or"):
        kinds = {kind_of(arg, known) for arg in expr.args}
        return kinds.pop() if len(kinds) == 1 else None
    return _RESULT.get(expr.function)


def element_kind(expr: Expr, known: Mapping[str, Kind]) -> tuple[Kind, Kind]:
    """The kinds of (index, element) when ranging over ``expr``."""
    if not isinstance(expr, Call):
        return None, None
    if expr.function == "reverse" and len(expr.args) == 1:
        return element_kind(expr.args[0], known)
    if expr.function in _ELEMENTS:
        return "int", _ELEMENTS[expr.function]
    if expr.function == "jsonArray":
        return "int", None
    return None, None
