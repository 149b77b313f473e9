"""The daemon's failure semantics, end to end through real files with a fake etcd and LB."""

import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync import memory, saved_catalog, state_lock
from lbsync.cli import main as cli
from lbsync.config import Settings
from lbsync.config_file import settings_from_dict
from lbsync.daemon import Daemon, etcd_source
from lbsync.errors import RenderError
from lbsync.render import Renderer
from lbsync.source.runner import SourceRunner
from lbsync.state_dir import prepare_state_dir
from lbsync.testing import FakeDriver, FakeSource
from tests.harness.net import wait_for

P = "/lbsync"
# trim_blocks eats the newline after a block tag, hence the blank line.
TEMPLATE = """{% for s in services.values() %}
{{ s.name }}:{% for i in s.up %} {{ i.address }}{% endfor %}

{% endfor %}
"""


def make_settings(
    tmp_path: Path, reconcile: dict[str, object] | None = None, **wait: object
) -> Settings:
    (tmp_path / "t.j2").write_text(TEMPLATE)
    data = {
        "wait": {"min": "0s", "max": "0s", **wait},
        # no retry or drift repair behind these tests' backs unless they ask for it
        "reconcile": reconcile or {"interval": "1h", "retry_initial": "1h", "retry_max": "1h"},
        "state_dir": str(tmp_path / "state"),
        "target": [
            {
                "name": "lb",
                "driver": "command",
                "reload_command": ["true"],
                "template": [{"src": str(tmp_path / "t.j2"), "dest": str(tmp_path / "out.conf")}],
            }
        ],
    }
    return settings_from_dict(data, base_dir=tmp_path, source="test.toml")


class Running:
    def __init__(self, settings: Settings, source: FakeSource, driver: FakeDriver) -> None:
        self.daemon = Daemon(
            settings, source_factory=lambda _s: source, driver_factory=lambda _t: driver
        )
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.flags.stop = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def running(tmp_path: Path, source: FakeSource, driver: FakeDriver) -> Iterator[Running]:
    run = Running(make_settings(tmp_path), source, driver)
    yield run
    run.stop()


def first_round_applied(run: Running) -> None:
    """Wait for the first round's outcome, not just its reload: verify comes after it."""
    outcomes = run.daemon.health.outcomes
    wait_for(lambda: "lb" in outcomes and outcomes["lb"].action == "reloaded", what="first round")


def content(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def test_first_sync_renders_validates_swaps_and_reloads_once(
    running: Running, driver: FakeDriver, out: Path
) -> None:
    wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="first render")
    first_round_applied(running)  # verify comes after the reload
    assert driver.reloads == 1
    assert driver.calls[:4] == ["validate", "runtime", "reload", "verify"]


