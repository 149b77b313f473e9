"""The soak (``python -m bench soak``) in short, as CI runs it: every fault of the table at
least once, against real etcd, nginx and ``lbsync run``, with random churn and hostile
values between faults, and not one invariant violated.

Bounded by a number of cycles (three rounds of the shuffled table) and by a wall-clock cap;
convergence is polled with a generous bound. Faults that only the coming reconciler
repairs without an etcd change ("needs reconciler" in the table) converge here on the
change the soak writes after each fault. A second, process-free test keeps the soak's own
reading of the key schema in agreement with lbsync's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench import soak
from bench.soak_faults import FAULTS
from bench.soak_model import HOSTILE_INSTANCES, HOSTILE_MARKS, Churn, health_status, registration
from lbsync.errors import InvalidValue
from lbsync.values import parse_health, parse_registration

pytestmark = pytest.mark.integration

CI_OPTIONS = soak.Options(
    minutes=4.0,  # a cap for a loaded machine: three rounds take ~40 s on an idle one
    cycles=3 * len(FAULTS),
    converge=30.0,
    seed=12,
)


def test_short_soak_converges_after_every_fault_without_violations(tmp_path: Path) -> None:
    result = soak.run(CI_OPTIONS, base=tmp_path)

    assert result.violations == []
    assert result.cycles >= len(FAULTS), f"the cap cut the first round: {result.cycles}"
    converged = {name for name, tally in result.tallies.items() if tally.converged_s}
    assert converged == {fault.name for fault in FAULTS}
    assert result.nginx_checks > 0, "the sampler never ran nginx -t"


def test_the_soaks_own_schema_agrees_with_lbsyncs_on_every_value_it_writes() -> None:
    """The soak's ground truth is computed without lbsync; if the two schemas drift apart,
    the soak would report violations that are the bench's. Nothing starts here."""
    for raw in HOSTILE_INSTANCES:
        assert registration(raw) is None
        with pytest.raises(InvalidValue):
            parse_registration("/k", raw.encode())
    for raw in HOSTILE_MARKS:
        assert health_status(raw) is None
        with pytest.raises(InvalidValue):
            parse_health("/k", raw.encode())
    churn = Churn(random.Random(7), [8001, 8002])
    changes = [churn.next() for _ in range(500)]
    for change in (c for c in changes if c.value is not None and c.kind != "hostile"):
        if "/instances/" in change.key:
            ours = registration(change.value)
            theirs = parse_registration(change.key, change.value.encode())
            assert ours == (theirs.host, theirs.port, theirs.weight, theirs.state.value)
        else:
            theirs_mark = parse_health(change.key, change.value.encode())
            assert health_status(change.value) == theirs_mark.status.value
