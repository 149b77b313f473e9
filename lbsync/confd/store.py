"""confd's key store for one template resource, with memkv's semantics.

Copied faithfully from kelseyhightower/memkv ``store.go`` (``get``/``gets``/``getv``/
``getvs``/``ls``/``lsdir``/``exists``: sorting, the "key does not exist" error, Go's
``filepath.Match`` globs) and confd's ``resource/template/resource.go`` ``setVars``
(which keys a resource sees, under which names).
"""

from __future__ import annotations

import bisect
import functools
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class ConfdFunctionError(ValueError):
    """What a confd/Go function would have returned as an error (the renderer reports it
    as a RenderError with the template line)."""


@dataclass(frozen=True)
class KVPair:
    """memkv's KVPair: templates read ``.Key`` and ``.Value``."""

    Key: str
    Value: str


def go_path_clean(path: str) -> str:
    """Go's ``path.Clean`` (posixpath.normpath keeps a leading ``//``; Go does not)."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def go_path_join(*parts: str) -> str:
    """Go's ``path.Join``: joins the non-empty parts and cleans; "" if all are empty."""
    used = [p for p in parts if p]
    return go_path_clean("/".join(used)) if used else ""


def resource_keys(raw: Mapping[str, str], prefix: str, watched: Sequence[str]) -> dict[str, str]:
    """The keys a confd resource's template sees, as confd's ``setVars`` builds them.

    confd reads every etcd key that starts with ``path.Join(prefix, key)`` for each of the
    resource's ``keys`` (a prefix range read) and stores it as
    ``path.Join("/", strings.TrimPrefix(k, prefix))``. ``raw`` holds keys relative to
    lbsync's ``[etcd] prefix``, which the migration sets to confd's global prefix.
    """
    wanted = tuple(go_path_join(prefix, key) for key in watched)
    return {
        _clean_absolute(key.removeprefix(prefix)): value
        for key, value in raw.items()
        if key.startswith(wanted)
    }


_UNCLEAN = re.compile(r"//|/\.\.?(/|$)|./$")


def _clean_absolute(path: str) -> str:
    """``path.Join("/", path)``, without the work for the usual already-clean key."""
    if path.startswith("/") and not _UNCLEAN.search(path):
        return path
    return go_path_join("/", path)


class Store:
    """memkv's Store over one resource's keys (kelseyhightower/memkv store.go).

    ``keys`` are clean absolute paths, as confd stores them (``resource_keys``).
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = keys
        self._sorted = sorted(keys)

    def exists(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> KVPair:
        if key not in self._keys:
            raise ConfdFunctionError(f"key does not exist: {key}")
        return KVPair(key, self._keys[key])

    def getv(self, key: str, *default: str) -> str:
        if key in self._keys:
            return self._keys[key]
        if default:
            return default[0]
        raise ConfdFunctionError(f"key does not exist: {key}")

    def gets(self, pattern: str) -> list[KVPair]:
        matcher = _glob(pattern)
        return [KVPair(k, self._keys[k]) for k in self._starting(pattern) if matcher.fullmatch(k)]

    def getvs(self, pattern: str) -> list[str]:
        return sorted(kv.Value for kv in self.gets(pattern))

    def ls(self, file_path: str) -> list[str]:
        found: set[str] = set()
        prefix = _terms(file_path)
        for key in self._keys:
            if key == file_path:
                found.add(posixpath.basename(key) or "/")
                continue
            if _same_prefix(_terms(posixpath.dirname(key) or "."), prefix):
                found.add(key.removeprefix(file_path).removeprefix("/").split("/")[0])
        return sorted(found)

    def lsdir(self, file_path: str) -> list[str]:
        found: set[str] = set()
        prefix = _terms(file_path)
        for key in self._starting(file_path, literal=True):
            if key.startswith(file_path):
                # keys are path.Join results (clean): their dirname needs no cleaning
                items = (posixpath.dirname(key) or ".").split("/")
                if _same_prefix(prefix, items) and len(items) - len(prefix) >= 1:
                    found.add(items[len(prefix)])
        return sorted(found)

    def _starting(self, pattern: str, *, literal: bool = False) -> list[str]:
        """The sorted keys that start with the pattern's literal head (all a glob can match).

        A template ranging over ``gets`` inside a range over services would otherwise scan
        every key once per service.
        """
        head = pattern if literal else re.split(r"[*?\[\\]", pattern, maxsplit=1)[0]
        start = bisect.bisect_left(self._sorted, head)
        end = start
        while end < len(self._sorted) and self._sorted[end].startswith(head):
            end += 1
        return self._sorted[start:end]


def _terms(path: str) -> list[str]:
    return go_path_clean(path).split("/")


def _same_prefix(left: list[str], right: list[str]) -> bool:
    return all(a == b for a, b in zip(left, right, strict=False))


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """Go's ``filepath.Match`` as a regex: ``*`` and ``?`` never match ``/``."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif char == "[":
            close = pattern.find("]", i + 2)
            if close < 0:
                raise ConfdFunctionError(f"syntax error in pattern: {pattern}")
            body = pattern[i + 1 : close]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            escaped = re.sub(r"([\]\[\\^])", r"\\\1", body).replace("\\\\-", "-")
            out.append(f"[{'^' if negate else ''}{escaped}]")
            i = close
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out), re.DOTALL)
