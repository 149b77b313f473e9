from lbsync.config import GuardSettings
from lbsync.guard import Guard, judge
from lbsync.testing import snapshot_from


def catalog(up: int, down: int = 0, service: str = "web") -> dict[str, object]:
    instances = {f"i{n}": f"10.0.0.{n + 1}:80" for n in range(up + down)}
    health = {f"i{n}": "down" for n in range(up, up + down)}
    return {"services": {service: {"instances": instances, "health": health}}}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_no_previous_state_is_admitted() -> None:
    assert not judge(GuardSettings(), None, snapshot_from(catalog(0))).held


def test_removing_more_than_the_fraction_is_held() -> None:
    verdict = judge(GuardSettings(), snapshot_from(catalog(10)), snapshot_from(catalog(4, 6)))
    assert verdict.held
    assert (verdict.removed, verdict.total) == (6, 10)
    assert "6 of 10" in verdict.reason


def test_removing_up_to_the_fraction_is_admitted() -> None:
    assert not judge(GuardSettings(), snapshot_from(catalog(10)), snapshot_from(catalog(5, 5))).held


def test_single_removal_never_trips_the_fraction_rule() -> None:
    assert not judge(GuardSettings(), snapshot_from(catalog(1)), snapshot_from(catalog(0, 1))).held
    strict = GuardSettings(min_removed=1)
    assert judge(strict, snapshot_from(catalog(1)), snapshot_from(catalog(0, 1))).held


def test_min_instances_per_service() -> None:
    settings = GuardSettings(min_instances={"web": 3})
    assert judge(settings, snapshot_from(catalog(4)), snapshot_from(catalog(2, 2))).held
    # already below the minimum and not getting worse: admitted
    assert not judge(settings, snapshot_from(catalog(2)), snapshot_from(catalog(2))).held


def test_empty_catalog_needs_confirmation_whatever_the_fraction() -> None:
    settings = GuardSettings(max_removed_fraction=1.0)
    verdict = judge(settings, snapshot_from(catalog(5)), snapshot_from({}))
    assert verdict.held
    assert verdict.needs_confirmation


def test_hold_releases_after_hold_time_or_on_confirmation() -> None:
    clock = Clock()
    guard = Guard(GuardSettings(hold=30.0), clock)
    before, after = snapshot_from(catalog(10)), snapshot_from(catalog(2, 8))
    assert not guard.admit(before, after, confirmed_at=0.0)
    assert guard.release_at() == 30.0
    clock.now = 29.0
    assert not guard.admit(before, after, confirmed_at=0.0)
    clock.now = 30.0
    assert guard.admit(before, after, confirmed_at=0.0)
    assert guard.held is None

    clock.now = 100.0
    assert not guard.admit(before, after, confirmed_at=0.0)
    assert guard.held_since_wall is not None
    assert guard.admit(before, after, confirmed_at=guard.held_since_wall + 1)


def test_hold_clears_when_the_update_no_longer_trips() -> None:
    guard = Guard(GuardSettings(), Clock())
    before = snapshot_from(catalog(10))
    assert not guard.admit(before, snapshot_from(catalog(2, 8)), confirmed_at=0.0)
    assert guard.admit(before, snapshot_from(catalog(9, 1)), confirmed_at=0.0)
    assert guard.held is None


def test_empty_catalog_is_never_released_by_time() -> None:
    clock = Clock()
    guard = Guard(GuardSettings(hold=1.0), clock)
    before = snapshot_from(catalog(5))
    assert not guard.admit(before, snapshot_from({}), confirmed_at=0.0)
    clock.now = 1e6
    assert guard.release_at() is None
    assert not guard.admit(before, snapshot_from({}), confirmed_at=0.0)
