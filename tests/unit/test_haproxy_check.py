"""What a HAProxy reconcile tick reads: backend summaries, the check rotation's bound, and
the admin-socket client's time bound on a slow or silent peer."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync.drivers.haproxy.check import CheckRotation, ask_all, backend_summaries
from lbsync.drivers.haproxy.master import Cli
from lbsync.errors import DriverError

STAT_HEADER = (
    b"# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,"
    b"wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg\n"
)


def stat_row(name: str, weight: int, act: int, scur: int = 0, lastchg: int = 5) -> bytes:
    row = f"{name},BACKEND,0,0,{scur},0,1,0,0,0,0,0,,0,0,0,0,UP,{weight},{act},0,,0,{lastchg}\n"
    return row.encode()


def test_summaries_are_weight_and_server_counts_per_backend() -> None:
    answer = STAT_HEADER + stat_row("web", 10, 10) + stat_row("api", 3, 2) + b"\n"
    assert backend_summaries(answer) == {"web": (b"10", b"10", b"0"), "api": (b"3", b"2", b"0")}


def test_traffic_and_time_alone_do_not_move_a_summary() -> None:
    before = backend_summaries(STAT_HEADER + stat_row("web", 10, 10, scur=0, lastchg=5))
    after = backend_summaries(STAT_HEADER + stat_row("web", 10, 10, scur=7, lastchg=60))
    assert before == after
    maint = backend_summaries(STAT_HEADER + stat_row("web", 9, 9))
    assert maint != before


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"Unknown command.\n\n",
        STAT_HEADER.replace(b",act,", b",active,") + stat_row("w", 1, 1),
    ],
)
def test_an_answer_without_the_columns_has_no_summaries(answer: bytes) -> None:
    assert backend_summaries(answer) is None


def test_the_rotation_saves_up_for_a_backend_bigger_than_the_budget() -> None:
    rotation = CheckRotation(1024)
    ticks = [rotation.due(["big"], {"big": 4096}) for _ in range(8)]
    assert ticks == [[], [], [], ["big"], [], [], [], ["big"]]
    assert rotation.cycle_ticks(4096) == 4


def test_small_backends_share_a_tick_and_all_fit_in_one_when_they_can() -> None:
    rotation = CheckRotation(400)
    names = ["a", "b", "c", "d"]
    sizes = dict.fromkeys(names, 200)
    assert [rotation.due(names, sizes) for _ in range(4)] == [
        ["a", "b"],
        ["c", "d"],
        ["a", "b"],
        ["c", "d"],
    ]
    everything = CheckRotation(10_000)
    assert [everything.due(names, sizes) for _ in range(3)] == [names] * 3


@settings(deadline=None)  # up to ~2,000 ticks an example: no deadline on a shared host
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=12),
    budget=st.integers(100, 3000),
)
def test_every_backend_is_read_within_the_cycle(sizes: list[int], budget: int) -> None:
    names = [f"b{n}" for n in range(len(sizes))]
    slots = dict(zip(names, sizes, strict=True))
    rotation = CheckRotation(budget)
    bound = rotation.cycle_ticks(sum(sizes))
    last_read = dict.fromkeys(names, 0)  # tick 0: as if all were read just before
    for tick in range(1, 3 * bound + 2):
        for name in rotation.due(names, slots):
            last_read[name] = tick
        assert all(tick - last <= bound for last in last_read.values()), (tick, last_read)


# --- the admin-socket client's time bound ---------------------------------------------


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A unix socket whose one client gets the given chunks, 50 ms apart, then silence;
    the connection is closed (the answer complete) only after 10 s."""
    path = tmp_path / "admin.sock"
    chunks: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for chunk in chunks:
                if done.wait(0.05):
                    return
                conn.sendall(chunk)
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, chunks
    finally:
        done.set()
        server.close()
        thread.join(timeout=10)


@pytest.mark.parametrize("chunks", [0, 200], ids=["silent", "trickling"])
def test_an_answer_that_never_ends_times_out_within_the_bound(
    peer: tuple[Path, list[bytes]], chunks: int
) -> None:
    path, to_send = peer
    to_send += [b"x"] * chunks  # 10 s of trickle, far past the timeout
    with pytest.raises(DriverError, match="no complete answer in time"):
        Cli(path, target="t", timeout=0.5).query("show servers state")


# --- several commands in one session ---------------------------------------------------


class FakeCli:
    """Answers each ``;``-joined command with its canned answer (HAProxy's framing: every
    answer ends with an empty line); records the lines sent."""

    def __init__(self, answers: dict[str, bytes], *, framing: bytes = b"\n") -> None:
        self.answers = answers
        self.framing = framing
        self.lines: list[str] = []

    def query_bytes(self, line: str) -> bytes:
        self.lines.append(line)
        return b"".join(self.answers[c.strip()] + self.framing for c in line.split(";"))


def test_answers_of_one_session_are_cut_at_the_empty_lines() -> None:
    cli = FakeCli({"a": b"1\nrow a\n", "b": b"Can't find backend.\n", "c": b"1\nrow c\n"})
    answers = ask_all(cli, ["a", "b", "c"], target="t")  # type: ignore[arg-type]
    assert cli.lines == ["a; b; c"]
    assert answers == [b"1\nrow a", b"Can't find backend.", b"1\nrow c"]
    alone = ask_all(cli, ["a"], target="t")  # type: ignore[arg-type]
    assert alone == [b"1\nrow a\n\n"]  # as read: its consumers ignore trailing blank lines


def test_an_answer_that_does_not_frame_as_expected_is_an_error() -> None:
    cli = FakeCli({"a": b"1\nrow a\n", "b": b"1\n\nrow b\n"})
    with pytest.raises(DriverError, match="2 command"):
        ask_all(cli, ["a", "b"], target="t")  # type: ignore[arg-type]
    with pytest.raises(DriverError, match="1 command"):
        ask_all(cli, ["b"], target="t")  # type: ignore[arg-type]
    unframed = FakeCli({"a": b"1\nrow a\n"}, framing=b"")
    with pytest.raises(DriverError, match="1 command"):
        ask_all(unframed, ["a"], target="t")  # type: ignore[arg-type]
