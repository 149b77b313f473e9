"""Lua inside nginx configs: find ``*_by_lua_block`` bodies, and check Lua syntax with LuaJIT.

``nginx -t`` never runs Lua: an inline block or a module with a syntax error passes the
check and then fails every request it handles (measured, see lb-mechanics.md). So lbsync
compiles them itself before any reload, with the LuaJIT that nginx embeds (Debian package
``luajit2``; Debian's ``luajit`` conflicts with the nginx Lua module's LuaJIT).

All the code is compiled by one ``luajit`` process (``loadstring``: parse and bytecode
generation, the same front end as ``luajit -b``), so the check costs one process start
(a few ms) whatever the number of blocks. Whether code compiles depends on the code alone,
so a caller can pass a ``known_good`` set of digests: code that compiled before is not
compiled again, and a membership-only round (same blocks, same module) starts no process.

The block scanner follows ngx_lua's own: the body runs from the ``{`` after the directive
to the matching ``}``, and braces inside Lua strings, long strings and comments do not
count.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from lbsync.commands import run_command
from lbsync.errors import ValidationFailed

log = structlog.get_logger("lbsync.drivers.lua")

_DIRECTIVE = re.compile(r"([a-z][a-z0-9_]*_by_lua_block)\s*\{")
_LONG_OPEN = re.compile(r"\[(=*)\[")
_ERROR_LINE = re.compile(r"^#(\d+):(\d+): (.*)$")
_MAX_REPORTED = 10
_MAX_KNOWN = 100_000  # digests remembered as compiling, before the memory starts over

# Reads records "<name>\n<byte length>\n<code>" from the file named by arg[1] and
# compiles each; prints "<name>:<line>: <message>" per failure; exits 1 if any failed.
_CHECKER = r"""
local f = assert(io.open(arg[1], "rb"))
local data = f:read("*a")
f:close()
local pos, bad = 1, 0
while pos <= #data do
  local name_end = assert(data:find("\n", pos, true))
  local name = data:sub(pos, name_end - 1)
  local len_end = assert(data:find("\n", name_end + 1, true))
  local len = assert(tonumber(data:sub(name_end + 1, len_end - 1)))
  local code = data:sub(len_end + 1, len_end + len)
  pos = len_end + len + 1
  local fn, err = loadstring(code, "=" .. name)
  if not fn then
    io.stdout:write(err:gsub("\n", " "), "\n")
    bad = bad + 1
  end
end
os.exit(bad == 0 and 0 or 1)
"""


@dataclass(frozen=True)
class LuaBlock:
    """One ``*_by_lua_block { ... }``: the directive, the line its body starts on, the body."""

    directive: str
    line: int
    code: str
    start: int  # offsets of the body in the text it came from
    end: int


def lua_blocks(text: str) -> list[LuaBlock]:
    """Every ``*_by_lua_block`` body in an nginx config text, in order.

    An unterminated block ends the scan (``nginx -t`` reports it better than we could).
    """
    blocks: list[LuaBlock] = []
    i, n = 0, len(text)
    at_directive = True  # at the first token of a directive
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#" and (i == 0 or text[i - 1].isspace() or text[i - 1] in ";{}"):
            i = _line_end(text, i)
        elif c in ";{}":
            at_directive = True
            i += 1
        elif c in "\"'":
            i = _quoted_end(text, i, newline_ends=False)
            at_directive = False
        elif at_directive and (match := _DIRECTIVE.match(text, i)):
            start = match.end()
            end = _block_end(text, start)
            if end is None:
                break
            line = text.count("\n", 0, start) + 1
            blocks.append(LuaBlock(match[1], line, text[start:end], start, end))
            i = end + 1
            at_directive = True
        else:
            at_directive = False
            i += 1
    return blocks


def strip_lua_blocks(text: str) -> str:
    """The same text with every Lua block body blanked (newlines kept), for parsers of the
    nginx syntax that would trip over Lua's ``#`` (length) or braces in Lua strings."""
    out: list[str] = []
    last = 0
    for block in lua_blocks(text):
        out.append(text[last : block.start])
        out.append(re.sub(r"[^\n]", " ", block.code))
        last = block.end
    out.append(text[last:])
    return "".join(out)


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _quoted_end(text: str, i: int, *, newline_ends: bool) -> int:
    """Index just past the string starting with the quote at ``i`` (backslash escapes)."""
    quote = text[i]
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == quote or (newline_ends and c == "\n"):
            return i + 1
        i += 1
    return len(text)


def _long_end(text: str, i: int, equals: str) -> int | None:
    close = "]" + equals + "]"
    end = text.find(close, i)
    return None if end < 0 else end + len(close)


