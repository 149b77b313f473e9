"""Go's way of printing values: text/template's output and ``fmt.Sprintf``.

``<no value>`` for a missing value, ``true``, ``[a b]``, ``map[k:v]``, ``{key value}``,
``1e+06``, ``%!d(string=x)``: what Go prints, so a converted template gives Go's bytes.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from lbsync.confd.store import ConfdFunctionError, KVPair


def go_float(value: float) -> str:
    """``%v`` of a float64: shortest digits, exponent form past 1e+06 or below 1e-04."""
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)) if any(digits) else "0"
    exp = len(text) - 1 + exponent if any(digits) else 0
    neg = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{neg}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp >= len(text) - 1:
        return neg + text + "0" * (exp - len(text) + 1)
    if exp >= 0:
        return f"{neg}{text[: exp + 1]}.{text[exp + 1 :]}"
    return f"{neg}0.{'0' * (-exp - 1)}{text}"


def go_value(value: object, *, top: bool = False) -> str:
    """How Go's fmt ``%v`` prints a value (``top``: as text/template prints an action)."""
    if value is None:
        return "<no value>" if top else "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, KVPair):
        return f"{{{value.Key} {value.Value}}}"
    if isinstance(value, list | tuple):
        return "[" + " ".join(go_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_value(value[k])}" for k in sorted(value)) + "]"
    raise ConfdFunctionError(f"cannot print a {type(value).__name__}")


def go_type(value: object) -> str:
    names = {bool: "bool", int: "int", float: "float64", str: "string"}
    if isinstance(value, KVPair):
        return "memkv.KVPair"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return names.get(type(value), type(value).__name__)


_VERB = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?([a-zA-Z%])")


def go_sprintf(fmt: str, *args: object) -> str:
    """Go's ``fmt.Sprintf`` for the verbs templates use: %s %v %d %q %t %f %x %X %%."""
    out: list[str] = []
    pos = 0
    used = 0
    for match in _VERB.finditer(fmt):
        out.append(fmt[pos : match.start()])
        pos = match.end()
        flags, width, precision, verb = match.groups()
        if verb == "%":
            out.append("%")
            continue
        if used >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[used]
        used += 1
        out.append(_pad(_format_one(verb, flags, precision, arg), flags, width))
    out.append(fmt[pos:])
    if used < len(args):
        extra = ", ".join(f"{go_type(a)}={go_value(a)}" for a in args[used:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _format_one(verb: str, flags: str, precision: str | None, arg: object) -> str:
    bad = f"%!{verb}({go_type(arg)}={go_value(arg)})"
    is_int = isinstance(arg, int) and not isinstance(arg, bool)
    if verb == "v":
        return go_value(arg)
    if verb == "s":
        if not isinstance(arg, str | list | KVPair):
            return bad
        text = go_value(arg)
        return text[: int(precision or 0)] if precision is not None else text
    if verb == "d":
        if not isinstance(arg, int) or isinstance(arg, bool):
            return bad
        return ("+" if "+" in flags and arg >= 0 else "") + str(arg)
    if verb == "t":
        return go_value(arg) if isinstance(arg, bool) else bad
    if verb == "q":
        return _go_quote(arg) if isinstance(arg, str) else bad
    if verb in "xX" and (is_int or isinstance(arg, str)):
        text = arg.encode().hex() if isinstance(arg, str) else format(arg, "x")
        return text.upper() if verb == "X" else text
    if verb in "fF" and isinstance(arg, float | int) and not isinstance(arg, bool):
        return f"{float(arg):.{int(precision) if precision is not None else 6}f}"
    return bad


def _pad(text: str, flags: str, width: str | None) -> str:
    if width is None or len(text) >= int(width):
        return text
    if "-" in flags:
        return text.ljust(int(width))
    if "0" in flags and re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
        sign = text[0] if text[0] in "+-" else ""
        return sign + text[len(sign) :].rjust(int(width) - len(sign), "0")
    return text.rjust(int(width))


def _go_quote(text: str) -> str:
    """strconv.Quote for printable text: JSON's escaping is the same for these."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\x{ord(char):02x}"))
    return '"' + "".join(out) + '"'
