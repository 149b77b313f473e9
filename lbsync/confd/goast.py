"""The AST of the Go ``text/template`` subset lbsync translates (frozen nodes).

Expressions: constants, references to a variable or to dot (renamed uniquely by the
parser), field access and function calls (a pipeline ``a | f b`` is the call ``f(b, a)``).
Statements: text (already trimmed as Go's ``{{-``/``-}}`` say), output, variable
declaration, ``if``/``else if``/``else``, ``range``, ``with``, and the templates a file
defines (``define``/``block``) and runs (``template``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    line: int
    column: int


@dataclass(frozen=True)
class Const:
    value: str | int | float | bool | None


@dataclass(frozen=True)
class Ref:
    """The value of a Go variable or of dot; ``name`` None is Go's nil (top-level dot)."""

    name: str | None


@dataclass(frozen=True)
class Field:
    """``base.Name``: a struct field (``.Key``/``.Value``) or a map key."""

    base: Expr
    name: str


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Expr, ...]


Expr = Const | Ref | Field | Call


# ---- statements --------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Output:
    expr: Expr


@dataclass(frozen=True)
class SetVar:
    name: str
    expr: Expr


@dataclass(frozen=True)
class If:
    branches: tuple[tuple[Expr, tuple[Node, ...]], ...]
    otherwise: tuple[Node, ...]


@dataclass(frozen=True)
class Range:
    """``range [$i,] [$e :=] expr``: ``element`` is dot inside the body (and ``$e``)."""

    index: str | None
    element: str
    expr: Expr
    body: tuple[Node, ...]
    otherwise: tuple[Node, ...]


@dataclass(frozen=True)
class With:
    element: str
    expr: Expr
    body: tuple[Node, ...]
    otherwise: tuple[Node, ...]


@dataclass(frozen=True)
class Define:
    """``{{define "name"}}``: a Jinja2 macro ``macro`` whose parameter is dot (and ``$``)."""

    macro: str
    param: str
    body: tuple[Node, ...]


@dataclass(frozen=True)
class Include:
    """``{{template "name" pipeline}}``: the defined template, run with dot = ``expr``."""

    macro: str
    expr: Expr | None


Node = Text | Output | SetVar | If | Range | With | Define | Include
