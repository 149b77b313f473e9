"""The nginx driver's pure parts (the rest runs against a real nginx in integration)."""

from __future__ import annotations

import pytest

from lbsync.drivers.nginx.driver import first_look, poll_pauses


@pytest.mark.parametrize(
    ("recent", "wait"),
    [
        ((), 0.005),  # nothing seen yet: look early
        ((0.030,), 0.024),  # most of what the last reload took
        ((0.33, 0.34, 0.336), 0.264),  # a big config: most of its reload time too
        ((0.030, 5.0), 0.024),  # one slow reload does not hold up the rounds after it
        ((5.0, 5.0, 5.0), 1.0),  # nor do slow ones by more than a second
    ],
)
def test_first_look_waits_for_most_of_the_recent_reloads_within_bounds(
    recent: tuple[float, ...], wait: float
) -> None:
    assert first_look(recent) == pytest.approx(wait)


@pytest.mark.parametrize(
    ("recent", "pauses"),
    [
        ((), (0.005, 0.05)),
        ((0.030,), (0.005, 0.05)),  # small configs: as before
        ((0.3, 0.4), (0.03, 0.075)),  # a tenth of the reload, doubling up to a quarter
        ((5.0,), (0.1, 0.25)),  # bounded like the first look
    ],
)
def test_later_looks_come_at_a_share_of_the_expected_reload(
    recent: tuple[float, ...], pauses: tuple[float, float]
) -> None:
    assert poll_pauses(recent) == pytest.approx(pauses)
