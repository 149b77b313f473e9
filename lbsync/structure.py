"""The second wall behind value validation: a value must not add structure to a render.

What a template renders from etcd values is compared with what the *same* template
renders from a benign twin of the same snapshot: every free-form string (hosts, ids,
names, meta, health reasons, string settings, raw keys a template reads) with each
character that can end or open a directive, a block, a comment, a quote or a line
(``; { } # " ' \\`` `` ` ``, control characters) replaced by ``x``; every other character,
and every typed value (state, port, weight, bools, numbers), kept; instances inside the
driver's template extras (HAProxy's slots) are swapped for their twins too. The
template's control flow therefore stays the same, and anything that differs in structure
between the two renders came from a value.

Structure is counted per line, by the driver's ``line_shape``: for nginx the punctuation
and the directive names that start statements (``include``, ``load_module``, ``}``...),
for HAProxy the first keyword of each line (``program``, ``global``...); the command
driver has none. Only the lines between the renders' common head and tail, and of those
only the ones that differ, are shaped. When no service and no raw key the render read
holds such a character, the twin *is* the snapshot and there is nothing to compare.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from itertools import chain, compress, count
from operator import is_not, itemgetter, ne
from pathlib import Path
from typing import Any, cast

from lbsync.config import TemplateSettings
from lbsync.errors import RenderError, StructureViolation
from lbsync.model import HealthMark, Instance, Service, SettingValue, Snapshot
from lbsync.render import RawKeys, Renderer

LineShape = Callable[[str], list[str]]
"""One rendered line → the structural items it carries (directive names, punctuation)."""

_UNSAFE = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029;{}#\"'\\\\`]")


def is_benign(text: str) -> bool:
    return _UNSAFE.search(text) is None


def neutral(text: str) -> str:
    """``text`` with every structural character replaced by ``x`` (same length)."""
    return _UNSAFE.sub("x", text)


# --- line shapes, per LB ---------------------------------------------------------------

_NGINX_TOKEN = re.compile(
    r"""\s+|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\#.*|[;{}"']|[^\s;{}"'\#][^\s;{}"']*"""
)


def nginx_line_shape(line: str) -> list[str]:
    """Punctuation, comments, stray quotes, and the word that starts each statement."""
    items: list[str] = []
    starts = True  # a line may start a statement; a line-local view, the same for the twin
    for match in _NGINX_TOKEN.finditer(line):
        token = match.group()
        first = token[0]
        if first.isspace():
            continue
        if token in (";", "{", "}", '"', "'"):
            items.append(token)
            starts = token in (";", "{", "}")
        elif first == "#":
            items.append("#")
            break
        elif starts:
            items.append(token if first not in "\"'" else "<quoted>")
            starts = False
    return items


def haproxy_line_shape(line: str) -> list[str]:
    """The keyword a line starts with (a section name or a section's directive)."""
    words = line.split(None, 1)
    if not words or words[0].startswith("#"):
        return []
    return [words[0]]


def added_structure(real: bytes, twin: bytes, shape: LineShape) -> tuple[str, str] | None:
    """(item, line) for the first structural item ``real`` has more of than ``twin``.

    Only the lines between the two renders' common head and tail are looked at (found by
    bisection with ``bytes.startswith``/``endswith`` on a memoryview: memcmp, no copies),
    and of those only the ones that differ (``map(ne, …)``) are shaped: pairwise when
    both sides have as many lines (values changed, none added a line), else as counted
    multisets.
    """
    if real == twin:
        return None
    real_lines, twin_lines = _differing_lines(real, twin)
    if len(real_lines) == len(twin_lines):
        for index in compress(count(), map(ne, real_lines, twin_lines)):
            item = _extra_item(shape(real_lines[index]), shape(twin_lines[index]))
            if item is not None:
                return item, real_lines[index]
        return None
    only_real, only_twin = Counter(real_lines), Counter(twin_lines)
    have: Counter[str] = Counter()
    for line, times in (only_twin - only_real).items():
        for item in shape(line):
            have[item] += times
    for line in only_real - only_twin:
        for item in shape(line):
            if have[item] > 0:
                have[item] -= 1
            else:
                return item, line
    return None


