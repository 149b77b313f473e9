"""Which backends a reconcile tick reads in full: those whose one-line summary moved, and
a rotating share bounded in slots.

Reading ``show servers state`` of every backend on every tick costs ~1 ms of CPU per
20,000 slots just to receive, plus ~7 ms to reduce to the columns compared (and ~21 ms of
HAProxy's to produce): too much for an idle tick at 10,000 instances. So each tick reads
two cheaper things instead (docs/haproxy.md has the bounds and the figures):

- ``show stat -1 2 -1``, one row per backend (~0.1 ms for 100): its total weight and its
  counts of usable active and backup servers move with every ``set server … state
  maint|drain|ready`` and ``set weight`` someone makes behind lbsync's back, so such a
  backend is read in full on the next tick;
- a ``CheckRotation`` share: a backend whose summary did not move is still read in
  full in turn, for what the summary cannot show (an address or port changed, two
  changes that cancel out in the totals, a server that health checks took down while a
  weight went up).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.runtime import batches
from lbsync.errors import DriverError

BACKEND_STATS = "show stat -1 2 -1"  # every proxy (-1), backends only (type 2), all (-1)
SUMMARY_COLUMNS = (b"weight", b"act", b"bck")

Summary = tuple[bytes, ...]  # a backend's SUMMARY_COLUMNS


def ask_all(admin: Cli, commands: Sequence[str], *, target: str) -> list[bytes]:
    """Each command's answer, the commands sent ``;``-joined in as few sessions as
    ``runtime.MAX_CLI_LINE`` allows: a session costs more CPU than a small backend's
    answer (~0.04 ms). HAProxy ends each command's answer with an empty line; the
    answer of a command sent alone is returned as read (a copy of a 1.4 MB answer costs
    ~0.5 ms, its pages faulted in anew), the others are cut there."""
    answers: list[bytes] = []
    for line in batches(commands):
        try:
            answer = admin.query_bytes(line)
        except DriverError as err:
            raise DriverError(
                f"runtime state cannot be repaired: admin socket: {err}", target=target
            ) from err
        sent = line.count(";") + 1  # no argument holds a ";" (admin_commands' grammar)
        if sent == 1 and answer.find(b"\n\n") == len(answer) - 2:
            answers.append(answer)
            continue
        parts = answer.split(b"\n\n")
        if len(parts) != sent + 1 or parts[-1]:
            raise DriverError(
                f"runtime state cannot be repaired: {sent} command(s) got "
                f"{len(parts) - 1} answer(s): {answer[:200]!r}",
                target=target,
            )
        answers += parts[:-1]
    return answers


def backend_summaries(answer: bytes) -> dict[str, Summary] | None:
    """Backend name -> its ``weight``, ``act`` and ``bck`` from ``show stat -1 2 -1``
    (columns found by header name); None when the answer has no such header (then every
    backend is read).

    Only these columns: the others count traffic and move all the time. (A loop with
    ``itemgetter``: ~0.05 ms for 100 backends, a quarter of joining the fields.)
    """
    header_end = answer.find(b"\n")
    if not answer.startswith(b"# ") or header_end < 0:
        return None
    header = answer[2:header_end].split(b",")
    try:
        name_at = header.index(b"pxname")
        picked = [header.index(c) for c in SUMMARY_COLUMNS]
    except ValueError:
        return None
    pick, last = operator.itemgetter(*picked), max(name_at, *picked)
    summaries = {}
    for row in answer[header_end + 1 :].split(b"\n"):
        fields = row.split(b",", last + 1)
        if len(fields) > last:
            summaries[fields[name_at].decode("ascii", "replace")] = pick(fields)
    return summaries


class CheckRotation:
    """Backends in turn, ``budget`` slots of credit a tick: a backend is read when the
    credit covers its slots (one bigger than the budget waits for the credit to build
    up), so a tick's full reads stay near ``budget`` slots.

    At the end of a tick the credit is less than the next backend's slots, otherwise it
    would have been read: so once ``budget`` x k covers every slot, all backends have
    been read, and a backend is read again at the latest ``cycle_ticks`` ticks after it
    was last read.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._credit = 0
        self._cursor = 0

    def due(self, backends: Sequence[str], slots: Mapping[str, int]) -> list[str]:
        """The backends to read in full this tick (``backends`` in a stable order)."""
        if not backends:
            return []
        self._credit += self.budget
        due: list[str] = []
        while len(due) < len(backends):
            name = backends[self._cursor % len(backends)]
            if slots[name] > self._credit:
                return due
            self._credit -= slots[name]
            self._cursor += 1
            due.append(name)
        self._credit = 0  # every backend this tick: nothing to save up for
        return due

    def cycle_ticks(self, total_slots: int) -> int:
        """Ticks within which every backend is read at least once (the worst-case delay
        before a change the summaries cannot show is seen, in ticks)."""
        return max(1, math.ceil(total_slots / self.budget))
