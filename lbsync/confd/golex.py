"""Go ``text/template`` source → text and actions (tokens), as Go's lexer splits them.

Trim markers are applied here, to the text, exactly as Go's lexer does (Go's white space
is space, tab, CR and LF), so the text handed on is what Go outputs. Literal decoding
(strings, raw strings, numbers, characters) follows Go's rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lbsync.confd.goast import Pos, Text
from lbsync.errors import ConversionError

_GO_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Where:
    """The file being converted, to turn an offset into ``path:line:column`` errors."""

    path: str
    source: str

    def pos(self, offset: int) -> Pos:
        line = self.source.count("\n", 0, offset) + 1
        return Pos(line, offset - (self.source.rfind("\n", 0, offset) + 1) + 1)

    def error(self, message: str, offset: int) -> ConversionError:
        pos = self.pos(offset)
        return ConversionError(message, path=self.path, line=pos.line, column=pos.column)


@dataclass
@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    offset: int
    spaced: bool  # preceded by white space (a field chain has none)


@dataclass(frozen=True)
class Action:
    """One ``{{ … }}``: its tokens and where it starts."""

    tokens: tuple[Token, ...]
    offset: int
    comment: bool = False


_TOKEN = re.compile(
    r"""(?P<declare>:=)|(?P<assign>=)|(?P<pipe>\|)|(?P<lparen>\()|(?P<rparen>\))|(?P<comma>,)
    |(?P<string>"(?:[^"\\\n]|\\.)*")|(?P<raw>`[^`]*`)|(?P<char>'(?:[^'\\\n]|\\.)+')
    |(?P<number>[+-]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?))
    |(?P<field>\.[^\W\d]\w*)|(?P<dot>\.)|(?P<var>\$\w*)|(?P<ident>[^\W\d]\w*)""",
    re.VERBOSE,
)


def lex(source: str, where: Where) -> list[Text | Action]:
    """Split into text and actions, applying trim markers to the text as Go's lexer does."""
    items: list[Text | Action] = []
    pos = 0
    trim_next = False
    while pos <= len(source):
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_GO_SPACE)
        if start < 0:
            items.append(Text(text))
            break
        inner = start + 2
        if source.startswith("- ", inner) or (
            source.startswith("-", inner) and source[inner + 1 : inner + 2] in ("\t", "\r", "\n")
        ):
            text = text.rstrip(_GO_SPACE)
            inner += 2
        items.append(Text(text))
        action, pos, trim_next = _lex_action(source, start, inner, where)
        items.append(action)
    return [item for item in items if not (isinstance(item, Text) and not item.text)]


def _lex_action(source: str, start: int, inner: int, where: Where) -> tuple[Action, int, bool]:
    """One action from just after ``{{`` (and its trim marker): its tokens, where the text
    after it starts, and whether that text is trimmed."""
    if source.startswith("/*", inner):  # Go: a comment starts right after the delimiter
        close = source.find("*/", inner + 2)
        if close < 0:
            raise where.error("unclosed comment", start)
        after = close + 2
        if source.startswith("}}", after):
            return Action((), start, comment=True), after + 2, False
        if source[after : after + 1] in tuple(_GO_SPACE) and source.startswith("-}}", after + 1):
            return Action((), start, comment=True), after + 4, True
        raise where.error("comment not closed by '}}' right after '*/'", close)
    tokens: list[Token] = []
    pos = inner
    spaced = True
    while True:
        if pos >= len(source):
            raise where.error("unclosed action: no '}}'", start)
        if source.startswith(" -}}", pos) or (
            source[pos] in _GO_SPACE and source.startswith("-}}", pos + 1)
        ):
            return Action(tuple(tokens), start), pos + 4, True
        if source.startswith("}}", pos):
            return Action(tuple(tokens), start), pos + 2, False
        if source[pos] in _GO_SPACE:
            pos += 1
            spaced = True
            continue
        match = _TOKEN.match(source, pos)
        if match is None or match.lastgroup is None:
            raise where.error(f"unexpected {source[pos]!r} in action", pos)
        tokens.append(Token(match.lastgroup, match.group(), pos, spaced))
        spaced = False
        pos = match.end()


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE = re.compile(
    r"\\(?:([abfnrtv\\'\"])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))"
)


def unquote(text: str, tok: Token, where: Where) -> str:
    """A Go interpreted string literal (strconv.Unquote), ``"..."`` included."""
    body = text[1:-1]

    def one(match: re.Match[str]) -> str:
        simple, hex2, hex4, hex8 = match.groups()
        if simple:
            return _ESCAPES.get(simple, simple)
        return chr(int(hex2 or hex4 or hex8, 16))

    if re.search(r"\\[0-7]", body):
        raise where.error("octal escapes are outside the subset lbsync translates", tok.offset)
    unescaped = _ESCAPE.sub(one, body)
    if "\\" in _ESCAPE.sub("", body):
        raise where.error(f"bad escape in {text}", tok.offset)
    return unescaped


def number(text: str, tok: Token, where: Where) -> int | float:
    clean = text.replace("_", "")
    try:
        if re.fullmatch(r"[+-]?0[xX][0-9a-fA-F]+", clean):
            return int(clean, 16)
        if re.fullmatch(r"[+-]?\d+", clean):
            return int(clean, 10)
        return float(clean)
    except ValueError as exc:
        raise where.error(f"bad number {text}", tok.offset) from exc


LITERALS = frozenset({"string", "raw", "number", "char"})


def literal(tok: Token, where: Where) -> str | int | float:
    """The value of a literal token (a kind in LITERALS), decoded as Go decodes it."""
    if tok.kind == "string":
        return unquote(tok.text, tok, where)
    if tok.kind == "raw":
        return tok.text[1:-1]
    if tok.kind == "number":
        return number(tok.text, tok, where)
    value = unquote('"' + tok.text[1:-1] + '"', tok, where)
    if len(value) != 1:
        raise where.error(f"bad character constant {tok.text}", tok.offset)
    return ord(value)
