"""Level-triggered reconciliation: the retry backoff, the live-file comparison, and the
daemon retrying a failed round and repairing a hand-edited file without an etcd change."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lbsync import metrics
from lbsync.catalog import Catalog
from lbsync.errors import DriverError
from lbsync.health import Health
from lbsync.model import KeyValue, Snapshot
from lbsync.outcome import Outcome
from lbsync.pipeline import TargetPipeline
from lbsync.reconcile import FILE_EDITED, LB_RESTARTED, Backoff, Fingerprint, LiveFiles
from lbsync.render import Renderer
from lbsync.testing import FakeDriver, FakeSource
from tests.harness.net import wait_for
from tests.unit.test_daemon import P, Running, content, first_round_applied, make_settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- Backoff ----------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_within_its_jitter() -> None:
    clock = Clock()
    highest = Backoff(1.0, 8.0, clock, rng=lambda: 0.999999)
    lowest = Backoff(1.0, 8.0, clock, rng=lambda: 0.0)
    ceilings = [1, 2, 4, 8, 8, 8]
    assert [round(highest.failed(), 3) for _ in ceilings] == ceilings
    assert [lowest.failed() for _ in ceilings] == [c / 2 for c in ceilings]


def test_backoff_is_due_after_its_delay_and_reset_clears_it() -> None:
    clock = Clock()
    backoff = Backoff(2.0, 60.0, clock, rng=lambda: 0.5)
    assert not backoff.due()
    assert backoff.due_in() is None
    delay = backoff.failed()
    assert delay == 1.5
    assert not backoff.due()
    assert backoff.due_in() == 1.5
    clock.now += 1.5
    assert backoff.due()
    backoff.failed()
    assert backoff.failures == 2
    backoff.reset()
    assert backoff.failures == 0
    assert not backoff.due()
    assert backoff.due_in() is None
    assert backoff.failed() == 1.5  # from the start again


def test_backoff_maximum_below_initial_is_the_initial() -> None:
    backoff = Backoff(5.0, 1.0, Clock(), rng=lambda: 1.0)
    assert backoff.failed() == 5.0
    assert backoff.failed() == 5.0


# --- LiveFiles ----------------------------------------------------------------------------


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "out.conf"
    path.write_bytes(b"ours\n")
    return path


def test_nothing_moved_is_no_drift_and_reads_no_bytes(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=(1, 1))

    def no_read(*_a: object, **_k: object) -> bytes:
        raise AssertionError("read bytes though the fingerprint did not move")

    monkeypatch.setattr("lbsync.stage.swap.current_bytes", no_read)
    assert live.drift((1, 1)) is None
    assert live.drift(None) is None


def test_an_edited_file_is_drift(dest: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=None)
    dest.write_bytes(b"someone else's\n")
    assert live.edited() == [dest]
    assert live.drift(None) == FILE_EDITED


def test_an_edit_of_the_same_size_and_mtime_is_seen_by_inode(dest: Path, tmp_path: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=None)
    before = os.stat(dest)
    other = tmp_path / "other"
    other.write_bytes(b"yours")  # same size
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, dest)
    assert live.drift(None) == FILE_EDITED


def test_a_touched_file_with_our_bytes_is_no_drift_and_is_fingerprinted_again(dest: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=None)
    os.utime(dest, ns=(1, 1))
    assert live.drift(None) is None
    assert Fingerprint.of(dest, follow_symlinks=False) is not None
    assert live.drift(None) is None


def test_a_deleted_file_is_drift(dest: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=None)
    dest.unlink()
    assert live.drift(None) == FILE_EDITED


def test_a_symlink_put_in_place_is_drift(dest: Path, tmp_path: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"ours\n")
    dest.unlink()
    dest.symlink_to(elsewhere)
    assert live.drift(None) == FILE_EDITED


def test_lb_restarted_on_other_files_vs_on_ours(dest: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=(10, 1))
    assert live.drift((11, 5)) is None  # restarted on our very files: in step
    dest.write_bytes(b"old\n")
    assert live.drift((12, 9)) == LB_RESTARTED
    live.record({dest: b"ours\n"}, identity=(12, 9))
    dest.write_bytes(b"hand edit\n")
    assert live.drift((12, 9)) == FILE_EDITED


def test_forget_means_nothing_to_compare(dest: Path) -> None:
    live = LiveFiles()
    live.record({dest: b"ours\n"}, identity=None)
    live.forget()
    dest.write_bytes(b"changed\n")
    assert not live.known
    assert live.drift(None) is None


# --- the daemon ---------------------------------------------------------------------------


FAST = {"interval": "0.2s", "retry_initial": "0.05s", "retry_max": "0.2s"}


@pytest.fixture
def fast(tmp_path: Path, source: FakeSource, driver: FakeDriver) -> Iterator[Running]:
    run = Running(make_settings(tmp_path, reconcile=FAST), source, driver)
    yield run
    run.stop()


def test_a_failed_round_is_retried_without_an_etcd_change(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    driver.fail_validate = True
    with capture_logs() as events:
        run = Running(make_settings(tmp_path, reconcile=FAST), source, driver)
        try:
            wait_for(lambda: driver.calls.count("validate") >= 3, what="three attempts")
            assert content(out) is None
            failing = run.daemon.health.failing_since
            wait_for(lambda: "lb" in failing, what="failing target noted")
            ok, reason = run.daemon.ready()
            assert ok
            assert "lb since" in reason
            assert run.daemon.status_document()["targets"]["lb"]["failing_since"] is not None  # type: ignore[index]
            driver.fail_validate = False  # e.g. the missing include file appeared
            wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="applied by a retry")
            wait_for(lambda: "lb" not in failing, what="failure cleared")
            assert run.daemon.ready() == (True, "")
        finally:
            run.stop()
    failed = [e for e in events if e["event"] == "apply.failed"]
    assert len(failed) >= 3
    assert [e["log_level"] for e in failed].count("error") == 1  # once per distinct error


def test_a_hand_edited_file_is_repaired_and_logged_once(
    fast: Running, driver: FakeDriver, out: Path
) -> None:
    series = metrics.enable()  # recording from the start
    first_round_applied(fast)
    # Nothing pending, so only the comparison (not a round) can put the file back; and an
    # edit of another size, so it shows even within the file system's timestamp tick.
    wait_for(lambda: fast.daemon.scheduler.due_in() is None, what="no round pending")
    before = series.drift_repaired.labels("lb", FILE_EDITED)._value.get()
    with capture_logs() as events:
        out.write_text("web: 10.9.9.99:80\n")
        wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="repaired")
        wait_for(lambda: driver.reloads == 2, what="repair reloaded")
        # logged once the round is over, verify included (settle's fsyncs come before it)
        wait_for(lambda: any(e["event"] == "drift.repaired" for e in events), what="drift.repaired")
    repaired = [e for e in events if e["event"] == "drift.repaired"]
    assert len(repaired) == 1
    assert repaired[0]["kind"] == FILE_EDITED
    assert repaired[0]["files"] == [str(out)]
    assert series.drift_repaired.labels("lb", FILE_EDITED)._value.get() == before + 1
    assert driver.calls[-4:] == ["validate", "runtime", "reload", "verify"]


def test_an_idle_target_is_compared_without_a_check_write_or_reload(
    fast: Running, driver: FakeDriver, out: Path
) -> None:
    first_round_applied(fast)
    mtime = out.stat().st_mtime_ns
    calls = len(driver.calls)
    start = fast.daemon._reconcile_at
    wait_for(lambda: fast.daemon._reconcile_at > start + 0.3, what="two comparisons")
    assert len(driver.calls) == calls
    assert out.stat().st_mtime_ns == mtime


def test_an_etcd_change_resets_the_backoff(
    tmp_path: Path, source: FakeSource, driver: FakeDriver
) -> None:
    slow = {"interval": "1h", "retry_initial": "1h", "retry_max": "1h"}
    driver.fail_validate = True
    run = Running(make_settings(tmp_path, reconcile=slow), source, driver)
    try:
        retry = run.daemon._retry
        wait_for(lambda: retry.failures == 1, what="first failure")
        source.put(f"{P}/services/web/instances/b", "10.0.0.2:80")
        wait_for(lambda: driver.calls.count("validate") == 2, what="the change's round")
        wait_for(lambda: retry.failures == 1, what="backoff started over")
    finally:
        run.stop()


# --- runtime state ------------------------------------------------------------------------


class RuntimeDriver(FakeDriver):
    """Reports runtime drift as told: True (corrected), or fails to correct it."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime_drift: bool | DriverError = False

    def repair_runtime(self, applied: Snapshot | None) -> bool:
        self.calls.append("repair_runtime")
        if isinstance(self.runtime_drift, DriverError):
            raise self.runtime_drift
        found, self.runtime_drift = self.runtime_drift, False
        return found


