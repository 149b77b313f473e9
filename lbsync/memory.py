"""The process's memory during start-up and after a full load of the catalog, which is
long-lived from then on."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Hold:
    """Whether ``hold`` turned the cyclic collector off (``settle`` turns it back on)."""

    active = False


_HOLD = _Hold()


def hold() -> None:
    """Turn the cyclic collector off until ``settle``: for ``lbsync run``'s start.

    The imports and the catalog's full load allocate hundreds of thousands of objects
    that live as long as the process; the collector kept walking them on the way to the
    first applied config (~230 young and a full collection, ~45 ms at 10,000 instances),
    and found next to nothing to free. Reference counting still frees everything that is
    not in a cycle meanwhile.
    """
    if gc.isenabled():
        gc.disable()
        _HOLD.active = True


def settle() -> None:
    """After a full load of the catalog, which is long-lived from then on.

    Moves it out of the cyclic collector's way (full collections over it, 30-40 ms at
    10,000 instances, used to land in the middle of rounds), then hands the heap that
    the load freed (the etcd response, its protobuf objects, the raw values) back to the
    system: glibc keeps it otherwise, 3.5 MB of RSS at 10,000 instances (bench scale).
    Turns the collector back on if ``hold`` turned it off.
    """
    gc.collect()
    gc.freeze()
    if _HOLD.active:
        _HOLD.active = False
        gc.enable()
    trim = _find_malloc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """The cyclic collector paused for the block, then as it was. The catalog's full
    load: it allocates ~10 objects a key, none in a cycle (reference counting frees them
    all), and each collection it triggered walked every object built so far: ~30% of a
    100,000-key load (1.24-1.38 s -> 0.77-1.0 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None elsewhere (musl has none). Looked up at the first
    ``settle``, after the first round: importing ctypes is 1-2 ms of start-up."""
    import ctypes

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim
