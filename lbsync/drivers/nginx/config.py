"""nginx's config as the listen pre-check reads it: a tokenizer like nginx's own, includes
followed, the ``listen`` directives of ``server`` blocks (small on purpose: it reads what
``nginx -t`` already accepted)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog

from lbsync.drivers.listen import ListenAddress, Proto, split_host_port
from lbsync.drivers.nginx.lua import strip_lua_blocks
from lbsync.fileio import read_bytes

log = structlog.get_logger("lbsync.drivers.listen")

_MAX_INCLUDE_DEPTH = 32

Statement = tuple[str, tuple[str, ...]]  # (";" | "{" | "}", words)


def nginx_listens(main: Path, files: NginxFiles | None = None) -> list[ListenAddress]:
    """Every ``listen`` of ``server`` blocks reachable from ``main``, includes followed.

    Relative includes resolve against the main config's directory, as nginx does.
    Unreadable includes are skipped (the caller's checker has read them already).
    ``files`` keeps tokenized files between calls (see ``NginxFiles``).
    """
    walker = _NginxWalker(Path(main).parent, files if files is not None else NginxFiles())
    walker.walk(Path(main), 0)
    return walker.found


class NginxFiles:
    """The statements that matter here (blocks, ``include``, ``listen``) of nginx files,
    kept by content between walks.

    A driver walks the live and the staged config every round. The two trees hold the
    same files but for the rendered ones, and the file staged in one round is the live
    one in the next; tokenizing everything again cost 1.2 to 3.1 ms a round, reading the
    files and comparing bytes costs a tenth of that. ``given()`` names files whose bytes
    the caller already holds (the staged rendered files): those are not read back.
    ``sweep()`` after each check drops what that check did not read, so old staged trees
    are not kept.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[bytes, tuple[Statement, ...]]] = {}
        self._read: set[str] = set()
        self._given: Mapping[Path, bytes] = {}

    def given(self, contents: Mapping[Path, bytes]) -> None:
        """Until the next ``sweep()``, take these files' bytes from ``contents``."""
        self._given = contents

    def statements(self, path: Path) -> tuple[Statement, ...] | None:
        """The file's statements; None if it cannot be read."""
        data = self._given.get(path)
        if data is None:
            try:
                data = read_bytes(path)
            except OSError as exc:
                log.debug("listen.unreadable", path=str(path), error=exc.strerror)
                return None
        key = str(path)
        self._read.add(key)
        known = self._known.get(key)
        if known is not None and known[0] == data:
            return known[1]
        parsed = self._same_content(data)
        if parsed is None:
            parsed = _nginx_parse(data)
        self._known[key] = (data, parsed)
        return parsed

    def sweep(self) -> None:
        """Forget the files not read since the last sweep."""
        self._known = {k: v for k, v in self._known.items() if k in self._read}
        self._read = set()
        self._given = {}

    def _same_content(self, data: bytes) -> tuple[Statement, ...] | None:
        for known, parsed in self._known.values():
            if len(known) == len(data) and known == data:
                return parsed
        return None


def _nginx_parse(data: bytes) -> tuple[Statement, ...]:
    if not may_add_listens(data):
        # Nothing for us, and an included file holds only balanced blocks (nginx parses
        # it on its own): skip tokenizing it. A 10,000-server upstreams file would
        # otherwise cost ~100 ms.
        return ()
    text = data.decode(errors="replace")
    if "_by_lua_block" in text:
        text = strip_lua_blocks(text)  # Lua's "#" and braces in strings are not nginx's
    return tuple(
        (kind, tuple(words))
        for kind, words in _nginx_statements(text)
        if kind != ";" or words[0] in ("include", "listen")
    )


def may_add_listens(data: bytes) -> bool:
    """Whether an nginx file has a ``listen``, or an ``include`` that may pull one in."""
    return mentions(data, b"listen", 0) or mentions(data, b"include", 3)


