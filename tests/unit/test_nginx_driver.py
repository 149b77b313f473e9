"""The nginx driver's pure parts (the rest runs against a real nginx in integration)."""

from __future__ import annotations

import pytest

from lbsync.drivers.nginx.driver import first_look


@pytest.mark.parametrize(
    ("last_reload", "wait"),
    [
        (0.0, 0.005),  # nothing seen yet: look early
        (0.030, 0.024),  # most of what the last reload took
        (5.0, 0.1),  # one slow reload does not hold up the rounds after it
    ],
)
def test_first_look_waits_for_most_of_the_last_reload_within_bounds(
    last_reload: float, wait: float
) -> None:
    assert first_look(last_reload) == pytest.approx(wait)