def pipeline_for(tmp_path: Path, driver: FakeDriver) -> TargetPipeline:
    settings = make_settings(tmp_path)
    return TargetPipeline(settings.targets[0], driver, Renderer(), settings.state_dir)


def snapshot() -> Snapshot:
    catalog = Catalog(P)
    catalog.load(
        [KeyValue(key=f"{P}/services/web/instances/a", value=b"10.0.0.1:80", mod_revision=1)], 1
    )
    return catalog.snapshot()


def test_runtime_repair_needs_a_good_round_first(tmp_path: Path) -> None:
    driver = RuntimeDriver()
    driver.runtime_drift = True
    pipeline = pipeline_for(tmp_path, driver)
    assert pipeline.repair_runtime() is None
    assert "repair_runtime" not in driver.calls


def test_runtime_drift_corrected_at_runtime_is_a_runtime_outcome(tmp_path: Path) -> None:
    driver = RuntimeDriver()
    pipeline = pipeline_for(tmp_path, driver)
    assert pipeline.apply(snapshot()).ok
    assert pipeline.repair_runtime() is None  # nothing differs
    driver.runtime_drift = True
    outcome = pipeline.repair_runtime()
    assert outcome is not None
    assert outcome.action == "runtime"
    assert driver.reloads == 1  # the first round's only


