"""A snapshot's raw keys, grouped by service: the next snapshot shares every unchanged group.

``Snapshot.keys`` maps every raw key under the prefix to its value (confd's ``getv``).
Copied whole for each snapshot, that map cost O(all keys) per change (2.8 ms at 100,000
keys). Grouped by the service a key lies under (``/services/<name>/...``; every other
key in the group ``""``), a snapshot after one event copies the one group it touched and
shares the rest with the snapshot before it (``KeyGroups``), and comparing or composing
two snapshots' keys looks only at groups that are not the same object.

A group past ``BIG_GROUP`` keys (one service of 100,000 instances) is held as ``Buckets``:
``BUCKETS`` dicts by the key's last characters, so that a write copies the list of
buckets and the one bucket it touches (~1,500 keys), not the whole group (1.6 ms a change
at 100,000).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from itertools import repeat
from operator import add, itemgetter, mod, mul

_SERVICES = "/services/"
_NAME_AT = len(_SERVICES)
BUCKETS = 64
BIG_GROUP = 4096  # keys: the catalog holds a bigger group as Buckets


def bucket_of(key: str) -> int:
    """The bucket ``key`` goes to: from its last two characters, where ids differ. Not
    ``hash``: that changes with every process, and so would the keys' order."""
    tail = key[-2:] or " "
    return (ord(tail[-1]) * 31 + ord(tail[0])) % BUCKETS


class Buckets(Mapping[str, str]):
    """One big group of raw keys as ``BUCKETS`` dicts (by ``bucket_of``); read-only here.

    The catalog writes a group it has not handed to a snapshot: it copies the list of
    buckets once, then each bucket it writes to (``Catalog._write_key``).
    """

    __slots__ = ("buckets",)

    def __init__(self, buckets: list[dict[str, str]]) -> None:
        self.buckets = buckets

    @classmethod
    def of(cls, keys: Mapping[str, str]) -> Buckets:
        """``keys`` in buckets; ``bucket_of`` computed in C passes when every key has two
        characters (100,000 keys: ~40 ms less than a call per key)."""
        buckets: list[dict[str, str]] = [{} for _ in range(BUCKETS)]
        names = list(keys)
        if names and min(map(len, names)) >= 2:
            last, before = (map(ord, map(itemgetter(at), names)) for at in (-1, -2))
            mixed = map(add, map(mul, last, repeat(31)), before)
            indexes: Iterable[int] = map(mod, mixed, repeat(BUCKETS))
        else:
            indexes = map(bucket_of, names)
        for index, key, value in zip(indexes, names, keys.values(), strict=True):
            buckets[index][key] = value
        return cls(buckets)

    def __getitem__(self, key: str) -> str:
        return self.buckets[bucket_of(key)][key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.buckets[bucket_of(key)]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self.buckets[bucket_of(key)].get(key, default)

    def __iter__(self) -> Iterator[str]:
        for bucket in self.buckets:
            yield from bucket

    def __len__(self) -> int:
        return sum(map(len, self.buckets))

    def __repr__(self) -> str:
        return f"Buckets({len(self)} keys)"


def group_of(key: str) -> str:
    """The service whose prefix (``/services/<name>/``) ``key`` is under, else ``""``."""
    if key.startswith(_SERVICES):
        end = key.find("/", _NAME_AT)
        if end > _NAME_AT:
            return key[_NAME_AT:end]
    return ""


class KeyMap(Mapping[str, str]):
    """A read-only view of the raw keys as groups; the groups are never mutated."""

    __slots__ = ("_groups", "_len")

    def __init__(self, groups: Mapping[str, Mapping[str, str]]) -> None:
        self._groups = groups
        self._len: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._groups[group_of(key)][key]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        group = self._groups.get(group_of(key))
        return group is not None and key in group

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        group = self._groups.get(group_of(key))
        return default if group is None else group.get(key, default)

    def __iter__(self) -> Iterator[str]:
        for group in self._groups.values():
            yield from group

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(len(group) for group in self._groups.values())
        return self._len

    def __repr__(self) -> str:
        return f"KeyMap({len(self)} keys in {len(self._groups)} groups)"

    def groups(self) -> Mapping[str, Mapping[str, str]]:
        return self._groups


def as_groups(keys: Mapping[str, str]) -> Mapping[str, Mapping[str, str]]:
    """``keys`` by group: a ``KeyMap``'s own groups, any other mapping grouped anew."""
    if isinstance(keys, KeyMap):
        return keys.groups()
    groups: dict[str, dict[str, str]] = {}
    for key, value in keys.items():
        groups.setdefault(group_of(key), {})[key] = value
    return groups


def differing(old: Mapping[str, str], new: Mapping[str, str]) -> set[str]:
    """The keys added, removed or changed between ``old`` and ``new``; groups that are the
    same object are skipped unread."""
    if old is new:
        return set()
    old_groups, new_groups = as_groups(old), as_groups(new)
    keys: set[str] = set()
    for name in old_groups.keys() | new_groups.keys():
        before, after = old_groups.get(name, {}), new_groups.get(name, {})
        if before is after:
            continue
        for old_part, new_part in _parts(before, after):
            if old_part is not new_part:
                keys.update(key for key, _ in old_part.items() ^ new_part.items())
    return keys


def _parts(
    before: Mapping[str, str], after: Mapping[str, str]
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Two versions of a group as pairs of dicts to compare: bucket by bucket (the same
    object when unchanged) when both are Buckets, else whole."""
    if isinstance(before, Buckets) and isinstance(after, Buckets):
        return list(zip(before.buckets, after.buckets, strict=True))
    return [(_plain_group(before), _plain_group(after))]


def _plain_group(group: Mapping[str, str]) -> dict[str, str]:
    if isinstance(group, dict):
        return group
    out: dict[str, str] = {}
    for part in group.buckets if isinstance(group, Buckets) else [dict(group)]:
        out.update(part)
    return out


def with_groups_from(
    keys: Mapping[str, str], base: Mapping[str, str], names: Collection[str]
) -> KeyMap:
    """``keys`` with the groups of the services ``names`` as they are in ``base``."""
    groups = dict(as_groups(keys))
    base_groups = as_groups(base)
    for name in names:
        kept = base_groups.get(name)
        if kept is None:
            groups.pop(name, None)
        else:
            groups[name] = kept
    return KeyMap(groups)
