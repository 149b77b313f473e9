"""A strict reader for the YAML subset our deploy files use (PyYAML is not a dependency).

Supported: block mappings and sequences by indentation, ``- key: value`` sequence items,
flow sequences written as JSON (``["a", "b"]``), plain / double-quoted (JSON) /
single-quoted scalars, ``true``/``false``/``null``/integers, empty values (null), and
comments. Anything else (anchors, tags, flow mappings, multi-line or block scalars,
tabs) raises ``ValueError`` naming the line, so a compose file edited beyond this
subset fails the test loudly instead of being misread.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_UNSUPPORTED = re.compile(r"^[&*!|>{%@`]")
_INT = re.compile(r"^[-+]?\d+$")


@dataclass
class _Line:
    number: int
    indent: int
    text: str


def _strip_comment(text: str) -> str:
    """Drop a ``#`` comment that starts a line or follows whitespace, outside quotes."""
    quote: str | None = None
    for i, char in enumerate(text):
        if quote:
            if char == quote and (quote == "'" or text[i - 1] != "\\"):
                quote = None
        elif char in "\"'" and (i == 0 or text[i - 1] in " :[,-"):
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def _lines(source: str) -> list[_Line]:
    lines = []
    for number, raw in enumerate(source.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: tab indentation")
        text = _strip_comment(raw)
        if not text.strip() or text.strip() == "---":
            continue
        lines.append(_Line(number, len(text) - len(text.lstrip(" ")), text.strip()))
    return lines


def scalar(text: str, number: int = 0) -> Any:
    text = text.strip()
    if text == "" or text in ("null", "~"):
        return None
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: flow sequence is not JSON: {text}") from exc
        if not isinstance(value, list):
            raise ValueError(f"line {number}: expected a list: {text}")
        return value
    if text.startswith('"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: bad double-quoted string: {text}") from exc
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ValueError(f"line {number}: unterminated single-quoted string")
        return text[1:-1].replace("''", "'")
    if _UNSUPPORTED.match(text):
        raise ValueError(f"line {number}: unsupported YAML syntax: {text}")
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    return text


def _split_key(text: str, number: int) -> tuple[str, str] | None:
    """``key: value`` → (key, value); None when the line is not a mapping entry."""
    match = re.match(r'^("(?:[^"\\]|\\.)*"|[^\s"\'#:][^:]*?)\s*:(?:\s+(.*)|$)', text)
    if not match:
        return None
    key = match.group(1)
    if key.startswith('"'):
        key = json.loads(key)
    return key, (match.group(2) or "")


class _Parser:
    def __init__(self, lines: list[_Line]) -> None:
        self.lines = lines
        self.pos = 0

    def parse(self) -> Any:
        if not self.lines:
            return None
        value = self.block(self.lines[0].indent)
        if self.pos != len(self.lines):
            line = self.lines[self.pos]
            raise ValueError(f"line {line.number}: unexpected indentation")
        return value

    def block(self, indent: int) -> Any:
        first = self.lines[self.pos]
        if first.text.startswith("- ") or first.text == "-":
            return self.sequence(indent)
        return self.mapping(indent)

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.indent < indent:
                break
            if line.indent > indent:
                raise ValueError(f"line {line.number}: unexpected indentation")
            entry = _split_key(line.text, line.number)
            if entry is None:
                raise ValueError(f"line {line.number}: expected 'key: value': {line.text}")
            key, rest = entry
            if key in result:
                raise ValueError(f"line {line.number}: duplicate key {key!r}")
            self.pos += 1
            result[key] = self.value_after(rest, indent, line.number)
        return result

    def sequence(self, indent: int) -> list[Any]:
        result: list[Any] = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.indent < indent:
                break
            if line.indent > indent or not (line.text.startswith("- ") or line.text == "-"):
                if line.indent == indent:
                    break
                raise ValueError(f"line {line.number}: unexpected indentation")
            item = line.text[1:].strip()
            if item.startswith("- ") or item == "-":
                raise ValueError(f"line {line.number}: nested '- -' sequences are not supported")
            entry = _split_key(item, line.number) if item else None
            if entry is None:
                self.pos += 1
                result.append(self.value_after(item, indent, line.number))
                continue
            # "- key: value" opens a mapping whose keys sit at the item's text column.
            column = indent + (len(line.text) - len(item))
            self.lines[self.pos] = _Line(line.number, column, item)
            result.append(self.mapping(column))
        return result

    def value_after(self, rest: str, indent: int, number: int) -> Any:
        """The value of ``key:`` / ``-``: inline, or the indented block that follows."""
        if rest:
            return scalar(rest, number)
        if self.pos < len(self.lines):
            nxt = self.lines[self.pos]
            if nxt.indent > indent:
                return self.block(nxt.indent)
            if nxt.indent == indent and nxt.text.startswith("- "):
                return self.sequence(indent)  # a sequence at the key's own indentation
        return None


def load(source: str) -> Any:
    return _Parser(_lines(source)).parse()