def test_runtime_drift_that_cannot_be_corrected_reloads_our_files(tmp_path: Path) -> None:
    driver = RuntimeDriver()
    pipeline = pipeline_for(tmp_path, driver)
    assert pipeline.apply(snapshot()).ok
    driver.runtime_drift = DriverError("slot pool differs", target="lb")
    outcome = pipeline.repair_runtime()
    assert outcome is not None
    assert outcome.action == "reloaded"
    assert driver.calls[-3:] == ["repair_runtime", "reload", "verify"]
    driver.fail_reload = True
    failed = pipeline.repair_runtime()
    assert failed is not None
    assert failed.action == "failed"


def test_health_keeps_the_first_failure_time_and_forgets_removed_targets() -> None:
    health = Health(connected=True, synced=True)
    failed = Outcome("a", 3, "failed", error=DriverError("down", target="a"))
    health.note_outcome(failed, 1000.0)
    health.note_outcome(failed, 2000.0)
    health.note_outcome(Outcome("b", 3, "failed", error=DriverError("down", target="b")), 3000.0)
    assert health.failing_since == {"a": 1000.0, "b": 3000.0}
    ok, reason = health.ready(0.0, 300.0)
    assert ok
    assert "a since 1970-01-01T00:16:40Z" in reason
    health.note_outcome(Outcome("a", 4, "reloaded"), 4000.0)
    assert health.failing_since == {"b": 3000.0}
    health.forget_targets_except({"a"})
    assert health.failing_since == {}
    assert set(health.outcomes) == {"a"}


def test_a_failing_target_under_a_guard_hold_is_retried_on_the_backoff_not_in_a_spin(
    tmp_path: Path, source: FakeSource, driver: FakeDriver
) -> None:
    driver.fail_validate = True
    run = Running(make_settings(tmp_path, reconcile=FAST), source, driver)
    try:
        daemon = run.daemon
        retry = daemon._retry
        wait_for(lambda: retry.failures >= 1, what="first failure")
        source.delete(f"{P}/services/web/instances/a")  # empty catalog: held until confirmed
        wait_for(lambda: daemon.guard.catalog_hold is not None, what="the guard holds")
        rounds = [0]
        inner = daemon.run_round

        def counted() -> list[Outcome]:
            rounds[0] += 1
            return inner()

        daemon.run_round = counted  # type: ignore[method-assign]
        failures = retry.failures
        wait_for(lambda: retry.failures >= failures + 3, what="three more tries on the backoff")
        assert rounds[0] <= retry.failures - failures + 1
    finally:
        run.stop()