def mentions(data: bytes, word: bytes, anchor: int) -> bool:
    """``word in data``, faster when ``word[anchor]`` is a byte rare in ``data``.

    A rendered upstream list (server lines, weights, ``down``) is 370 KB at 10,000
    instances and lbsync asks it whether it holds ``listen``, ``include`` or a Lua block
    every round: a substring search costs ~0.25 ms there, finding each occurrence of a
    rare byte is a memchr. Past a few dozen occurrences, the plain search.
    """
    rare = word[anchor : anchor + 1]
    at = data.find(rare, anchor)
    for _ in range(64):
        if at < 0:
            return False
        if data.startswith(word, at - anchor):
            return True
        at = data.find(rare, at + 1)
    return word in data


class _NginxWalker:
    def __init__(self, conf_dir: Path, files: NginxFiles) -> None:
        self.conf_dir = conf_dir
        self.files = files
        self.stack: list[str] = []  # enclosing block names, "server" is the one we want
        self.found: list[ListenAddress] = []
        self.seen: set[Path] = set()

    def walk(self, path: Path, depth: int) -> None:
        if depth > _MAX_INCLUDE_DEPTH or path in self.seen:
            return
        self.seen.add(path)
        for kind, words in self.files.statements(path) or ():
            if kind == "{":
                self.stack.append(words[0] if words else "")
            elif kind == "}":
                if self.stack:
                    self.stack.pop()
            elif words[0] == "include" and len(words) > 1:
                for included in _nginx_include(words[1], self.conf_dir):
                    self.walk(included, depth + 1)
            elif words[0] == "listen" and len(words) > 1 and self.stack[-1:] == ["server"]:
                address = parse_nginx_listen(list(words[1:]))
                if address is not None:
                    self.found.append(address)


def _nginx_include(pattern: str, conf_dir: Path) -> list[Path]:
    full = pattern if os.path.isabs(pattern) else str(conf_dir / pattern)
    if any(c in full for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(full))]
    return [Path(full)]


def _nginx_statements(text: str) -> Iterator[tuple[str, list[str]]]:
    """(";", words), ("{", header words) and ("}", []) in order, like nginx's tokenizer."""
    words: list[str] = []
    for token, quoted in _nginx_tokens(text):
        if not quoted and token in (";", "{", "}"):
            if token == "}":
                yield "}", []
            elif words or token == "{":
                yield token, words
            words = []
        else:
            words.append(token)


# One nginx token per match: whitespace and comments (skipped), punctuation, a quoted
# string, or a bare word (which may hold ``${var}`` and, past its first character, ``#``).
_NGINX_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<punct>[;{}])|"(?P<dq>(?:[^"\\]|\\.)*)"|'(?P<sq>(?:[^'\\]|\\.)*)'"""
    r"""|(?P<word>(?:\$\{[^}]*\}|[^\s;{}"'])+)""",
    re.S,
)
_ESCAPE = re.compile(r"\\(.)", re.S)


def _nginx_tokens(text: str) -> Iterator[tuple[str, bool]]:
    for match in _NGINX_TOKEN.finditer(text):
        kind = match.lastgroup
        if kind is None:
            continue  # whitespace or comment
        value = match.group(kind)
        if kind in ("dq", "sq"):
            yield _ESCAPE.sub(r"\1", value), True
        else:
            yield value, False


def parse_nginx_listen(args: list[str]) -> ListenAddress | None:
    """``listen`` arguments → address; None for unix sockets and what can't be parsed."""
    spec, params = args[0], args[1:]
    if spec.startswith("unix:"):
        return None
    proto: Proto = "udp" if "udp" in params else "tcp"
    v6only = "ipv6only=off" not in params
    try:
        host, port = split_host_port(spec, default_port=80, bare_is_port=True)
    except ValueError:
        log.warning("listen.unparsed", directive=" ".join(["listen", *args]))
        return None
    host = "0.0.0.0" if host in ("", "*") else host
    return ListenAddress(host, port, proto, v6only if ":" in host else None, raw=spec)
