"""Which services' changes made a round fail, found by trial, and snapshots without them.

A round that fails to render, breaks the structural check or is refused by the LB's
checker is tried again on compositions: the last applied snapshot plus some of the
services that changed since (bisecting). A service whose change fails on its own is held
back at its last applied version (or left out, if it was absent) and every other change
applies in the same round; it is tried again when its data changes, or unchanged after a
doubling delay. Composition reuses the ``Service`` objects of the two snapshots, so the
render cache keeps hitting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lbsync.errors import LbsyncError
from lbsync.model import Service, Snapshot, service_prefix

MAX_TRIALS = 32
"""Compositions tried per failed round; past that the round fails as a whole (one bad
service among 1,000 changed ones needs ~20)."""

MAX_KEYS_SHOWN = 10

RETRY_FIRST = 60.0
RETRY_MAX = 3600.0
"""A held service whose data did not change is tried again, at the first round after
``RETRY_FIRST`` s, then after twice as long each time it fails again, up to ``RETRY_MAX``:
what the checker refused may have been the environment (a missing file), not the value."""


@dataclass(frozen=True)
class HeldService:
    """A service kept at its last applied version because its own change failed.

    ``failed`` is the version that failed (None: the service's removal did); the hold
    lasts while the catalog hands over that very object, i.e. until its data changes.
    """

    name: str
    failed: Service | None
    error: LbsyncError
    keys: tuple[str, ...]  # the changed keys, relative to the prefix
    revision: int
    attempt: int  # how many rounds in a row this very version failed
    retry_at: float  # monotonic time after which it is tried again though unchanged

    def document(self) -> dict[str, object]:
        return {
            "error": str(self.error),
            "keys": list(self.keys),
            "revision": self.revision,
            "attempt": self.attempt,
        }


def retry_delay(attempt: int) -> float:
    return min(RETRY_FIRST * 2.0 ** min(attempt - 1, 16), RETRY_MAX)


class Unattributable(Exception):
    """No set of services is to blame on its own (a template bug, or services that fail
    only together); the round fails as a whole. Internal to the pipeline."""


def changed_keys(base: Snapshot, candidate: Snapshot, name: str) -> tuple[str, ...]:
    """The raw keys of service ``name`` that differ between the two (at most a few)."""
    prefix = service_prefix(name)
    keys = {k for k in candidate.keys if k.startswith(prefix)}
    keys |= {k for k in base.keys if k.startswith(prefix)}
    differ = sorted(k for k in keys if base.keys.get(k) != candidate.keys.get(k))
    return tuple(differ[:MAX_KEYS_SHOWN])


Trial = Callable[[Iterable[str]], LbsyncError | None]
"""Tries the base plus these services' changes: the error it fails with, or None."""


def find_culprits(
    suspects: list[str], failure: LbsyncError, trial: Trial, budget: int = MAX_TRIALS
) -> dict[str, LbsyncError]:
    """The services whose change fails on its own, each with its error, by bisection.

    ``suspects`` together failed with ``failure``. Raises Unattributable when the base
    alone fails, when two halves pass alone but not together, or past ``budget`` trials.
    """
    left = [budget]

    def attempt(names: list[str]) -> LbsyncError | None:
        if left[0] <= 0:
            raise Unattributable(f"no culprit found within {budget} trials")
        left[0] -= 1
        return trial(names)

    def search(names: list[str], error: LbsyncError) -> dict[str, LbsyncError]:
        if len(names) == 1:
            return {names[0]: error}
        found: dict[str, LbsyncError] = {}
        middle = len(names) // 2
        for half in (names[:middle], names[middle:]):
            half_error = attempt(half)
            if half_error is not None:
                found.update(search(half, half_error))
        if not found:
            raise Unattributable(f"{', '.join(names)} fail together, not one by one")
        return found

    if attempt([]) is not None:
        raise Unattributable("the round fails without any of the changed services")
    return search(suspects, failure)
