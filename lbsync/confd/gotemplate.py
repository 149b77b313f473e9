"""Go ``text/template`` source → the AST of the subset confd templates use (goast.py).

The parser does at parse time what Go's does: it resolves every ``$variable`` to its
declaration (Go rejects an undefined variable when parsing) and names each declaration
uniquely (a Jinja2 ``set`` in an ``if`` would otherwise leak into and shadow an outer Go
variable of the same name). Anything outside the subset raises
:class:`~lbsync.errors.ConversionError` with the file, line, column and construct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
from lbsync.confd.gofmt import printf_problems
from lbsync.confd.golex import LITERALS, Action, Token, Where, lex, literal

# Functions a converted template may call: Go's builtins we translate, confd's store
# functions (memkv) and confd's helpers (resource/template/template_funcs.go).
BUILTINS = frozenset(
    {"and", "or", "not", "len", "index", "printf", "eq", "ne", "lt", "le", "gt", "ge"}
)
STORE_FUNCTIONS = frozenset({"get", "gets", "getv", "getvs", "ls", "lsdir", "exists"})
HELPERS = frozenset(
    {
        "base", "dir", "split", "join", "json", "jsonArray", "toUpper", "toLower",
        "contains", "replace", "trimSuffix", "getenv", "atoi", "add", "sub", "mul",
        "div", "mod", "seq", "map", "reverse", "sortByLength", "sortKVByLength",
        "base64Encode", "base64Decode", "parseBool", "fileExists",
    }
)  # fmt: skip
FUNCTIONS = BUILTINS | STORE_FUNCTIONS | HELPERS
# confd functions refused on purpose: lbsync renders the same bytes for the same keys.
_REFUSED = {
    "datetime": "the time of rendering would make every render differ (a rewrite and a "
    "reload on every round); render a key instead",
    "lookupIP": "a DNS answer at render time is not in etcd; lbsync renders etcd's state",
    "lookupSRV": "a DNS answer at render time is not in etcd; lbsync renders etcd's state",
}
_MANY = 1 << 16
_ARITY = {
    "and": (1, _MANY), "or": (1, _MANY), "not": (1, 1), "len": (1, 1), "index": (1, _MANY),
    "printf": (1, _MANY), "eq": (2, _MANY), "ne": (2, 2), "lt": (2, 2), "le": (2, 2),
    "gt": (2, 2), "ge": (2, 2),
}  # fmt: skip
_KEYWORDS = frozenset({"if", "else", "end", "range", "with", "break", "continue"})


@dataclass
class _Scope:
    variables: dict[str, str] = field(default_factory=dict)
    dot: str | None = None


class _Parser:
    def __init__(self, items: list[Text | Action], where: Where) -> None:
        self._items = items
        self._at = 0
        self._where = where
        self._scopes: list[_Scope] = [_Scope({"$": ""})]
        self._counter = 0
        self._macros: dict[str, str] = {}  # Go template name -> Jinja2 macro name
        self._defined: set[str] = set()
        self._used: dict[str, int] = {}  # Go template name -> offset of its first use
        self._in_define = False

    # -- statements --

    def parse(self) -> tuple[Node, ...]:
        body, stop = self._block()
        if stop is not None:
            raise self._where.error(f"unexpected {{{{{stop[0]}}}}}", stop[1])
        for name, offset in self._used.items():
            if name not in self._defined:
                raise self._where.error(f"no template {name!r} is defined", offset)
        return body

    def _block(self) -> tuple[tuple[Node, ...], tuple[str, int, list[Token]] | None]:
        """Nodes up to ``{{end}}``/``{{else…}}``; returns them and the stop (or None at EOF)."""
        nodes: list[Node] = []
        while self._at < len(self._items):
            item = self._items[self._at]
            self._at += 1
            if isinstance(item, Text):
                nodes.append(item)
                continue
            if item.comment:
                continue
            tokens = list(item.tokens)
            if not tokens:
                raise self._where.error("empty action", item.offset)
            head = tokens[0]
            if head.kind == "ident" and head.text in ("end", "else"):
                return tuple(nodes), (head.text, item.offset, tokens[1:])
            nodes.extend(self._statement(tokens, item.offset))
        return tuple(nodes), None

    def _statement(self, tokens: list[Token], offset: int) -> list[Node]:
        head = tokens[0]
        if head.kind == "ident" and head.text == "if":
            return self._if(tokens[1:], offset)
        if head.kind == "ident" and head.text == "range":
            return [self._range(tokens[1:], offset)]
        if head.kind == "ident" and head.text == "with":
            return [self._with(tokens[1:], offset)]
        if head.kind == "ident" and head.text in ("define", "block"):
            return self._define(tokens, offset)
        if head.kind == "ident" and head.text == "template":
            name, rest = self._template_name(tokens)
            expr = self._pipeline(rest, offset, declare=False)[1] if rest else None
            return [Include(self._macro(name, head.offset), expr)]
        if head.kind == "ident" and head.text in _KEYWORDS:
            raise self._where.error(
                f"{{{{{head.text}}}}} is outside the subset lbsync translates", head.offset
            )
        names, expr = self._pipeline(tokens, offset, declare=True)
        if not names:
            return [Output(expr)]
        return [SetVar(self._declare(names[0]), expr)]

    def _if(self, tokens: list[Token], offset: int) -> list[Node]:
        """``if``/``else if``/``else``; ``if $x := p`` binds $x before the test."""
        branches: list[tuple[Expr, tuple[Node, ...]]] = []
        prelude: list[Node] = []
        self._push()
        while True:
            names, condition = self._pipeline(tokens, offset, declare=not branches)
            if names:
                prelude.append(SetVar(self._declare(names[0]), condition))
                condition = Ref(self._scopes[-1].variables[names[0]])
            self._push()
            body, stop = self._block()
            self._pop()
            branches.append((condition, body))
            kind, at, rest = self._expect_stop(stop, offset, "if")
            if kind == "end":
                self._pop()
                return [*prelude, If(tuple(branches), ())]
            if rest and rest[0].kind == "ident" and rest[0].text == "if":
                tokens, offset = rest[1:], at
                continue
            if rest:
                raise self._where.error(
                    f"{{{{else {rest[0].text}}}}} is outside the subset lbsync translates", at
                )
            otherwise = self._closed_block(offset, "if")
            self._pop()
            return [*prelude, If(tuple(branches), otherwise)]

    def _define(self, tokens: list[Token], offset: int) -> list[Node]:
        """``{{define "n"}}…{{end}}`` (top level only, as in Go) or ``{{block "n" p}}…{{end}}``
        (a define, run in place). The body sees only its dot and ``$``, both its argument."""
        head = tokens[0]
        if len(self._scopes) != 1 or self._in_define:  # Go allows a nested block; lbsync not
            raise self._where.error(
                f"{{{{{head.text}}}}} below the top level is outside the subset lbsync translates",
                head.offset,
            )
        name, rest = self._template_name(tokens)
        if head.text == "define" and rest:
            raise self._where.error("{{define}} takes a name only", rest[0].offset)
        if head.text == "block" and not rest:
            raise self._where.error("{{block}} needs a pipeline", head.offset)
        if name in self._defined:
            raise self._where.error(f"template {name!r} is defined twice", head.offset)
        expr = self._pipeline(rest, offset, declare=False)[1] if rest else None
        self._defined.add(name)
        macro = self._macro(name, None)
        param = self._fresh("dot")
        outer, self._scopes = self._scopes, [_Scope({"$": param}, dot=param)]
        self._in_define = True
        try:
            body, stop = self._block()
        finally:
            self._scopes, self._in_define = outer, False
        kind, at, _rest = self._expect_stop(stop, offset, head.text)
        if kind != "end":
            raise self._where.error(f"{{{{else}}}} in {{{{{head.text}}}}}", at)
        define = Define(macro, param, body)
        return [define, Include(macro, expr)] if head.text == "block" else [define]

    def _template_name(self, tokens: list[Token]) -> tuple[str, list[Token]]:
        if len(tokens) < 2 or tokens[1].kind not in ("string", "raw"):
            raise self._where.error(
                f"{{{{{tokens[0].text}}}}} needs a quoted name", tokens[0].offset
            )
        return str(literal(tokens[1], self._where)), tokens[2:]

    def _macro(self, name: str, used_at: int | None) -> str:
        if used_at is not None:
            self._used.setdefault(name, used_at)
        if name not in self._macros:
            self._macros[name] = self._fresh("template")
        return self._macros[name]

    def _range(self, tokens: list[Token], offset: int) -> Range:
        self._push()
        element = self._fresh("dot")
        names, expr = self._pipeline(tokens, offset, declare=True, allow_two=True)
        index: str | None = None
        if len(names) == 2:
            index = self._declare(names[0])
            self._scopes[-1].variables[names[1]] = element
        elif names:
            self._scopes[-1].variables[names[0]] = element
        self._scopes[-1].dot = element
        body, stop = self._block()
        self._pop()
        kind, at, rest = self._expect_stop(stop, offset, "range")
        if rest:
            raise self._where.error("{{else …}} after range takes nothing more", at)
        otherwise = () if kind == "end" else self._closed_block(offset, "range")
        return Range(index, element, expr, body, otherwise)

    def _with(self, tokens: list[Token], offset: int) -> With:
        self._push()
        element = self._fresh("dot")
        names, expr = self._pipeline(tokens, offset, declare=True)
        if names:
            self._scopes[-1].variables[names[0]] = element
        self._scopes[-1].dot = element
        body, stop = self._block()
        self._pop()
        kind, at, rest = self._expect_stop(stop, offset, "with")
        if rest:
            raise self._where.error(
                f"{{{{else {rest[0].text}}}}} is outside the subset lbsync translates", at
            )
        otherwise = () if kind == "end" else self._closed_block(offset, "with")
        return With(element, expr, body, otherwise)

    def _closed_block(self, offset: int, what: str) -> tuple[Node, ...]:
        """The ``{{else}}`` branch: nodes up to an ``{{end}}``."""
        self._push()
        body, stop = self._block()
        self._pop()
        kind, at, _rest = self._expect_stop(stop, offset, what)
        if kind != "end":
            raise self._where.error(f"a second {{{{else}}}} in {{{{{what}}}}}", at)
        return body

    def _expect_stop(
        self, stop: tuple[str, int, list[Token]] | None, offset: int, what: str
    ) -> tuple[str, int, list[Token]]:
        if stop is None:
            raise self._where.error(f"{{{{{what}}}}} has no {{{{end}}}}", offset)
        kind, at, rest = stop
        if kind == "end" and rest:
            raise self._where.error("{{end}} takes nothing more", at)
        return kind, at, rest

    # -- pipelines and expressions --

    def _pipeline(
        self, tokens: list[Token], offset: int, *, declare: bool, allow_two: bool = False
    ) -> tuple[list[str], Expr]:
        names: list[str] = []
        kinds = [t.kind for t in tokens]
        if (declare and "declare" in kinds[:4]) or "assign" in kinds[:4]:
            cut = kinds.index("declare") if "declare" in kinds[:4] else kinds.index("assign")
            if tokens[cut].kind == "assign":
                raise self._where.error(
                    "assigning an existing variable ('=') is outside the subset lbsync translates",
                    tokens[cut].offset,
                )
            names = [t.text for t in tokens[:cut] if t.kind == "var"]
            shape = [t.kind for t in tokens[:cut]]
            if shape not in (["var"], ["var", "comma", "var"]) or (
                len(names) == 2 and not allow_two
            ):
                raise self._where.error("malformed variable declaration", tokens[0].offset)
            tokens = tokens[cut + 1 :]
        if not tokens:
            raise self._where.error("missing value", offset)
        expr: Expr | None = None
        for command in _split(tokens, "pipe"):
            if not command:
                raise self._where.error("empty command in pipeline", offset)
            expr = self._command(command, expr)
        assert expr is not None
        return names, expr

    def _command(self, tokens: list[Token], piped: Expr | None) -> Expr:
        operands = self._operands(tokens)
        head, head_token = operands[0]
        if head == Const(None):
            raise self._where.error("nil is not a command", head_token.offset)
        if isinstance(head, str):
            args = tuple(expr for expr, _tok in operands[1:])
            for expr, tok in operands[1:]:
                if isinstance(expr, str):
                    raise self._where.error(f"{expr} is a function: call it in ( )", tok.offset)
            call = Call(head, (*args, piped) if piped is not None else args)  # type: ignore[arg-type]
            self._check_arity(call, head_token)
            return call
        if len(operands) > 1 or piped is not None:
            raise self._where.error(
                "calling a method or passing arguments to a non-function is outside the "
                "subset lbsync translates",
                head_token.offset,
            )
        return head

    def _check_arity(self, call: Call, tok: Token) -> None:
        """Go checks a builtin's argument count when it runs; a conversion checks it now,
        and a constant printf format's directives too."""
        wanted = _ARITY.get(call.function)
        if wanted is not None and not wanted[0] <= len(call.args) <= wanted[1]:
            raise self._where.error(
                f"wrong number of arguments for {call.function}: got {len(call.args)}",
                tok.offset,
            )
        first = call.args[0] if call.args else None
        if call.function == "printf" and isinstance(first, Const) and isinstance(first.value, str):
            problems = printf_problems(first.value)
            if problems:
                raise self._where.error(
                    f"printf {first.value!r}: {problems[0]} is outside what lbsync formats",
                    tok.offset,
                )

    def _operands(self, tokens: list[Token]) -> list[tuple[Expr | str, Token]]:
        """Each operand with its first token; a bare function name stays a string."""
        out: list[tuple[Expr | str, Token]] = []
        at = 0
        while at < len(tokens):
            tok = tokens[at]
            if tok.kind == "lparen":
                close = _matching(tokens, at)
                if close < 0:
                    raise self._where.error("unclosed '('", tok.offset)
                _names, operand = self._pipeline(tokens[at + 1 : close], tok.offset, declare=False)
                expr: Expr | str = operand
                at = close + 1
            else:
                expr = self._term(tok)
                at += 1
            while at < len(tokens) and tokens[at].kind == "field" and not tokens[at].spaced:
                if isinstance(expr, str):
                    raise self._where.error(f"{expr} is a function: call it in ( )", tok.offset)
                expr = Field(expr, tokens[at].text[1:])
                at += 1
            out.append((expr, tok))
        return out

    def _term(self, tok: Token) -> Expr | str:
        kind, text = tok.kind, tok.text
        if kind in LITERALS:
            return Const(literal(tok, self._where))
        if kind == "dot":
            return Ref(self._dot())
        if kind == "field":
            return Field(Ref(self._dot()), text[1:])
        if kind == "var":
            return Ref(self._lookup(text, tok))
        if kind == "ident":
            return self._identifier(tok)
        raise self._where.error(f"unexpected {text!r}", tok.offset)

    def _identifier(self, tok: Token) -> Const | str:
        """``true``/``false``, or the name of a function in the subset."""
        text = tok.text
        if text in ("true", "false"):
            return Const(text == "true")
        if text == "nil":
            return Const(None)
        if text in _REFUSED:
            raise self._where.error(f"function {text!r}: {_REFUSED[text]}", tok.offset)
        if text not in FUNCTIONS:
            raise self._where.error(
                f"function {text!r} is outside the subset lbsync translates", tok.offset
            )
        return text

    # -- scopes --

    def _push(self) -> None:
        self._scopes.append(_Scope(dot=self._scopes[-1].dot))

    def _pop(self) -> None:
        self._scopes.pop()

    def _dot(self) -> str | None:
        return self._scopes[-1].dot

    def _fresh(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    def _declare(self, name: str) -> str:
        safe = re.sub(r"\W", "_", name[1:].encode("ascii", "replace").decode()) or "v"
        jinja = self._fresh(f"var_{safe}")
        self._scopes[-1].variables[name] = jinja
        return jinja

    def _lookup(self, name: str, tok: Token) -> str | None:
        for scope in reversed(self._scopes):
            if name in scope.variables:
                return scope.variables[name] or None
        raise self._where.error(f"undefined variable {name!r}", tok.offset)


def _split(tokens: list[Token], kind: str) -> list[list[Token]]:
    """Split at top-level tokens of ``kind`` (not inside parentheses)."""
    parts: list[list[Token]] = [[]]
    depth = 0
    for tok in tokens:
        depth += {"lparen": 1, "rparen": -1}.get(tok.kind, 0)
        if tok.kind == kind and depth == 0:
            parts.append([])
        else:
            parts[-1].append(tok)
    return parts


def _matching(tokens: list[Token], at: int) -> int:
    depth = 0
    for i in range(at, len(tokens)):
        depth += {"lparen": 1, "rparen": -1}.get(tokens[i].kind, 0)
        if depth == 0:
            return i
    return -1


def parse(source: str, path: str) -> tuple[Node, ...]:
    """Parse a Go template; raises ConversionError naming ``path``, line and column."""
    where = Where(path, source)
    return _Parser(lex(source, where), where).parse()
