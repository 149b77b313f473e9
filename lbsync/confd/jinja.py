"""The Go-template AST → Jinja2 source that renders the same bytes under lbsync's options.

lbsync's environment sets ``trim_blocks`` and ``lstrip_blocks``; Go has neither. Every
statement tag is therefore written ``{%+ … +%}``, which turns both off for that tag, and
the parser has already applied Go's ``{{-``/``-}}`` markers to the text, so no tag trims
anything: the text between tags is exactly Go's output. Text Jinja2 would read as markup
(``{{``, ``{%``, ``{#``, a trailing ``{`` that would fuse with the next tag) or that it
would rewrite (``\\r``) is written as a string literal instead.

Values are printed through ``confd.text`` (Go's ``<no value>``, ``true``, ``[a b]``), the
key store is ``kv`` (bound once at the top to the resource's prefix and keys), and every
other function is ``confd.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lbsync.confd.goast import (
    Call,
    Const,
    Expr,
    Field,
    If,
    Node,
    Output,
    Range,
    Ref,
    SetVar,
    Text,
    With,
)
from lbsync.confd.gotemplate import STORE_FUNCTIONS


def _literal(value: str) -> str:
    """A Jinja2 string literal (Jinja2 unescapes like Python)."""
    return repr(value)


def _text(text: str) -> str:
    """Text as Jinja2 source: itself, unless Jinja2 would read it as markup or rewrite it.

    A trailing ``{`` alone (``upstream x {`` before a tag) becomes ``{{ '{' }}``.
    """
    if any(mark in text for mark in ("{{", "{%", "{#", "\r")):
        return "{{ " + _literal(text) + " }}"
    if text.endswith("{"):
        return text[:-1] + "{{ '{' }}"
    return text


def _tag(statement: str) -> str:
    return "{%+ " + statement + " +%}"


def expression(expr: Expr) -> str:
    if isinstance(expr, Const):
        return _constant(expr.value)
    if isinstance(expr, Ref):
        return expr.name or "none"
    if isinstance(expr, Field):
        return f"confd.field({expression(expr.base)}, {_literal(expr.name)})"
    return _call(expr)


def _constant(value: str | int | float | bool | None) -> str:
    if isinstance(value, str):
        return _literal(value)
    if value is None or isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


def _call(call: Call) -> str:
    args = [expression(arg) for arg in call.args]
    if call.function in ("and", "or"):
        return "(" + f" {call.function} ".join(args) + ")"
    if call.function == "not":
        return f"(not {args[0]})"
    owner = "kv" if call.function in STORE_FUNCTIONS else "confd"
    return f"{owner}.{call.function}({', '.join(args)})"


def _block(nodes: Sequence[Node], out: list[str]) -> None:
    for node in nodes:
        _node(node, out)


def _node(node: Node, out: list[str]) -> None:
    if isinstance(node, Text):
        out.append(_text(node.text))
    elif isinstance(node, Output):
        out.append("{{ confd.text(" + expression(node.expr) + ") }}")
    elif isinstance(node, SetVar):
        out.append(_tag(f"set {node.name} = {expression(node.expr)}"))
    elif isinstance(node, If):
        for i, (condition, body) in enumerate(node.branches):
            out.append(_tag(f"{'if' if i == 0 else 'elif'} {expression(condition)}"))
            _block(body, out)
        _otherwise(node.otherwise, out)
        out.append(_tag("endif"))
    elif isinstance(node, Range):
        target = f"{node.index}, {node.element}" if node.index else node.element
        how = "pairs" if node.index else "elements"
        out.append(_tag(f"for {target} in confd.{how}({expression(node.expr)})"))
        _block(node.body, out)
        _otherwise(node.otherwise, out)
        out.append(_tag("endfor"))
    elif isinstance(node, With):
        out.append(_tag(f"set {node.element} = {expression(node.expr)}"))
        out.append(_tag(f"if {node.element}"))
        _block(node.body, out)
        _otherwise(node.otherwise, out)
        out.append(_tag("endif"))


def _otherwise(nodes: Sequence[Node], out: list[str]) -> None:
    if nodes:
        out.append(_tag("else"))
        _block(nodes, out)


def emit(nodes: Sequence[Node], *, prefix: str, keys: Sequence[str], origin: str) -> str:
    """The whole Jinja2 template: a header naming its origin, the store, then the body."""
    header = [
        "{#+ converted by lbsync migrate-confd from " + origin.replace("#}", "# }") + " +#}",
        _tag(f"set kv = confd.store({_literal(prefix)}, {list(keys)!r})"),
    ]
    out: list[str] = []
    _block(nodes, out)
    return "".join(header) + "".join(out)
