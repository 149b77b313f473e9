"""The soak (``python -m bench soak``) in short, as CI runs it: every fault of the table at
least once, against real etcd, nginx and ``lbsync run``, with random churn and hostile
values between faults, and not one invariant violated.

Bounded by a number of cycles (three rounds of the shuffled table) and by a wall-clock cap;
convergence is polled with a generous bound. Faults that only the coming reconciler
repairs without an etcd change ("needs reconciler" in the table) converge here on the
change the soak writes after each fault.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import soak
from bench.soak_faults import FAULTS

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
