"""Incremental rendering of plain for-loops: an item's output is reused while it is the same object.

A change to one instance of a 10,000-instance service makes a new ``Service`` whose
instances are, but for one, the very objects of the previous snapshot (the catalog keeps
unchanged ``Instance`` objects). A loop such as ``{% for i in service.up %}server
{{ i.address }};{% endfor %}`` therefore needs to render one body, not 10,000: the rest
are the outputs of the previous render, kept by item identity.

At compile time (``memoise_loops``, on the template's AST) a loop is rewritten only when
its body is provably a function of the loop variable and of the names it reads, with no
side effect:

- ``{% for x in <any expression> %}`` with a plain name, no ``if`` filter, not
  ``recursive``;
- the body (and the ``else``, which must not read ``x``) holds only text, ``{{ }}``
  output and ``{% if %}``, and expressions built from names, constants, attribute/item
  lookups, operators, comparisons, and the pure built-in filters and tests below: no call
  (a method could have a side effect), no ``{% set %}``, no nested loop, no macro,
  include, block or ``loop``/``caller``/``varargs``/``kwargs``;
- the template changes no autoescape setting (the body's output is then plain ``str``);
- the loop is not inside a ``{% cache %}`` block, which keeps its whole output already.

Every other loop, and the rest of the template, compiles exactly as Jinja compiles it.
A rewritten loop makes a tuple of its iterable, then renders each body through a call
block taking the item as its argument, whose output is kept per item as long as the item
is the same object (``is``) and every other name the body reads has the same value: the
same object for instances, services and states, an equal value of the same type for
``str``, ``int``, ``bool`` and ``None``. When another name holds anything else (a dict, a
list, a float...) or the first item is not an ``Instance``, ``Service`` or ``str``, the
loop runs as the plain loop, unchanged (a copy of it is compiled beside the memoised
one). A whole loop over the same tuple (``service.up`` of an unchanged service) is one
lookup. Entries hold their objects, so an id cannot be reused while cached; what a
successful render did not use is dropped once the entries of a loop outnumber twice the
items it last rendered.

The data the templates read is frozen: a template that mutates it (``service.settings
.update(...)``) breaks this memo as it breaks ``{% cache %}``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, count
from operator import is_not
from typing import Any, cast

import jinja2
import jinja2.ext
from jinja2 import nodes

from lbsync.model import Instance, Service, State

_LOOKUP_FILTER = "_lbsync_loop_lookup"
_ITEMS_FILTER = "_lbsync_loop_items"
_PREFIX = "_lbsync_loop_"

# Built-in filters and tests that only compute from their arguments (no context, no
# environment state, no side effect on their input) and return a value, not an iterator
# (whose printed form holds its address: ``batch``, ``reverse``, ``unique``... are out).
_PURE_FILTERS = frozenset(
    {
        "abs", "capitalize", "center", "default", "d", "escape", "e", "filesizeformat",
        "first", "float", "format", "indent", "int", "join", "last", "length", "count",
        "list", "lower", "replace", "round", "safe", "string", "striptags", "title", "trim",
        "truncate", "upper", "urlencode", "wordcount", "wordwrap", "sort", "min", "max",
        "sum", "dictsort", "tojson", "forceescape", "xmlattr",
    }
)  # fmt: skip
_PURE_TESTS = frozenset(
    {
        "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped",
        "even", "false", "filter", "float", "ge", "gt", "greaterthan", "in", "integer",
        "iterable", "le", "lower", "lt", "lessthan", "mapping", "ne", "none", "number",
        "odd", "sameas", "sequence", "string", "test", "true", "undefined", "upper",
    }
)  # fmt: skip
_EXPRESSIONS = (
    nodes.Const, nodes.TemplateData, nodes.Name, nodes.Getattr, nodes.Getitem, nodes.Slice,
    nodes.Tuple, nodes.List, nodes.Dict, nodes.Pair, nodes.Keyword, nodes.CondExpr,
    nodes.BinExpr, nodes.UnaryExpr, nodes.Concat, nodes.Compare, nodes.Operand,
)  # fmt: skip
_STATEMENTS = (nodes.Output, nodes.If)
_RESERVED_NAMES = frozenset({"loop", "caller", "varargs", "kwargs", "self"})

# What a memo key may hold: values compared by type and ==, objects compared by identity.
_VALUE_TYPES = frozenset({str, int, bool, type(None)})
_OBJECT_TYPES = frozenset({Instance, Service, State})
_ITEM_TYPES = frozenset({Instance, Service, str})


# --- compile time ------------------------------------------------------------------------


def memoise_loops(
    template: nodes.Template, name: str | None, extension: LoopMemo, cached: str
) -> None:
    """Rewrite every loop of ``template`` whose body qualifies (see the module), in place.

    ``cached``: the identifier of the extension whose call blocks already keep their
    output (``{% cache %}``): loops inside them are left as they are, or the same text
    would be held twice (+3 MB at 10,000 instances with the stock nginx template)."""
    if any(template.find_all((nodes.EvalContextModifier,))):
        return
    _rewrite_children(template, _Rewrite(name, extension, cached, count()))


@dataclass(frozen=True, slots=True)
class _Rewrite:
    name: str | None
    extension: LoopMemo
    cached: str
    counter: Iterator[int]


def _rewrite_children(node: nodes.Node, rewrite: _Rewrite) -> None:
    for field_name, value in node.iter_fields():
        if isinstance(value, list):
            rewritten: list[Any] = []
            for child in value:
                if isinstance(child, nodes.For) and (free := _free_names(child)) is not None:
                    slot = (rewrite.name, next(rewrite.counter))
                    rewritten.extend(_memoised(child, free, slot, rewrite.extension))
                else:
                    rewritten.append(child)
                if isinstance(child, nodes.Node) and not _keeps_output(child, rewrite.cached):
                    _rewrite_children(child, rewrite)
            setattr(node, field_name, rewritten)
        elif isinstance(value, nodes.Node):
            _rewrite_children(value, rewrite)


def _keeps_output(node: nodes.Node, cached: str) -> bool:
    if not isinstance(node, nodes.CallBlock) or not isinstance(node.call, nodes.Call):
        return False
    called = node.call.node
    return isinstance(called, nodes.ExtensionAttribute) and called.identifier == cached


def _free_names(loop: nodes.For) -> list[str] | None:
    """The names the body reads besides the loop variable, or None if the loop does not
    qualify. An ``else`` must qualify too, and not read the loop variable: it runs in the
    enclosing scope (its names are not part of the memo key, as its output is not kept)."""
    if not isinstance(loop.target, nodes.Name) or loop.test or loop.recursive:
        return None
    target = loop.target.name
    free: set[str] = set()
    in_else: set[str] = set()
    if not all(_qualifies(statement, free) for statement in loop.body):
        return None
    if not all(_qualifies(statement, in_else) for statement in loop.else_):
        return None
    if target in in_else or (free | in_else) & _RESERVED_NAMES:
        return None
    if any(name.startswith(_PREFIX) for name in free | in_else):
        return None
    return sorted(free - {target})


def _qualifies(node: nodes.Node, free: set[str]) -> bool:
    if isinstance(node, nodes.Name):
        if node.ctx != "load":
            return False
        free.add(node.name)
        return True
    if isinstance(node, nodes.Filter):
        if node.name not in _PURE_FILTERS or node.dyn_args or node.dyn_kwargs:
            return False
    elif isinstance(node, nodes.Test):
        if node.name not in _PURE_TESTS or node.dyn_args or node.dyn_kwargs:
            return False
    elif not isinstance(node, _STATEMENTS + _EXPRESSIONS):
        return False
    return all(_qualifies(child, free) for child in node.iter_child_nodes())


def _memoised(
    loop: nodes.For, free: list[str], slot: tuple[str | None, int], extension: LoopMemo
) -> list[nodes.Node]:
    """``{% set it = <iter> | items %}{% set held = it | lookup(free, slot) %}
    {% if held is none %}{% call(x) fill(it, free, slot) %}body{% endcall %}
    {% elif held is false %}{% for x in it %}body{% endfor %}{% else %}{{ held }}{% endif %}
    {% if not it %}else{% endif %}``.

    ``items`` makes a tuple of the iterable (the plain loop would consume it all too), so
    that ``else`` can tell whether there was an item."""
    number = slot[1]
    iterable, held = f"{_PREFIX}iter_{number}", f"{_PREFIX}held_{number}"
    values = nodes.Tuple([nodes.Name(n, "load") for n in free], "load")
    where = [values, nodes.Const(slot[0]), nodes.Const(number)]
    lookup = nodes.Filter(nodes.Name(iterable, "load"), _LOOKUP_FILTER, where, [], None, None)
    fill = extension.call_method("_fill", [nodes.Name(iterable, "load"), *where])
    assert isinstance(loop.target, nodes.Name)
    param = nodes.Name(loop.target.name, "param")
    memo = nodes.CallBlock(fill, [param], [], loop.body)
    target = nodes.Name(loop.target.name, "store")
    body = [_copy(node) for node in loop.body]
    plain = nodes.For(target, nodes.Name(iterable, "load"), body, [], None, False)
    missing, unkeyed = (
        nodes.Test(nodes.Name(held, "load"), test, [], [], None, None) for test in ("none", "false")
    )
    reuse = nodes.Output([nodes.Name(held, "load")])
    items = nodes.Filter(loop.iter, _ITEMS_FILTER, [], [], None, None)
    statements: list[nodes.Node] = [
        nodes.Assign(nodes.Name(iterable, "store"), items),
        nodes.Assign(nodes.Name(held, "store"), lookup),
        nodes.If(missing, [memo], [nodes.If(unkeyed, [plain], [], [])], [reuse]),
    ]
    if loop.else_:
        empty = nodes.Not(nodes.Name(iterable, "load"))
        statements.append(nodes.If(empty, loop.else_, [], []))
    for statement in statements:
        statement.set_lineno(loop.lineno)
    return statements


def _copy(node: nodes.Node) -> nodes.Node:
    """A copy of ``node`` and the nodes under it (not of what they refer to: ``deepcopy``
    would copy the environment, its template cache included)."""
    clone = copy.copy(node)
    for name, value in node.iter_fields():
        if isinstance(value, list):
            setattr(clone, name, [_copy(v) if isinstance(v, nodes.Node) else v for v in value])
        elif isinstance(value, nodes.Node):
            setattr(clone, name, _copy(value))
    return clone


# --- render time -------------------------------------------------------------------------

_SlotKey = tuple[str | None, int]


@dataclass(frozen=True, slots=True)
class _Loop:
    """One execution of a loop: its items, the other names' values and key, its output."""

    items: tuple[object, ...]
    values: tuple[object, ...]
    key: tuple[object, ...]
    text: str
    texts: list[str]  # per item; never changed once the loop is kept


