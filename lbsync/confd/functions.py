"""confd's template functions with Go's semantics, for templates converted from confd.

Converted templates reach these as ``confd.<name>`` (Go's builtins, confd's helpers from
kelseyhightower/confd ``resource/template/template_funcs.go``, Go's way of printing) and
``kv.<name>`` (the resource's key store, lbsync/confd/store.py, bound once at the top of a
converted template by ``confd.store(prefix, keys)``). Where Go's function would return an
error these raise ConfdFunctionError, which the renderer reports with the template line.
"""

from __future__ import annotations

import base64
import binascii
import json as _json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lbsync.confd.gofmt import go_sprintf, go_type, go_value
from lbsync.confd.store import ConfdFunctionError, KVPair, Store, go_path_clean, resource_keys


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "other"


def _comparable(a: object, b: object) -> None:
    if _kind(a) != _kind(b) or _kind(a) == "other":
        raise ConfdFunctionError(f"incompatible types for comparison: {a!r} and {b!r}")


def _go_json(data: str) -> Any:
    """encoding/json into interface{}: every number a float64; no NaN, Infinity or 1e400."""
    return _json.loads(data, parse_int=float, parse_float=_finite, parse_constant=_no_constant)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} out of range of float64")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"invalid character in {text!r}")


def _simple_case(text: str, change: Callable[[str], str]) -> str:
    """Go maps case rune by rune (Unicode's simple mapping: ``ß`` stays ``ß``), where
    Python's full mapping may give several characters (``SS``)."""
    if text.isascii():
        return change(text)
    out = []
    for char in text:
        changed = "i" if char == "\u0130" and change is str.lower else change(char)
        out.append(changed if len(changed) == 1 else char)
    return "".join(out)