def _block_end(text: str, i: int) -> int | None:
    """Index of the ``}`` closing a Lua block whose body starts at ``i``."""
    depth = 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            long = _LONG_OPEN.match(text, i + 2)
            if long:
                after = _long_end(text, long.end(), long[1])
                if after is None:
                    return None
                i = after
            else:
                i = _line_end(text, i)
        elif c == "[" and (long := _LONG_OPEN.match(text, i)):
            after = _long_end(text, long.end(), long[1])
            if after is None:
                return None
            i = after
        elif c in "\"'":
            i = _quoted_end(text, i, newline_ends=True)
        elif c == "{":
            depth += 1
            i += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
            i += 1
        else:
            i += 1
    return None


@dataclass(frozen=True)
class _Source:
    file: str  # as the operator knows it
    directive: str | None  # None for a module file
    first_line: int  # the file line that is line 1 of ``code``
    code: str


def check_lua(
    *,
    luajit: str,
    timeout: float,
    modules: Iterable[Path] = (),
    configs: Mapping[str, str] | None = None,
    known_good: set[str] | None = None,
) -> int:
    """Compile every Lua module file and every Lua block of ``configs`` (name → text).

    Code whose digest is in ``known_good`` is skipped; the digests of code that compiled
    are added to it. Returns how many pieces were compiled (0: luajit not run).
    Raises ``ValidationFailed`` naming file and line of each error (the first few), or if
    the checker cannot run; a missing interpreter is the caller's to decide (``which``).
    """
    sources: list[_Source] = []
    for path in modules:
        try:
            code = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise ValidationFailed(
                f"cannot read Lua module {path}: {exc.strerror}", command=[luajit]
            ) from exc
        sources.append(_Source(str(path), None, 1, code))
    for name, text in (configs or {}).items():
        for block in lua_blocks(text):
            sources.append(_Source(name, block.directive, block.line, block.code))
    digests = [_digest(source.code) for source in sources]
    if known_good is not None:
        fresh = [(s, d) for s, d in zip(sources, digests, strict=True) if d not in known_good]
        sources, digests = [s for s, _ in fresh], [d for _, d in fresh]
    if not sources:
        return 0
    _run_checker(luajit, timeout, sources)
    if known_good is not None:
        if len(known_good) > _MAX_KNOWN:
            known_good.clear()
        known_good.update(digests)
    return len(sources)


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", errors="surrogateescape")).hexdigest()


def _run_checker(luajit: str, timeout: float, sources: list[_Source]) -> None:
    workdir = tempfile.mkdtemp(prefix="lbsync-lua-")
    try:
        script = os.path.join(workdir, "check.lua")
        records = os.path.join(workdir, "code")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(_CHECKER)
        with open(records, "wb") as handle:
            for index, source in enumerate(sources):
                code = source.code.encode("utf-8", errors="surrogateescape")
                handle.write(f"#{index}\n{len(code)}\n".encode() + code)
        argv = [luajit, script, records]
        try:
            run_command(argv, timeout=timeout, error=ValidationFailed, what="Lua syntax check")
        except ValidationFailed as err:
            if err.returncode != 1:
                raise  # did not run, timed out, or crashed: not a verdict on the code
            raise ValidationFailed(
                "Lua syntax error (nginx -t does not check Lua; a reload would serve 500s)",
                command=[luajit, "<lbsync Lua check>"],
                returncode=err.returncode,
                stderr=_explain(err.stderr, sources),
            ) from err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _explain(output: str, sources: list[_Source]) -> str:
    """``#3:2: msg`` → ``/etc/nginx/lbsync/upstreams.conf:41 (balancer_by_lua_block): msg``."""
    lines = []
    for raw in output.splitlines():
        match = _ERROR_LINE.match(raw.strip())
        if match is None:
            if raw.strip():
                lines.append(raw.strip())
            continue
        source = sources[int(match[1])]
        line = source.first_line + int(match[2]) - 1
        inside = f" (in {source.directive})" if source.directive else ""
        lines.append(f"{source.file}:{line}{inside}: {match[3]}")
    shown = lines[:_MAX_REPORTED]
    if len(lines) > _MAX_REPORTED:
        shown.append(f"... and {len(lines) - _MAX_REPORTED} more")
    return "\n".join(shown)


def luajit_available(luajit: str) -> bool:
    return shutil.which(luajit) is not None


def lua_modules(directory: Path) -> list[Path]:
    """The ``*.lua`` files under ``directory``, sorted (what nginx may ``require``)."""
    return sorted(p for p in directory.rglob("*.lua") if p.is_file())
