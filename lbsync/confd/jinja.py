"""The Go-template AST → Jinja2 source that renders the same bytes under lbsync's options.

lbsync's environment sets ``trim_blocks`` and ``lstrip_blocks``; Go has neither. Every
statement tag is therefore written ``{%+ … +%}``, which turns both off for that tag, and
the parser has already applied Go's ``{{-``/``-}}`` markers to the text, so no tag trims
anything: the text between tags is exactly Go's output. Text Jinja2 would read as markup
(``{{``, ``{%``, ``{#``, a trailing ``{`` that would fuse with the next tag) or that it
would rewrite (``\\r``) is written as a string literal instead.

Values are printed through ``confd.text`` (Go's ``<no value>``, ``true``, ``[a b]``)
unless they are certainly a string or an int (gotypes.py), the key store is ``kv``
(bound once at the top to the resource's prefix and keys), and every other function is
``confd.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lbsync.confd.goast import (
    Call,
    Const,
    Define,
    Expr,
    Field,
    If,
    Include,
    Node,
    Output,
    Range,
    Ref,
    SetVar,
    Text,
    With,
)
from lbsync.confd.gotemplate import STORE_FUNCTIONS
from lbsync.confd.gotypes import Kind, element_kind, kind_of

_PLAIN_COMPARISONS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


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


def _constant(value: str | int | float | bool | None) -> str:
    if isinstance(value, str):
        return _literal(value)
    if value is None or isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


class _Emitter:
    """Writes Jinja2 for nodes, knowing the kinds of the variables in scope."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self._known: dict[str, Kind] = {}

    def expression(self, expr: Expr) -> str:
        if isinstance(expr, Const):
            return _constant(expr.value)
        if isinstance(expr, Ref):
            return expr.name or "none"
        if isinstance(expr, Field):
            base = self.expression(expr.base)
            if kind_of(expr.base, self._known) == "kv":
                return f"{base}.{expr.name}"
            return f"confd.field({base}, {_literal(expr.name)})"
        return self._call(expr)

    def _call(self, call: Call) -> str:
        args = [self.expression(arg) for arg in call.args]
        if call.function in ("and", "or"):
            return "(" + f" {call.function} ".join(args) + ")"
        if call.function == "not":
            return f"(not {args[0]})"
        if call.function in _PLAIN_COMPARISONS and len(args) == 2:
            kinds = {kind_of(arg, self._known) for arg in call.args}
            if len(kinds) == 1 and kinds & {"str", "int"}:
                return f"({args[0]} {_PLAIN_COMPARISONS[call.function]} {args[1]})"
        owner = "kv" if call.function in STORE_FUNCTIONS else "confd"
        return f"{owner}.{call.function}({', '.join(args)})"

    def block(self, nodes: Sequence[Node]) -> None:
        for node in nodes:
            self.node(node)

    def node(self, node: Node) -> None:
        if isinstance(node, Text):
            self.out.append(_text(node.text))
        elif isinstance(node, Output):
            self._output(node.expr)
        elif isinstance(node, SetVar):
            self._known[node.name] = kind_of(node.expr, self._known)
            self.out.append(_tag(f"set {node.name} = {self.expression(node.expr)}"))
        elif isinstance(node, If):
            for i, (condition, body) in enumerate(node.branches):
                self.out.append(_tag(f"{'if' if i == 0 else 'elif'} {self.expression(condition)}"))
                self.block(body)
            self._otherwise(node.otherwise)
            self.out.append(_tag("endif"))
        elif isinstance(node, Range):
            self._range(node)
        elif isinstance(node, Include):
            argument = "none" if node.expr is None else self.expression(node.expr)
            self.out.append("{{ " + f"{node.macro}({argument})" + " }}")
        elif isinstance(node, Define):
            self.out.append(_tag(f"macro {node.macro}({node.param})"))
            self.block(node.body)
            self.out.append(_tag("endmacro"))
        elif isinstance(node, With):
            self._known[node.element] = kind_of(node.expr, self._known)
            self.out.append(_tag(f"set {node.element} = {self.expression(node.expr)}"))
            self.out.append(_tag(f"if {node.element}"))
            self.block(node.body)
            self._otherwise(node.otherwise)
            self.out.append(_tag("endif"))

    def _output(self, expr: Expr) -> None:
        text = self.expression(expr)
        if kind_of(expr, self._known) not in ("str", "int"):
            text = f"confd.text({text})"
        self.out.append("{{ " + text + " }}")

    def _range(self, node: Range) -> None:
        index_kind, element = element_kind(node.expr, self._known)
        self._known[node.element] = element
        if node.index:
            self._known[node.index] = index_kind
        target = f"{node.index}, {node.element}" if node.index else node.element
        how = "pairs" if node.index else "elements"
        self.out.append(_tag(f"for {target} in confd.{how}({self.expression(node.expr)})"))
        self.block(node.body)
        self._otherwise(node.otherwise)
        self.out.append(_tag("endfor"))

    def _otherwise(self, nodes: Sequence[Node]) -> None:
        if nodes:
            self.out.append(_tag("else"))
            self.block(nodes)


def emit(nodes: Sequence[Node], *, prefix: str, keys: Sequence[str], origin: str) -> str:
    """The whole Jinja2 template: a header naming its origin, the store, then the body."""
    header = [
        "{#+ converted by lbsync migrate-confd from " + origin.replace("#}", "# }") + " +#}",
        _tag(f"set kv = confd.store({_literal(prefix)}, {list(keys)!r})"),
    ]
    emitter = _Emitter()
    # Go's defined templates can be run before their definition; Jinja2 macros cannot
    emitter.block([node for node in nodes if isinstance(node, Define)])
    emitter.block([node for node in nodes if not isinstance(node, Define)])
    return "".join(header) + "".join(emitter.out)
