"""The guard, per service: pure judgement, holds on an injected clock, the confirm files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lbsync.config import GuardSettings
from lbsync.errors import ConfigError, StageError
from lbsync.guard import CONFIRM_DIR, ConfirmedAt, Guard, confirm_held, confirmed_at, judge
from lbsync.model import Snapshot
from lbsync.testing import snapshot_from


def service(up: int, down: int = 0, first: int = 0) -> dict[str, object]:
    instances = {f"i{n}": f"10.0.0.{n + 1}:80" for n in range(first, first + up + down)}
    health = {f"i{n}": "down" for n in range(first + up, first + up + down)}
    return {"instances": instances, "health": health}


def catalog(up: int, down: int = 0, name: str = "web") -> dict[str, object]:
    return {"services": {name: service(up, down)}}


def two(web: dict[str, object], api: dict[str, object]) -> Snapshot:
    return snapshot_from({"services": {"web": web, "api": api}})


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def never(_service: str | None) -> float:
    return 0.0


def confirmations(times: Mapping[str | None, float]) -> ConfirmedAt:
    return lambda name: times.get(name, 0.0)


# --- judge: pure -----------------------------------------------------------------------------


def test_no_previous_state_is_admitted() -> None:
    assert not judge(GuardSettings(), None, snapshot_from(catalog(0))).held


def test_removing_more_than_the_fraction_of_a_service_holds_that_service() -> None:
    verdict = judge(GuardSettings(), snapshot_from(catalog(10)), snapshot_from(catalog(4, 6)))
    assert list(verdict.services) == ["web"]
    assert (verdict.services["web"].removed, verdict.services["web"].total) == (6, 10)
    assert "6 of 10 usable instances of 'web'" in verdict.services["web"].reason
    assert verdict.catalog is None


def test_the_fraction_is_per_service_not_diluted_by_the_others() -> None:
    before = two(service(10), service(100, first=100))
    after = two(service(4, 6), service(100, first=100))
    assert list(judge(GuardSettings(), before, after).services) == ["web"]


def test_removing_up_to_the_fraction_is_admitted() -> None:
    assert not judge(GuardSettings(), snapshot_from(catalog(10)), snapshot_from(catalog(5, 5))).held


def test_single_removal_never_trips_the_fraction_rule() -> None:
    assert not judge(GuardSettings(), snapshot_from(catalog(1)), snapshot_from(catalog(0, 1))).held
    strict = GuardSettings(min_removed=1)
    assert judge(strict, snapshot_from(catalog(1)), snapshot_from(catalog(0, 1))).held


def test_a_service_that_disappears_is_a_removal_of_all_its_instances() -> None:
    before = two(service(3), service(3, first=10))
    after = snapshot_from({"services": {"api": service(3, first=10)}})
    verdict = judge(GuardSettings(), before, after)
    assert list(verdict.services) == ["web"]
    assert verdict.services["web"].removed == 3


def test_min_instances_per_service() -> None:
    settings = GuardSettings(min_instances={"web": 3})
    assert judge(settings, snapshot_from(catalog(4)), snapshot_from(catalog(2, 2))).held
    # already below the minimum and not getting worse: admitted
    assert not judge(settings, snapshot_from(catalog(2)), snapshot_from(catalog(2))).held


def test_empty_catalog_is_global_and_needs_confirmation_whatever_the_fraction() -> None:
    settings = GuardSettings(max_removed_fraction=1.0)
    verdict = judge(settings, two(service(5), service(2, first=10)), snapshot_from({}))
    assert verdict.catalog is not None
    assert verdict.catalog.needs_confirmation
    assert verdict.catalog.total == 7


# --- Guard: holds per service on an injected clock -------------------------------------------


def test_a_held_service_keeps_its_admitted_version_while_the_others_apply() -> None:
    guard = Guard(GuardSettings(hold=30.0), Clock())
    before = two(service(10), service(1, first=100))
    after = two(service(2, 8), service(2, first=100))

    decision = guard.admit(before, after, never)

    assert decision.snapshot is not None
    assert decision.snapshot.services["web"] is before.services["web"]
    assert decision.snapshot.services["api"] is after.services["api"]
    assert "/services/web/health/i2" not in decision.snapshot.keys
    assert "/services/api/instances/i101" in decision.snapshot.keys
    assert [h.service for h in decision.started] == ["web"]
    assert list(guard.holds) == ["web"]


def test_holds_start_and_end_per_service() -> None:
    clock = Clock()
    guard = Guard(GuardSettings(hold=30.0), clock)
    before = two(service(10), service(10, first=100))
    web_out = two(service(2, 8), service(10, first=100))
    assert guard.admit(before, web_out, never).started
    assert guard.release_at() == 30.0

    clock.now = 20.0
    both_out = two(service(2, 8), service(2, 8, first=100))
    decision = guard.admit(before, both_out, never)
    assert [h.service for h in decision.started] == ["api"]  # web's hold goes on, not restarted
    assert guard.release_at() == 30.0

    clock.now = 30.0
    decision = guard.admit(before, both_out, never)
    assert decision.snapshot is not None
    assert decision.snapshot.services["web"] is both_out.services["web"]  # released by time
    assert decision.snapshot.services["api"] is before.services["api"]  # still held
    assert list(guard.holds) == ["api"]
    assert guard.release_at() == 50.0


def test_confirming_one_service_releases_only_that_one() -> None:
    guard = Guard(GuardSettings(hold=3600.0), Clock())
    before = two(service(10), service(10, first=100))
    after = two(service(2, 8), service(2, 8, first=100))
    guard.admit(before, after, never)
    since = guard.holds["web"].since_wall

    assert guard.may_end(confirmations({"web": since + 1}))
    with capture_logs() as logs:
        decision = guard.admit(before, after, confirmations({"web": since + 1}))

    assert decision.snapshot is not None
    assert decision.snapshot.services["web"] is after.services["web"]
    assert decision.snapshot.services["api"] is before.services["api"]
    assert list(guard.holds) == ["api"]
    released = [e for e in logs if e["event"] == "guard.released"]
    assert [(e["service"], e["why"]) for e in released] == [("web", "confirmed")]


def test_a_confirmation_older_than_the_hold_counts_for_nothing() -> None:
    guard = Guard(GuardSettings(hold=3600.0), Clock())
    before, after = snapshot_from(catalog(10)), snapshot_from(catalog(2, 8))
    guard.admit(before, after, never)
    since = guard.holds["web"].since_wall
    stale = confirmations({None: since - 1, "web": since - 1})
    assert not guard.may_end(stale)
    assert list(guard.holds) == ["web"]
    decision = guard.admit(before, after, stale)
    assert decision.snapshot is not None
    assert decision.snapshot.services["web"] is before.services["web"]


def test_confirming_all_releases_every_service() -> None:
    guard = Guard(GuardSettings(hold=3600.0), Clock())
    before = two(service(10), service(10, first=100))
    after = two(service(2, 8), service(2, 8, first=100))
    guard.admit(before, after, never)
    latest = max(h.since_wall for h in guard.holds.values())

    decision = guard.admit(before, after, confirmations({None: latest + 1}))

    assert decision.snapshot is after
    assert not guard.holding


def test_a_hold_ends_when_its_service_no_longer_trips() -> None:
    guard = Guard(GuardSettings(), Clock())
    before = snapshot_from(catalog(10))
    guard.admit(before, snapshot_from(catalog(2, 8)), never)
    with capture_logs() as logs:
        back = snapshot_from(catalog(9, 1))
        assert guard.admit(before, back, never).snapshot is back
    assert not guard.holding
    assert [e["why"] for e in logs if e["event"] == "guard.released"] == [
        "no longer over the limits"
    ]


def test_guard_held_names_the_service_and_its_confirm_command() -> None:
    guard = Guard(GuardSettings(hold=30.0), Clock(), confirm="lbsync confirm -c x.toml")
    with capture_logs() as logs:
        guard.admit(snapshot_from(catalog(10)), snapshot_from(catalog(2, 8)), never)
    (held,) = [e for e in logs if e["event"] == "guard.held"]
    assert held["service"] == "web"
    assert held["confirm"] == "lbsync confirm -c x.toml --service web"
    assert held["hold_s"] == 30.0


def test_empty_catalog_holds_everything_and_only_a_global_confirm_releases_it() -> None:
    clock = Clock()
    guard = Guard(GuardSettings(hold=1.0), clock)
    before, empty = snapshot_from(catalog(5)), snapshot_from({})

    assert guard.admit(before, empty, never).snapshot is None
    assert guard.catalog_hold is not None
    since = guard.catalog_hold.since_wall
    clock.now = 1e6
    assert guard.release_at() is None
    assert guard.admit(before, empty, confirmations({"web": since + 1})).snapshot is None
    assert not guard.may_end(confirmations({"web": since + 1}))

    assert guard.admit(before, empty, confirmations({None: since + 1})).snapshot is empty
    assert not guard.holding


def test_new_settings_keep_the_holds_and_their_clocks() -> None:
    clock = Clock()
    guard = Guard(GuardSettings(hold=30.0), clock)
    before, after = snapshot_from(catalog(10)), snapshot_from(catalog(2, 8))
    guard.admit(before, after, never)
    clock.now = 10.0

    longer = guard.with_settings(GuardSettings(hold=60.0))
    assert list(longer.holds) == ["web"]
    assert longer.release_at() == 60.0  # counted from the hold's start, not the reload

    relaxed = guard.with_settings(GuardSettings(max_removed_fraction=0.9))
    assert relaxed.admit(before, after, never).snapshot is after
    assert not relaxed.holding


def test_service_holds_wait_while_the_catalog_is_held() -> None:
    """An empty catalog applies nothing, so a service hold's time running out must not
    wake the loop (a release time in the past would make it spin)."""
    clock = Clock()
    guard = Guard(GuardSettings(hold=30.0), clock)
    before = two(service(10), service(10, first=100))
    guard.admit(before, two(service(2, 8), service(10, first=100)), never)
    assert guard.release_at() == 30.0
    guard.admit(before, snapshot_from({}), never)
    assert guard.catalog_hold is not None
    clock.now = 100.0
    assert guard.release_at() is None
    assert not guard.may_end(never)


def test_status_document_of_a_hold() -> None:
    clock = Clock()
    guard = Guard(GuardSettings(hold=30.0), clock)
    guard.admit(snapshot_from(catalog(10)), snapshot_from(catalog(2, 8)), never)
    document = guard.holds["web"].document(30.0)
    assert document["removed"] == 8
    assert document["needs_confirmation"] is False
    assert document["release_at"] == guard.holds["web"].since_wall + 30.0


# --- the confirm files -----------------------------------------------------------------------


def test_confirm_one_service_touches_its_own_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert confirmed_at(state, "web") == 0.0

    path = confirm_held(state, "web")

    assert path == state / CONFIRM_DIR / "web"
    assert (state / CONFIRM_DIR).stat().st_mode & 0o077 == 0
    assert confirmed_at(state, "web") == path.stat().st_mtime > 0.0
    assert confirmed_at(state, "api") == 0.0
    assert confirmed_at(state) == 0.0  # confirming one service is not confirming all


@pytest.mark.parametrize("name", ["../confirm", "Web", "", "a/b", ".hidden", "x\n"])
def test_confirm_refuses_a_name_that_is_not_a_service_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="not a service name"):
        confirm_held(tmp_path / "state", name)
    assert not (tmp_path / "state" / CONFIRM_DIR).exists()


def test_confirm_refuses_a_symlinked_confirm_dir(tmp_path: Path) -> None:
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    state.mkdir()
    elsewhere.mkdir()
    (state / CONFIRM_DIR).symlink_to(elsewhere)

    with pytest.raises(StageError, match="symlink"):
        confirm_held(state, "web")

    assert list(elsewhere.iterdir()) == []
    (elsewhere / "web").touch()
    assert confirmed_at(state, "web") == 0.0  # a symlinked confirm.d counts for nothing