def test_instance_up_and_down_follow_etcd(
    running: Running, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    first_round_applied(running)
    source.put(f"{P}/services/web/instances/b", "10.0.0.2:80")
    wait_for(lambda: content(out) == "web: 10.0.0.1:80 10.0.0.2:80\n", what="b added")
    source.put(f"{P}/services/web/health/a", "down")
    wait_for(lambda: content(out) == "web: 10.0.0.2:80\n", what="a marked down")
    source.delete(f"{P}/services/web/instances/b")
    wait_for(lambda: content(out) == "web:\n", what="b deleted")
    wait_for(lambda: driver.reloads == 4, what="4 reloads")


def test_unchanged_render_writes_nothing_and_reloads_nothing(
    running: Running, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    first_round_applied(running)
    mtime = out.stat().st_mtime_ns
    source.put(f"{P}/unrelated/key", "x")
    source.put(f"{P}/services/web/instances/b", "10.0.0.2:80")  # marker that rounds ran
    wait_for(lambda: driver.reloads == 2, what="second reload")
    source.put(f"{P}/unrelated/key", "y")
    source.put(f"{P}/services/web/health/zz", "down")  # a health mark for no instance
    wait_for(lambda: running.daemon.catalog.revision == source.revision, what="caught up")
    wait_for(lambda: not running.daemon.scheduler.pending, what="round done")
    wait_for(lambda: driver.reloads == 2, what="2 reloads")
    assert out.stat().st_mtime_ns != mtime  # the second round did write


def test_unreachable_etcd_at_start_renders_nothing(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    out.write_text("operator's file\n")
    source.available = False
    run = Running(make_settings(tmp_path), source, driver)
    try:
        wait_for(lambda: run.daemon.health.disconnected_since is not None, what="not connected")
        assert content(out) == "operator's file\n"
        assert driver.calls == []
        source.available = True
        wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="render after recovery")
    finally:
        run.stop()


def test_validation_failure_changes_nothing_and_retries_on_next_change(
    running: Running, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    first_round_applied(running)
    driver.fail_validate = True
    source.put(f"{P}/services/web/instances/b", "10.0.0.2:80")
    outcomes = running.daemon.health.outcomes
    wait_for(lambda: outcomes["lb"].action == "failed", what="refused check")
    assert content(out) == "web: 10.0.0.1:80\n"
    driver.fail_validate = False
    source.put(f"{P}/services/web/instances/c", "10.0.0.3:80")
    wait_for(lambda: content(out) == "web: 10.0.0.1:80 10.0.0.2:80 10.0.0.3:80\n", what="retry")
    # the file is in place before its reload: wait for the round's outcome
    wait_for(lambda: outcomes["lb"].action == "reloaded", what="the retry applied")
    assert driver.reloads == 2


def test_template_error_changes_nothing(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    settings = make_settings(tmp_path)
    (tmp_path / "t.j2").write_text("{{ getv('/required') }}\n")
    run = Running(settings, source, driver)
    try:
        wait_for(lambda: "lb" in run.daemon.health.outcomes, what="a round")
        assert run.daemon.health.outcomes["lb"].action == "failed"
        assert "t.j2:1" in str(run.daemon.health.outcomes["lb"].error)
        assert not out.exists()
        assert driver.calls == []
        source.put(f"{P}/required", "now-present")
        wait_for(lambda: content(out) == "now-present\n", what="render once key exists")
    finally:
        run.stop()


def test_failed_verify_restores_last_known_good_and_reloads_again(
    running: Running, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    first_round_applied(running)
    driver.fail_verify = True
    source.put(f"{P}/services/web/instances/b", "10.0.0.2:80")
    outcomes = running.daemon.health.outcomes
    wait_for(lambda: outcomes["lb"].action == "rolled_back", what="rollback")
    assert driver.reloads == 3  # the failed one and the one that loads last-known-good
    assert content(out) == "web: 10.0.0.1:80\n"


def test_runtime_update_skips_the_reload_but_writes_files(
    tmp_path: Path, source: FakeSource, out: Path
) -> None:
    driver = FakeDriver(runtime=True)
    run = Running(make_settings(tmp_path), source, driver)
    try:
        first_round_applied(run)
        source.put(f"{P}/services/web/instances/b", "10.0.0.2:80")
        outcomes = run.daemon.health.outcomes
        wait_for(lambda: outcomes["lb"].action == "runtime", what="runtime apply")
        assert content(out) == "web: 10.0.0.1:80 10.0.0.2:80\n"
        assert driver.reloads == 1
    finally:
        run.stop()


def test_burst_of_1000_changes_ends_in_at_most_two_reloads(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    run = Running(make_settings(tmp_path, min="50ms", max="1s"), source, driver)
    try:
        first_round_applied(run)
        for n in range(1000):
            source.put(
                f"{P}/services/burst/instances/i{n:04d}", f"10.1.{n // 250}.{n % 250 + 1}:80"
            )
        wait_for(lambda: (content(out) or "").count("10.1.") == 1000, what="all 1000 rendered")
        assert driver.reloads - 1 <= 2
    finally:
        run.stop()


def test_sighup_with_broken_config_keeps_the_old_one(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    config = tmp_path / "lbsync.toml"
    config.write_text("[wait\n")
    daemon = Daemon(
        make_settings(tmp_path),
        source_factory=lambda _s: source,
        driver_factory=lambda _t: driver,
        config_path=config,
    )
    before = daemon.settings
    daemon.reconfigure()
    assert daemon.settings is before


def test_sighup_rereads_templates(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    settings = make_settings(tmp_path)
    config = tmp_path / "lbsync.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[wait]\nmin = "0s"\nmax = "0s"\n'
        '[[target]]\nname = "lb"\ndriver = "command"\nreload_command = ["true"]\n'
        f'[[target.template]]\nsrc = "t2.j2"\ndest = "{out}"\n'
    )
    (tmp_path / "t2.j2").write_text("v2 {{ services | length }}\n")
    run = Running(settings, source, driver)
    run.daemon.config_path = config
    try:
        wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="first render")
        run.daemon.flags.reconfigure = True
        wait_for(lambda: content(out) == "v2 1\n", what="re-render with the new template")
    finally:
        run.stop()


def guarded_settings(tmp_path: Path, **guard: object) -> Settings:
    settings = make_settings(tmp_path)
    return settings.model_copy(update={"guard": settings.guard.model_copy(update=guard)})


def many(n: int) -> FakeSource:
    return FakeSource(
        {"services": {"web": {"instances": {f"i{k}": f"10.0.0.{k + 1}:80" for k in range(n)}}}}
    )


def test_guard_holds_a_mass_removal_until_confirmed(tmp_path: Path, out: Path) -> None:
    source, driver = many(6), FakeDriver()
    run = Running(guarded_settings(tmp_path, hold=3600.0), source, driver)
    try:
        wait_for(lambda: (content(out) or "").count("10.0.0.") == 6, what="six served")
        source.delete(*(f"{P}/services/web/instances/i{k}" for k in range(4)))
        wait_for(lambda: "web" in run.daemon.guard.holds, what="hold")
        assert "4 of 6" in run.daemon.guard.holds["web"].verdict.reason
        assert (content(out) or "").count("10.0.0.") == 6
        assert driver.reloads == 1
        config = tmp_path / "lbsync.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n[[target]]\nname = "lb"\ndriver = "command"\n'
            f'reload_command = ["true"]\n[[target.template]]\nsrc = "t.j2"\ndest = "{out}"\n'
        )
        assert cli(["confirm", "-c", str(config)]) == 0
        wait_for(lambda: content(out) == "web: 10.0.0.5:80 10.0.0.6:80\n", what="applied")
        assert not run.daemon.guard.holding
    finally:
        run.stop()


def test_guard_holds_one_service_while_another_changes_and_confirms_it_alone(
    tmp_path: Path, out: Path
) -> None:
    web = {f"i{k}": f"10.0.0.{k + 1}:80" for k in range(6)}
    source = FakeSource({"services": {"web": {"instances": web}}})
    run = Running(guarded_settings(tmp_path, hold=3600.0), source, FakeDriver())
    try:
        wait_for(lambda: (content(out) or "").count("10.0.0.") == 6, what="six served")
        source.delete(*(f"{P}/services/web/instances/i{k}" for k in range(4)))
        wait_for(lambda: "web" in run.daemon.guard.holds, what="web held")
        source.put(f"{P}/services/api/instances/a", "10.0.1.1:80")
        wait_for(lambda: "api: 10.0.1.1:80" in (content(out) or ""), what="api applied")
        assert (content(out) or "").count("10.0.0.") == 6  # web still at its admitted set

        config = tmp_path / "lbsync.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n[[target]]\nname = "lb"\ndriver = "command"\n'
            f'reload_command = ["true"]\n[[target.template]]\nsrc = "t.j2"\ndest = "{out}"\n'
        )
        assert cli(["confirm", "-c", str(config), "--service", "api"]) == 0  # not held: no-op
        assert cli(["confirm", "-c", str(config), "--service", "web"]) == 0
        wait_for(lambda: "web: 10.0.0.5:80 10.0.0.6:80\n" in (content(out) or ""), what="web")
        assert not run.daemon.guard.holding
    finally:
        run.stop()


def test_guard_releases_a_held_update_after_the_hold_time(tmp_path: Path, out: Path) -> None:
    source, driver = many(6), FakeDriver()
    run = Running(guarded_settings(tmp_path, hold=0.5), source, driver)
    try:
        wait_for(lambda: (content(out) or "").count("10.0.0.") == 6, what="six served")
        source.delete(*(f"{P}/services/web/instances/i{k}" for k in range(4)))
        wait_for(lambda: content(out) == "web: 10.0.0.5:80 10.0.0.6:80\n", what="released")
        wait_for(lambda: driver.reloads == 2, what="2 reloads")
    finally:
        run.stop()


def test_empty_prefix_never_empties_the_lb_without_confirmation(tmp_path: Path, out: Path) -> None:
    source, driver = many(3), FakeDriver()
    run = Running(guarded_settings(tmp_path, hold=0.1, max_removed_fraction=1.0), source, driver)
    try:
        wait_for(lambda: (content(out) or "").count("10.0.0.") == 3, what="three served")
        for k in range(3):
            source.delete(f"{P}/services/web/instances/i{k}")
        wait_for(lambda: run.daemon.guard.catalog_hold is not None, what="hold")
        assert run.daemon.guard.catalog_hold.verdict.needs_confirmation
        source.put(f"{P}/unrelated", "tick")  # more rounds, well past the hold time
        wait_for(lambda: run.daemon.catalog.revision == source.revision, what="caught up")
        assert (content(out) or "").count("10.0.0.") == 3
    finally:
        run.stop()


def test_restart_while_etcd_is_down_starts_from_the_saved_catalog(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    settings = make_settings(tmp_path)
    first = Running(settings, source, driver)
    wait_for(lambda: content(out) == "web: 10.0.0.1:80\n", what="first render")
    first.stop()  # saves the last applied catalog on the way out
    assert (tmp_path / "state" / "last-applied.json").exists()

    down = FakeSource()
    down.available = False
    restarted_driver = FakeDriver()
    mtime = out.stat().st_mtime_ns
    second = Running(settings, down, restarted_driver)
    try:
        wait_for(lambda: "lb" in second.daemon.health.outcomes, what="a round from the saved state")
        assert second.daemon.health.outcomes["lb"].action == "unchanged"
        assert out.stat().st_mtime_ns == mtime  # files that already match are not rewritten
        assert restarted_driver.reloads == 0
        assert second.daemon.health.staleness(time.monotonic()) > 0
    finally:
        second.stop()


def test_sighup_with_unreadable_etcd_files_keeps_the_old_config(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, out: Path
) -> None:
    config = tmp_path / "lbsync.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[etcd]\nendpoints = ["https://127.0.0.1:2379"]\n'
        f'ca_file = "{tmp_path / "missing-ca.pem"}"\n'
        '[[target]]\nname = "lb"\ndriver = "command"\nreload_command = ["true"]\n'
        f'[[target.template]]\nsrc = "t.j2"\ndest = "{out}"\n'
    )
    daemon = Daemon(
        make_settings(tmp_path),
        source_factory=etcd_source,
        driver_factory=lambda _t: driver,
        config_path=config,
    )
    before = daemon.settings
    daemon.reconfigure()
    assert daemon.settings is before


def test_settle_memory_freezes_what_is_loaded_and_trims_the_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    assert memory._find_malloc_trim() is not None, "glibc has malloc_trim"
    monkeypatch.setattr(memory, "_find_malloc_trim", lambda: lambda pad: trims.append(pad) or 1)
    before = gc.get_freeze_count()
    loaded = [[n] for n in range(1000)]

    memory.settle()

    assert gc.get_freeze_count() >= before + len(loaded)
    assert trims == [0]
    gc.unfreeze()


def test_a_full_load_settles_memory_after_its_round(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    reloads_at_settle: list[int] = []
    monkeypatch.setattr(memory, "settle", lambda: reloads_at_settle.append(driver.reloads))
    run = Running(make_settings(tmp_path), source, driver)
    try:
        first_round_applied(run)
        wait_for(lambda: reloads_at_settle, what="memory settled")
        assert reloads_at_settle == [1]  # once, and after the round's reload, not before
    finally:
        run.stop()


def test_templates_are_compiled_while_the_first_read_is_awaited(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[Path] = []
    load = Renderer.load
    monkeypatch.setattr(Renderer, "load", lambda self, src: loaded.append(src) or load(self, src))
    source.available = False  # no read comes: whatever is compiled, is compiled before it
    run = Running(make_settings(tmp_path), source, driver)
    try:
        wait_for(lambda: loaded, what="the template compiled")
        assert loaded == [tmp_path / "t.j2"]
        assert driver.calls == []
    finally:
        run.stop()


def test_a_template_that_does_not_compile_fails_the_round_not_the_start(
    tmp_path: Path, source: FakeSource, driver: FakeDriver
) -> None:
    settings = make_settings(tmp_path)
    (tmp_path / "t.j2").write_text("{% for s in services %}\n")  # no endfor
    run = Running(settings, source, driver)
    try:
        outcomes = run.daemon.health.outcomes
        wait_for(lambda: "lb" in outcomes, what="the first round")
        assert outcomes["lb"].action == "failed"
        assert isinstance(outcomes["lb"].error, RenderError)
        assert driver.reloads == 0
    finally:
        run.stop()


@pytest.fixture
def collector_on() -> Iterator[None]:
    """The cyclic collector as the test found it, whatever ``memory.hold`` did."""
    assert gc.isenabled()
    yield
    memory._HOLD.active = False
    gc.enable()


def test_hold_turns_the_collector_off_until_settle(
    collector_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_find_malloc_trim", lambda: None)
    memory.hold()
    assert not gc.isenabled()
    memory.settle()
    assert gc.isenabled()
    gc.unfreeze()


def test_settle_leaves_a_collector_it_did_not_turn_off_as_it_is(
    collector_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_find_malloc_trim", lambda: None)
    gc.disable()  # someone else's (an embedding application's) choice
    memory.hold()
    memory.settle()
    assert not gc.isenabled()
    gc.unfreeze()


def test_an_unreachable_etcd_does_not_keep_the_collector_off(
    tmp_path: Path, source: FakeSource, driver: FakeDriver, collector_on: None
) -> None:
    source.available = False
    settings = make_settings(tmp_path)
    settings = settings.model_copy(
        update={"etcd": settings.etcd.model_copy(update={"timeout": 0.2})}
    )
    memory.hold()
    run = Running(settings, source, driver)
    try:
        # no full load came within etcd.timeout and nothing is saved: the hold ends
        wait_for(gc.isenabled, what="the collector back on")
        assert driver.calls == []
    finally:
        run.stop()
        gc.unfreeze()


@pytest.mark.parametrize(
    ("now", "saved_at", "applied_at", "due"),
    [
        (104.0, 100.0, 90.0, False),  # saved 4 s ago: not yet
        (106.0, 100.0, 105.5, False),  # 6 s, but a change 0.5 s ago: wait for the pause
        (106.0, 100.0, 104.9, True),  # 6 s, and quiet for 1.1 s
        (129.0, 100.0, 128.9, False),  # changes keep coming: not before 30 s
        (130.0, 100.0, 129.9, True),  # ... but then, whatever
    ],
)
def test_the_catalog_is_saved_when_changes_pause_or_after_30_s(
    now: float, saved_at: float, applied_at: float, due: bool
) -> None:
    assert saved_catalog.save_due(now, saved_at, applied_at) is due


# --- waiting on events, not on ticks (issue 15: idle CPU) ----------------------------------


def test_wait_budget_is_the_earliest_deadline_and_capped_only_while_polling() -> None:
    from lbsync.wakeups import TICK, wait_budget

    assert wait_budget([None, 107.0, 103.0], now=100.0, polling=False) == 3.0
    assert wait_budget([None, 107.0, 103.0], now=100.0, polling=True) == TICK
    assert wait_budget([99.0], now=100.0, polling=False) == 0.0  # overdue: do not block
    assert wait_budget([None], now=100.0, polling=False) == float("inf")
    assert wait_budget([], now=100.0, polling=True) == TICK


def test_an_idle_daemon_sleeps_until_its_reconcile_deadline(
    running: Running, source: FakeSource
) -> None:
    first_round_applied(running)
    daemon = running.daemon
    # The round's catalog save is the one deadline before the reconcile's (1 h here).
    wait_for(lambda: daemon._saver.due_at() is None, what="the catalog saved", timeout=60)
    budget = daemon._wait_budget()
    assert 3000 < budget <= 3600  # the reconcile interval, not a 0.5 s tick
    wait_for(lambda: daemon.health.asleep_until > daemon.health.last_loop + 3000, what="asleep")
    assert daemon.healthy() == (True, "")  # asleep as planned is not stuck
    source.put(f"{P}/services/web/instances/b", {"host": "10.0.0.2", "port": 80})
    wait_for(
        lambda: (
            "10.0.0.2:80" in (content(running.daemon.pipelines[0].target.templates[0].dest) or "")
        ),
        what="a change wakes the sleeping loop",
    )


def test_a_stop_wakes_the_sleeping_loop(running: Running) -> None:
    first_round_applied(running)
    wait_for(lambda: running.daemon._saver.due_at() is None, what="saved", timeout=60)
    wait_for(
        lambda: running.daemon.health.asleep_until > running.daemon.health.last_loop + 3000,
        what="the loop asleep for the reconcile interval (1 h)",
    )
    running.stop()  # joins within 10 s: woken, not at the next deadline


def test_the_loop_polls_every_tick_while_the_guard_holds_or_a_driver_ticks(
    running: Running, driver: FakeDriver
) -> None:
    from lbsync.wakeups import TICK

    first_round_applied(running)
    daemon = running.daemon
    driver.ticks = True
    assert daemon._wait_budget() <= TICK
    driver.ticks = False
    assert daemon._wait_budget() > TICK


def test_the_savers_deadline_is_when_save_due_turns_true() -> None:
    clock = [100.0]
    saver = saved_catalog.Saver(lambda: clock[0])
    assert saver.due_at() is None  # nothing applied: nothing to save
    clock[0] = 101.0
    saver.applied()
    due = saver.due_at()
    assert due is not None
    assert saved_catalog.save_due(due, 100.0, 101.0)
    assert not saved_catalog.save_due(due - 0.01, 100.0, 101.0)


def test_a_signal_handler_wakes_the_runner_waiting_in_the_same_thread() -> None:
    import signal

    from lbsync.source.runner import SourceRunner

    runner = SourceRunner(FakeSource())  # not started: no message will ever come
    woke: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        woke.append(signum)
        runner.wake()  # as Daemon.wake does from SIGTERM/SIGHUP

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        assert list(runner.messages(60.0)) == []
        waited = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert woke == [signal.SIGALRM]
    assert waited < 30, "woken by the handler, not by the 60 s timeout"


def test_a_started_source_is_the_one_the_daemon_reads_and_stops(
    tmp_path: Path, driver: FakeDriver
) -> None:
    """``lbsync run`` takes the state directory's lock and starts the first read before
    it imports the daemon: the daemon reads that runner, starts no other, stops it when
    it stops, and leaves the lock to its caller."""
    settings = make_settings(tmp_path)
    prepare_state_dir(settings)
    runner = SourceRunner(FakeSource({"services": {"web": {"instances": {"a": "10.0.0.1:80"}}}}))
    runner.start()

    def no_second_source(_settings: Settings) -> FakeSource:
        raise AssertionError("the daemon started a source of its own")

    daemon = Daemon(
        settings,
        source_factory=no_second_source,
        driver_factory=lambda _t: driver,
        started_source=runner,
    )
    lock = state_lock.acquire(settings.state_dir, None)
    thread = threading.Thread(target=lambda: daemon.run(lock_held=True), daemon=True)
    thread.start()
    try:
        outcomes = daemon.health.outcomes
        wait_for(lambda: "lb" in outcomes and outcomes["lb"].action == "reloaded", what="round")
        daemon.flags.stop = True
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert not runner._thread.is_alive()  # stopped with the daemon
        assert state_lock.holder(settings.state_dir) is not None  # still the caller's
    finally:
        daemon.flags.stop = True
        lock.release()