@dataclass(slots=True)
class _Pieces:
    """The bodies rendered with one value of the other names, by the id of their item.

    ``held`` keeps every item (and ``values`` every value) alive, so no other object can
    have an id found in ``texts``: a hit needs no identity check."""

    values: tuple[object, ...]
    held: dict[int, object] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Slot:
    """The memo of one rewritten loop of one template."""

    pieces: dict[tuple[object, ...], _Pieces] = field(default_factory=dict)
    loops: dict[int, _Loop] = field(default_factory=dict)
    # The same loops by (key, number of items): where a loop over a new tuple finds the
    # loop it most likely replaces (the previous version of the same service).
    shapes: dict[tuple[tuple[object, ...], int], _Loop] = field(default_factory=dict)


def _items(iterable: Iterable[object]) -> tuple[object, ...]:
    return iterable if type(iterable) is tuple else tuple(iterable)


def _key(values: tuple[object, ...]) -> tuple[object, ...] | None:
    """What the loop's other names are compared by; None when one cannot be trusted."""
    key: list[object] = []
    for value in values:
        kind = type(value)
        if kind in _VALUE_TYPES:
            key.append((kind, value))
        elif kind in _OBJECT_TYPES:
            key.append((kind, id(value)))
        else:
            return None
    return tuple(key)


