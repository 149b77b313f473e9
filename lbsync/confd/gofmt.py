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


_VERB = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?(.?)", re.DOTALL)


_PRECISION_VERBS = frozenset("sfF")
_PLUS_VERBS = frozenset("dfF")


def unsupported_verb(flags: str, precision: str | None, verb: str) -> str | None:
    """Why lbsync cannot format this directive as Go does, or None if it can."""
    if not verb:
        return "a '%' at the end"
    if verb not in "svdqtfFxX%":
        return f"verb %{verb}"
    if set(flags) - set("-+0"):
        return f"flag {''.join(sorted(set(flags) - set('-+0')))!r} in %{verb}"
    if "+" in flags and verb not in _PLUS_VERBS:
        return f"flag '+' in %{verb}"
    if precision is not None and verb not in _PRECISION_VERBS:
        return f"a precision in %{verb}"
    return None


def printf_problems(fmt: str) -> list[str]:
    """What in a constant format lbsync cannot format as Go does (checked at conversion)."""
    problems = []
    for match in _VERB.finditer(fmt):
        flags, _width, precision, verb = match.groups()
        why = unsupported_verb(flags, precision, verb)
        if why is not None:
            problems.append(why)
    return problems


def go_sprintf(fmt: str, *args: object) -> str:
    """Go's ``fmt.Sprintf`` for the verbs templates use: %s %v %d %q %t %f %x %X %%,
    flags ``-+0``, widths, and precisions for %s and %f (``unsupported_verb``)."""
    out: list[str] = []
    pos = 0
    used = 0
    for match in _VERB.finditer(fmt):
        out.append(fmt[pos : match.start()])
        pos = match.end()
        flags, width, precision, verb = match.groups()
        why = unsupported_verb(flags, precision, verb)
        if why is not None:
            raise ConfdFunctionError(f"printf {fmt!r}: {why} is outside what lbsync formats")
        if verb == "%":
            out.append("%")
            continue
        if used >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[used]
        used += 1
        if width is not None and isinstance(arg, list | tuple | dict | KVPair):
            raise ConfdFunctionError(f"printf {fmt!r}: a width for a composite value")
        out.append(_pad(_format_one(verb, flags, precision, arg), flags, width, verb))
    out.append(fmt[pos:])
    if used < len(args):
        if any(isinstance(a, list | tuple | dict | KVPair) for a in args[used:]):
            raise ConfdFunctionError(f"printf {fmt!r}: extra composite arguments")
        extra = ", ".join(f"{go_type(a)}={go_value(a)}" for a in args[used:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _format_one(
    verb: str, flags: str, precision: str | None, arg: object, *, nested: bool = False
) -> str:
    """One argument; composites are formatted element by element, as Go's fmt does (a nil
    inside one prints ``<nil>`` whatever the verb)."""

    def each(value: object) -> str:
        return _format_one(verb, flags, precision, value, nested=True)

    if isinstance(arg, list | tuple):
        return "[" + " ".join(each(a) for a in arg) + "]"
    if isinstance(arg, dict):
        return "map[" + " ".join(f"{each(k)}:{each(arg[k])}" for k in sorted(arg)) + "]"
    if isinstance(arg, KVPair):
        return f"{{{each(arg.Key)} {each(arg.Value)}}}"
    if arg is None:
        return "<nil>" if verb == "v" or nested else f"%!{verb}(<nil>)"
    return _format_scalar(verb, flags, precision, arg)


def _format_scalar(verb: str, flags: str, precision: str | None, arg: object) -> str:
    bad = f"%!{verb}({go_type(arg)}={go_value(arg)})"
    plus = "+" if "+" in flags else ""
    if verb == "v":
        return go_value(arg)
    if isinstance(arg, bool):
        return go_value(arg) if verb == "t" else bad
    if isinstance(arg, int):
        if verb == "d":
            return (plus if arg >= 0 else "") + str(arg)
        return (f"{arg:x}" if verb == "x" else f"{arg:X}") if verb in "xX" else bad
    if isinstance(arg, float):
        if verb in "fF":
            return (
                plus if arg >= 0 else ""
            ) + f"{arg:.{6 if precision is None else int(precision)}f}"
        if verb in "xX":
            raise ConfdFunctionError(f"%{verb} of a float is outside what lbsync formats")
        return bad
    if isinstance(arg, str):
        if verb == "s":
            return arg if precision is None else arg[: int(precision or 0)]
        if verb == "q":
            return _go_quote(arg)
        if verb in "xX":
            return arg.encode().hex() if verb == "x" else arg.encode().hex().upper()
        return bad
    raise ConfdFunctionError(f"cannot format a {type(arg).__name__}")


def _pad(text: str, flags: str, width: str | None, verb: str) -> str:
    """Go pads on the left with spaces, or zeros (after a sign) with '0', right with '-'."""
    if width is None or len(text) >= int(width):
        return text
    size = int(width)
    if "-" in flags:
        return text.ljust(size)
    if "0" in flags:
        sign = text[0] if verb in "dfF" and text[:1] in ("+", "-") else ""
        return sign + text[len(sign) :].rjust(size - len(sign), "0")
    return text.rjust(size)


def _go_quote(text: str) -> str:
    """strconv.Quote: Go's escapes, ``\\xNN`` below 0x80, ``\\uNNNN``/``\\UNNNNNNNN`` for
    other runes that are not printable."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_QUOTE_ESCAPES = {
    "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
}  # fmt: skip
