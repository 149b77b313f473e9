"""A snapshot's raw keys, grouped by service: the next snapshot shares every unchanged group.

``Snapshot.keys`` maps every raw key under the prefix to its value (confd's ``getv``).
Copied whole for each snapshot, that map cost O(all keys) per change (2.8 ms at 100,000
keys). Grouped by the service a key lies under (``/services/<name>/...``; every other
key in the group ``""``), a snapshot after one event copies the one group it touched and
shares the rest with the snapshot before it (``KeyGroups``), and comparing or composing
two snapshots' keys looks only at groups that are not the same object.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

_SERVICES = "/services/"
_NAME_AT = len(_SERVICES)


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
        if before is not after:
            keys.update(key for key, _ in before.items() ^ after.items())
    return keys


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


def plain(keys: Mapping[str, str]) -> dict[str, str]:
    """A plain dict of ``keys``, a group at a time (C speed, not a key at a time)."""
    out: dict[str, str] = {}
    for group in as_groups(keys).values():
        out.update(group)
    return out