class LoopMemo(jinja2.ext.Extension):
    """The render-time half of ``memoise_loops``: the per-item and per-loop memo."""

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        self._slots: dict[_SlotKey, _Slot] = {}
        self._fresh: dict[_SlotKey, dict[int, _Loop]] | None = None
        environment.filters[_LOOKUP_FILTER] = self._lookup
        environment.filters[_ITEMS_FILTER] = _items

    def _lookup(
        self, items: tuple[object, ...], values: tuple[object, ...], name: str | None, number: int
    ) -> str | bool | None:
        """The loop's whole output from the previous render, when it iterates the same
        tuple with the same values (a ``_Loop`` holds both, so their ids are theirs); None
        to fill it through the memo; False when the memo cannot key it (a value it cannot
        compare, or items of another type): the plain loop then renders it."""
        key = _key(values)
        if key is None or (items and type(items[0]) not in _ITEM_TYPES):
            return False
        slot = self._slots.get((name, number))
        if slot is None:
            return None
        hit = slot.loops.get(id(items))
        if hit is None or hit.items is not items or hit.key != key:
            return None
        self._keep((name, number), hit)
        return hit.text

    def _fill(
        self,
        items: tuple[object, ...],
        values: tuple[object, ...],
        name: str | None,
        number: int,
        caller: Any,
    ) -> str:
        key = _key(values)
        assert key is not None  # _lookup returned None, not False
        slot = self._slots.setdefault((name, number), _Slot())
        pieces = slot.pieces.get(key)
        if pieces is None:
            pieces = slot.pieces[key] = _Pieces(values)
        found, where = _reuse(items, key, pieces, slot.shapes.get((key, len(items))))
        keep = _render_missing(items, found, pieces, caller, where)
        texts = cast(list[str], found)
        text = "".join(texts)
        if keep:
            self._keep((name, number), _Loop(items, values, key, text, texts))
        return text

    def _keep(self, slot: _SlotKey, loop: _Loop) -> None:
        if self._fresh is not None:
            self._fresh.setdefault(slot, {})[id(loop.items)] = loop

    def begin(self) -> None:
        self._fresh = {}

    def commit(self, ok: bool) -> None:
        """After a successful render its loops replace the slots' previous ones; a slot whose
        pieces outnumber twice the items its loops hold keeps only theirs."""
        if ok and self._fresh is not None:
            for key, loops in self._fresh.items():
                slot = self._slots.setdefault(key, _Slot())
                slot.loops = loops
                slot.shapes = {(loop.key, len(loop.items)): loop for loop in loops.values()}
                _prune(slot)
        self._fresh = None