def _differing_lines(real: bytes, twin: bytes) -> tuple[list[str], list[str]]:
    """The lines of each render between the longest common head and tail of whole lines."""
    view = memoryview(twin)
    limit = min(len(real), len(twin))
    head = _longest(lambda n: real.startswith(view[:n]), limit)
    head = real.rfind(b"\n", 0, head) + 1  # back to the start of the line it ends in
    tail = _longest(lambda n: real.endswith(view[len(twin) - n :]), limit - head)
    if tail:
        newline = real.find(b"\n", len(real) - tail)  # forward to a line inside the tail
        tail = len(real) - newline - 1 if newline >= 0 else 0
    middle_real = real[head : len(real) - tail].decode("utf-8", errors="replace")
    middle_twin = twin[head : len(twin) - tail].decode("utf-8", errors="replace")
    return middle_real.split("\n"), middle_twin.split("\n")


def _longest(holds: Callable[[int], bool], limit: int) -> int:
    """The largest n ≤ limit for which ``holds(n)`` (true up to some n, false past it)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if holds(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _extra_item(real: list[str], twin: list[str]) -> str | None:
    if real == twin:
        return None
    extra = Counter(real)
    extra.subtract(twin)
    return next((item for item in real if extra[item] > 0), None)


# --- benign twins ------------------------------------------------------------------------


def _benign_service(service: Service, benign_before: Service | None = None) -> bool:
    """``benign_before``: an earlier, benign version of the service, still alive: the
    instances it shares with ``service`` (the same objects) are not looked at again."""
    if not is_benign(service.name):
        return False
    for key, value in service.settings.items():
        if not is_benign(key) or (isinstance(value, str) and not is_benign(value)):
            return False
    instances: Sequence[Instance] = service.instances
    if benign_before is not None:
        instances = _not_in(service.instances, benign_before.instances)
    return is_benign(" ".join(chain.from_iterable(map(_texts, instances))))


def _not_in(instances: tuple[Instance, ...], before: tuple[Instance, ...]) -> list[Instance]:
    """The instances that are not objects of ``before`` (alive, so ids are theirs)."""
    if len(instances) == len(before):  # a change in place: compare position by position
        return list(compress(instances, map(is_not, instances, before)))
    known = set(map(id, before))
    return [i for i in instances if id(i) not in known]


def _texts(instance: Instance) -> list[str]:
    """The instance's free-form strings.

    Searched joined by a space, one search for a whole service: the pattern matches one
    character at a time and a space is benign, so the joined text holds a structural
    character exactly when one of the texts does (5 searches per instance took ~10 ms
    of the first round at 10,000 instances)."""
    texts = [instance.id, instance.host, *instance.meta.keys(), *instance.meta.values()]
    if instance.health is not None:
        texts += [instance.health.reason, instance.health.by]
    return texts


def _benign_instance(instance: Instance) -> bool:
    return is_benign(" ".join(_texts(instance)))


def _twin_service(service: Service) -> Service:
    settings: dict[str, SettingValue] = {
        neutral(k): neutral(v) if isinstance(v, str) else v for k, v in service.settings.items()
    }
    return Service.model_construct(
        name=neutral(service.name),
        instances=tuple(_twin_instance(i) for i in service.instances),
        settings=settings,
    )


def _twin_instance(instance: Instance) -> Instance:
    if _benign_instance(instance):
        return instance
    health = instance.health
    if health is not None:
        health = HealthMark.model_construct(
            status=health.status, reason=neutral(health.reason), by=neutral(health.by)
        )
    return instance.model_copy(
        update={
            "id": neutral(instance.id),
            "host": neutral(instance.host),
            "meta": {neutral(k): neutral(v) for k, v in instance.meta.items()},
            "health": health,
        }
    )


def _neutral_extra(value: object, twins: Mapping[int, Instance]) -> object:
    """``value`` (a driver's template extras) with the instances in ``twins`` replaced by
    their twins, through tuples, named tuples, lists and mappings; the rest as it is (an
    unchanged container stays the same object, for the render cache)."""
    if isinstance(value, Instance):
        return twins.get(id(value), value)
    if isinstance(value, tuple | list):
        items = [_neutral_extra(item, twins) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            return items
        if hasattr(value, "_fields"):  # a named tuple (HAProxy's Slot)
            return cast(Any, type(value))(*items)
        return tuple(items)
    if isinstance(value, Mapping):
        pairs = {key: _neutral_extra(item, twins) for key, item in value.items()}
        return value if all(pairs[k] is v for k, v in value.items()) else pairs
    return value


class WatchedKeys(RawKeys):
    """Raw-key access for the real render; notes whether it read a non-benign value."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        super().__init__(keys)
        self.read_unsafe = False

    def _value(self, key: str) -> str:
        value = super()._value(key)
        if not self.read_unsafe and not is_benign(value):
            self.read_unsafe = True
        return value


class NeutralKeys(RawKeys):
    """Raw-key access for the twin render: every value read is neutralized."""

    def _value(self, key: str) -> str:
        return neutral(super()._value(key))


class StructureCheck:
    """Checks one target's renders against their benign twins.

    Twins are kept per ``Service`` object (the catalog hands unchanged services over as
    the same object), so a twin is built once per change and the render cache serves the
    twin's blocks as it serves the real ones. A round looks only at the services whose
    object is not the one held (found in C passes): at 1,000 services, a Python pass over
    every service cost ~0.85 ms a round (bench rounds).
    """

    def __init__(
        self, renderer: Renderer, templates: Sequence[TemplateSettings], shape: LineShape | None
    ) -> None:
        self.renderer = renderer
        self.templates = templates
        self.shape = shape
        self._held: dict[str, tuple[Service, Service]] = {}  # name → (service, its twin)
        self._unsafe: set[str] = set()  # the names whose twin is not the service itself

    def keys(self, snapshot: Snapshot) -> RawKeys:
        """The raw-key access the real render must use, so ``check`` knows what it read."""
        return WatchedKeys(snapshot.keys) if self.shape is not None else RawKeys(snapshot.keys)

    def check(
        self,
        snapshot: Snapshot,
        extra: Mapping[str, Any],
        rendered: Mapping[Path, bytes],
        raw: RawKeys,
    ) -> None:
        """Raise StructureViolation if a render holds structure its benign twin doesn't."""
        if self.shape is None:
            return
        twin = self.twin(snapshot)
        if twin is snapshot and not (isinstance(raw, WatchedKeys) and raw.read_unsafe):
            return
        neutral_keys = NeutralKeys(snapshot.keys)
        instances = self._instance_twins(snapshot)
        if instances:  # a driver's extras carry instances too (HAProxy's slots)
            extra = dict(extra)
            extra.update((k, _neutral_extra(v, instances)) for k, v in extra.items())
        for template in self.templates:
            try:
                benign = self.renderer.render(template.src, twin, extra, raw=neutral_keys)
            except RenderError as err:
                raise StructureViolation(
                    f"the same snapshot with benign values does not render ({err.message})",
                    template=str(template.src),
                    file=str(template.dest),
                    directive="",
                ) from err
            added = added_structure(rendered[template.dest], benign, self.shape)
            if added is not None:
                item, line = added
                raise StructureViolation(
                    f"a value added {item!r}, which the render of benign values lacks, in",
                    template=str(template.src),
                    file=str(template.dest),
                    directive=line.strip(),
                )

    def _instance_twins(self, snapshot: Snapshot) -> dict[int, Instance]:
        """id of each instance of ``snapshot`` that has a different twin → that twin."""
        twins: dict[int, Instance] = {}
        for name in self._unsafe & snapshot.services.keys():
            real, twin = self._held[name]
            for old, new in zip(real.instances, twin.instances, strict=True):
                if new is not old:
                    twins[id(old)] = new
        return twins

    def twin(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with every service replaced by its benign twin (itself if benign)."""
        services = snapshot.services
        for name in self._moved(services):
            self._hold(name, services.get(name))
        if not self._unsafe:
            return snapshot
        twins = [twin for _, twin in map(self._held.__getitem__, services)]
        return Snapshot.model_construct(
            revision=snapshot.revision, services={t.name: t for t in twins}, keys=snapshot.keys
        )

    def _moved(self, services: Mapping[str, Service]) -> list[str]:
        """The names whose service is not the object held: added, removed or changed."""
        held = self._held
        if services.keys() == held.keys():  # the usual round: compare object by object, in C
            before = map(itemgetter(0), map(held.__getitem__, services))
            return list(compress(services, map(is_not, services.values(), before)))
        gone = (None, None)
        return [
            n for n in services.keys() | held.keys() if held.get(n, gone)[0] is not services.get(n)
        ]

    def _hold(self, name: str, service: Service | None) -> None:
        """Hold ``service`` and its twin under ``name`` (None: the service is gone). An
        earlier benign version's instances that it still shares are not looked at again."""
        before = self._held.pop(name, None)
        self._unsafe.discard(name)
        if service is None:
            return
        benign_before = before[0] if before is not None and before[1] is before[0] else None
        twin = service if _benign_service(service, benign_before) else _twin_service(service)
        self._held[name] = (service, twin)
        if twin is not service:
            self._unsafe.add(name)
