from lbsync.config import WaitSettings
from lbsync.scheduler import Scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(min_: float = 0.05, max_: float = 1.0, interval: float = 0.0) -> tuple[Scheduler, Clock]:
    clock = Clock()
    return Scheduler(WaitSettings(min=min_, max=max_, min_interval=interval), clock), clock


def test_nothing_pending_means_no_round() -> None:
    sched, _ = make()
    assert sched.due_in() is None
    assert not sched.is_due()


def test_round_waits_for_quiescence() -> None:
    sched, clock = make()
    sched.changed()
    assert not sched.is_due()
    clock.now += 0.04
    sched.changed()  # still changing: the quiet period restarts
    clock.now += 0.04
    assert not sched.is_due()
    clock.now += 0.011
    assert sched.is_due()


def test_continuous_changes_are_capped_by_max() -> None:
    sched, clock = make(min_=0.05, max_=1.0)
    rounds = 0
    for _ in range(1000):  # one change every 10 ms for 10 s: never quiet
        sched.changed()
        clock.now += 0.01
        if sched.is_due():
            rounds += 1
            sched.round_done()
    assert 9 <= rounds <= 10


def test_burst_of_1000_in_one_second_gives_at_most_two_rounds() -> None:
    sched, clock = make(min_=0.05, max_=1.0)
    rounds = 0
    for _ in range(1000):
        sched.changed()
        clock.now += 0.00099
        if sched.is_due():
            rounds += 1
            sched.round_done()
    for _ in range(200):  # then quiet: the final round happens
        clock.now += 0.01
        if sched.is_due():
            rounds += 1
            sched.round_done()
    assert 1 <= rounds <= 2
    assert not sched.pending


def test_min_interval_spaces_rounds() -> None:
    sched, clock = make(min_=0.0, max_=0.0, interval=2.0)
    sched.changed()
    assert sched.is_due()
    sched.round_done()
    clock.now += 0.5
    sched.changed()
    assert sched.due_in() == 1.5
    clock.now += 1.5
    assert sched.is_due()


def test_zero_wait_is_due_immediately() -> None:
    sched, _ = make(min_=0.0, max_=0.0)
    sched.changed()
    assert sched.is_due()