def _reuse(
    items: tuple[object, ...],
    key: tuple[object, ...],
    pieces: _Pieces,
    previous: _Loop | None,
) -> tuple[list[str | None], list[int] | None]:
    """Each item's text where the memo has it, else None; and where the Nones may be
    (None: anywhere).

    ``previous``: a loop of the last render with the same key over as many items. Its
    tuple and this one are compared position by position in C and only the items not at
    their old place are looked up: ~3x cheaper than a lookup per item (one big service
    whose instance changed in place). The result is exact whichever loop it is."""
    if previous is None:
        return list(map(pieces.texts.get, map(id, items))), None
    found: list[str | None] = list(previous.texts)
    where = list(compress(count(), map(is_not, items, previous.items)))
    for index in where:
        found[index] = pieces.texts.get(id(items[index]))
    return found, where


def _render_missing(
    items: tuple[object, ...],
    found: list[str | None],
    pieces: _Pieces,
    caller: Any,
    where: list[int] | None,
) -> bool:
    """Render the bodies ``found`` has no text for, at the indexes ``where`` holds, or
    anywhere (``list.index`` finds them in C). False if an item was of a type the memo
    does not keep (a dict after strings): then the loop as a whole must not be reused
    either. Every other item is of a kept type: its text came from the memo."""
    memoisable = True
    for index in where if where is not None else _nones(found):
        if found[index] is None:
            item = items[index]
            found[index] = text = caller(item)
            if type(item) in _ITEM_TYPES:
                pieces.held[id(item)] = item
                pieces.texts[id(item)] = text
            else:
                memoisable = False
    return memoisable


def _nones(found: list[str | None]) -> Iterator[int]:
    index = -1
    while True:
        try:
            index = found.index(None, index + 1)
        except ValueError:
            return
        yield index


def _prune(slot: _Slot) -> None:
    size = sum(len(pieces.texts) for pieces in slot.pieces.values())
    if size <= 2 * sum(len(loop.items) for loop in slot.loops.values()) + 256:
        return
    live: dict[tuple[object, ...], set[int]] = {}
    for loop in slot.loops.values():
        live.setdefault(loop.key, set()).update(map(id, loop.items))
    kept: dict[tuple[object, ...], _Pieces] = {}
    for key, ids in live.items():
        old = slot.pieces.get(key)
        if old is not None:
            new = kept[key] = _Pieces(old.values)
            for ident in ids & old.texts.keys():
                new.held[ident], new.texts[ident] = old.held[ident], old.texts[ident]
    slot.pieces = kept