class Functions:
    """The ``confd`` namespace of converted templates."""

    def __init__(self, read_keys: Callable[[], Mapping[str, str]]) -> None:
        """``read_keys`` returns the raw keys under the prefix, read when a template asks
        for its store (lbsync.render.RawKeys.read_all: the structural check sees them)."""
        self._read_keys = read_keys

    def store(self, prefix: str, watched: Sequence[str]) -> Store:
        return Store(resource_keys(self._read_keys(), prefix, watched))

    # printing, iteration, fields
    @staticmethod
    def text(value: object) -> str:
        return go_value(value, top=True)

    @staticmethod
    def elements(value: object) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, dict):
            return [value[k] for k in sorted(value)]
        if isinstance(value, list | tuple):
            return list(value)
        raise ConfdFunctionError(f"range can't iterate over {go_value(value)}")

    @staticmethod
    def pairs(value: object) -> list[tuple[Any, Any]]:
        if isinstance(value, dict):
            return [(k, value[k]) for k in sorted(value)]
        return list(enumerate(Functions.elements(value)))

    @staticmethod
    def field(value: object, name: str) -> object:
        if isinstance(value, dict):
            return value.get(name)
        if isinstance(value, KVPair) and name in ("Key", "Value"):
            return getattr(value, name)
        raise ConfdFunctionError(f"can't evaluate field {name} in type {go_type(value)}")

    # Go builtins
    @staticmethod
    def len(value: object) -> int:
        if isinstance(value, str):
            return len(value.encode())
        if isinstance(value, list | tuple | dict):
            return len(value)
        raise ConfdFunctionError(f"len of type {go_type(value)}")

    @staticmethod
    def index(value: object, *keys: object) -> object:
        for key in keys:
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, list | tuple) and isinstance(key, int):
                if not 0 <= key < len(value):
                    raise ConfdFunctionError(f"index out of range: {key}")
                value = value[key]
            else:
                raise ConfdFunctionError(f"can't index item of type {go_type(value)}")
        return value

    @staticmethod
    def printf(fmt: str, *args: object) -> str:
        return go_sprintf(fmt, *args)

    @staticmethod
    def eq(first: object, *others: object) -> bool:
        if not others:
            raise ConfdFunctionError("missing argument for comparison")
        for other in others:
            _comparable(first, other)
        return any(first == other for other in others)

    @staticmethod
    def ne(a: object, b: object) -> bool:
        _comparable(a, b)
        return a != b

    @staticmethod
    def lt(a: Any, b: Any) -> bool:
        _comparable(a, b)
        return bool(a < b)

    @staticmethod
    def le(a: Any, b: Any) -> bool:
        _comparable(a, b)
        return bool(a <= b)

    @staticmethod
    def gt(a: Any, b: Any) -> bool:
        _comparable(a, b)
        return bool(a > b)

    @staticmethod
    def ge(a: Any, b: Any) -> bool:
        _comparable(a, b)
        return bool(a >= b)

    # confd's helpers (template_funcs.go)
    @staticmethod
    def base(path: str) -> str:
        """Go's ``path.Base``."""
        if not path:
            return "."
        stripped = path.rstrip("/")
        return stripped.rsplit("/", 1)[-1] if stripped else "/"

    @staticmethod
    def dir(path: str) -> str:
        """Go's ``path.Dir``."""
        return go_path_clean(path[: path.rfind("/") + 1])

    @staticmethod
    def split(text: str, sep: str) -> list[str]:
        return list(text) if sep == "" else text.split(sep)

    @staticmethod
    def join(items: Iterable[str], sep: str) -> str:
        return sep.join(items)

    @staticmethod
    def json(data: str) -> dict[str, Any]:
        try:
            value = _go_json(data)
        except ValueError as exc:
            raise ConfdFunctionError(f"json: {exc}") from exc
        if value is not None and not isinstance(value, dict):
            raise ConfdFunctionError("json: cannot unmarshal a non-object into a map")
        return value or {}

    @staticmethod
    def jsonArray(data: str) -> list[Any]:
        try:
            value = _go_json(data)
        except ValueError as exc:
            raise ConfdFunctionError(f"jsonArray: {exc}") from exc
        if value is not None and not isinstance(value, list):
            raise ConfdFunctionError("jsonArray: cannot unmarshal a non-array into a slice")
        return value or []

    @staticmethod
    def toUpper(text: str) -> str:
        return _simple_case(text, str.upper)

    @staticmethod
    def toLower(text: str) -> str:
        return _simple_case(text, str.lower)

    @staticmethod
    def contains(text: str, sub: str) -> bool:
        return sub in text

    @staticmethod
    def replace(text: str, old: str, new: str, count: int) -> str:
        return text.replace(old, new, count if count >= 0 else -1)

    @staticmethod
    def trimSuffix(text: str, suffix: str) -> str:
        return text.removesuffix(suffix)

    @staticmethod
    def getenv(name: str, *default: str) -> str:
        return os.environ.get(name, "") or (default[0] if default else "")

    @staticmethod
    def atoi(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ConfdFunctionError(f'strconv.Atoi: parsing "{text}": invalid syntax')
        return int(text)

    @staticmethod
    def add(a: int, b: int) -> int:
        return a + b

    @staticmethod
    def sub(a: int, b: int) -> int:
        return a - b

    @staticmethod
    def mul(a: int, b: int) -> int:
        return a * b

    @staticmethod
    def div(a: int, b: int) -> int:
        if b == 0:
            raise ConfdFunctionError("integer divide by zero")
        quotient = abs(a) // abs(b)  # Go truncates toward zero
        return quotient if (a >= 0) == (b >= 0) else -quotient

    @staticmethod
    def mod(a: int, b: int) -> int:
        if b == 0:
            raise ConfdFunctionError("integer divide by zero")
        return a - Functions.div(a, b) * b

    @staticmethod
    def seq(first: int, last: int) -> list[int]:
        return list(range(first, last + 1))

    @staticmethod
    def map(*pairs: object) -> dict[str, object]:
        if len(pairs) % 2:
            raise ConfdFunctionError("invalid map call")
        keys = pairs[::2]
        if not all(isinstance(k, str) for k in keys):
            raise ConfdFunctionError("map keys must be strings")
        return {str(k): v for k, v in zip(keys, pairs[1::2], strict=True)}

    @staticmethod
    def reverse(values: list[Any]) -> list[Any]:
        values.reverse()  # in place, as confd's Reverse does
        return values

    @staticmethod
    def sortByLength(values: list[str]) -> list[str]:
        values.sort(key=len)
        return values

    @staticmethod
    def sortKVByLength(values: list[KVPair]) -> list[KVPair]:
        values.sort(key=lambda kv: len(kv.Key))
        return values

    @staticmethod
    def base64Encode(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    @staticmethod
    def base64Decode(text: str) -> str:
        try:
            return base64.b64decode(text.encode(), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError) as exc:
            raise ConfdFunctionError(f"base64Decode: {exc}") from exc

    @staticmethod
    def parseBool(text: str) -> bool:
        if text in ("1", "t", "T", "TRUE", "true", "True"):
            return True
        if text in ("0", "f", "F", "FALSE", "false", "False"):
            return False
        raise ConfdFunctionError(f'strconv.ParseBool: parsing "{text}": invalid syntax')

    @staticmethod
    def fileExists(path: str) -> bool:
        """confd's isFileExist: true unless stat says the file does not exist."""
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return True
