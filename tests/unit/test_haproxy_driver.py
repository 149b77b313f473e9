"""The HAProxy driver's pure parts: slots, parsing, state sanitizing, runtime decisions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import structlog.testing

from lbsync.config import HaproxyTarget, TemplateSettings
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.drivers.haproxy.master import parse_show_proc
from lbsync.drivers.haproxy.runtime import (
    BackendState,
    Plan,
    ServerCommands,
    server_commands,
    transition,
)
from lbsync.drivers.haproxy.slots import (
    BLOCK,
    Assigned,
    Slot,
    SlotTable,
    Want,
    changed_slots,
    pool_size,
    slots_cap,
)
from lbsync.drivers.haproxy.state import (
    RuntimeServer,
    config_servers,
    sanitize_state,
    servers_state,
    state_columns,
)
from lbsync.errors import ValidationFailed
from lbsync.model import Instance, Service, Snapshot, State
from lbsync.render import Renderer
from lbsync.stage.tree import StagedConfig

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "haproxy" / "haproxy.cfg.j2"
HEADER = (
    "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
    "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
    "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr "
    "srv_agent_addr srv_agent_port\n"
)


def state_line(srv: str, addr: str, port: int, admin: int, uweight: int, iweight: int = 1) -> str:
    return (
        f"2 web 1 {srv} {addr} 2 {admin} {uweight} {iweight} 5 1 0 0 8 0 0 0 - {port} - 0 0 - - 0"
    )


def inst(name: str, port: int = 8000, state: str = "up", weight: int = 1, **kw: object) -> Instance:
    fields: dict[str, object] = {
        "id": name,
        "host": "10.0.0.1",
        "port": port,
        "weight": weight,
        "state": State(state),
    }
    fields.update(kw)
    return Instance.model_validate(fields)


def svc(name: str, *instances: Instance, **settings: object) -> Service:
    return Service.model_validate(
        {"name": name, "instances": sorted(instances, key=lambda i: i.id), "settings": settings}
    )


def snap(revision: int, *services: Service, keys: dict[str, str] | None = None) -> Snapshot:
    return Snapshot(revision=revision, services={s.name: s for s in services}, keys=keys or {})


def target(tmp_path: Path, **overrides: object) -> HaproxyTarget:
    fields: dict[str, object] = {
        "name": "h",
        "driver": "haproxy",
        "templates": [TemplateSettings(src=TEMPLATE, dest=tmp_path / "haproxy.cfg")],
        "config": tmp_path / "haproxy.cfg",
        "admin_socket": tmp_path / "admin.sock",
        "state_file": tmp_path / "state",
    }
    fields.update(overrides)
    return HaproxyTarget.model_validate(fields)


def render(driver: HaproxyDriver, snapshot: Snapshot) -> str:
    """As the pipeline renders: lbsync's Renderer (with ``{% cache %}``), the driver's extras."""
    return RENDERER.render(TEMPLATE, snapshot, driver.template_context(snapshot)).decode()


RENDERER = Renderer()


def holders(slots: tuple[Slot, ...]) -> dict[str, str]:
    return {s.name: s.instance.id for s in slots if s.instance is not None}


# --- pools and slots ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instances", "configured", "size"),
    [(0, None, 16), (8, None, 16), (9, None, 32), (1000, None, 2000), (100, None, 208),
     (3, 4, 4), (4, 4, 4), (5, 4, 16), (40, 4, 80)],
)  # fmt: skip
def test_pool_size(instances: int, configured: int | None, size: int) -> None:
    assert pool_size(instances, configured) == size


def test_an_instance_keeps_its_slot_and_newcomers_take_the_first_free_one() -> None:
    table = SlotTable()
    assert holders(table.assign(svc("web", inst("a"), inst("b"), inst("c")), None)) == {
        "s1": "a",
        "s2": "b",
        "s3": "c",
    }
    assert holders(table.assign(svc("web", inst("a"), inst("c")), None)) == {"s1": "a", "s3": "c"}
    after = table.assign(svc("web", inst("a"), inst("c"), inst("e"), inst("d")), None)
    assert holders(after) == {"s1": "a", "s2": "d", "s3": "c", "s4": "e"}
    assert table.assign(svc("web", inst("a"), inst("c"), inst("e"), inst("d")), None) == after


def test_a_pool_grows_without_moving_anyone() -> None:
    table = SlotTable()
    assert len(table.assign(svc("web", *(inst(f"i{n:02d}") for n in range(8))), None)) == 16
    first = table.assign(svc("web", *(inst(f"i{n:02d}") for n in range(16))), None)
    grown = table.assign(svc("web", *(inst(f"i{n:02d}") for n in range(17))), None)
    assert len(first) == 16  # filled up, not grown
    assert len(grown) == 48
    assert holders(grown) == holders(first) | {"s17": "i16"}
    smaller = table.assign(svc("web", inst("i00")), None)
    assert len(smaller) == 48  # never shrinks by itself


def test_the_slots_setting_sizes_the_pool_and_a_forgotten_service_starts_over() -> None:
    table = SlotTable()
    assert len(table.assign(svc("web", inst("a")), 4)) == 4
    assert len(table.assign(svc("web", inst("a")), 8)) == 8
    table.assign(svc("web", inst("a"), inst("b")), 8)
    table.forget_except([])
    assert holders(table.assign(svc("web", inst("b")), None)) == {"s1": "b"}


def test_incremental_assignment_is_the_rule_and_reuses_what_did_not_change() -> None:
    """Random churn: every assignment equals the documented rule (keep your slot, newcomers
    in id order take the lowest free ones, grow when full), the blocks are the slots, and
    a slot or block whose content did not change is the very same object as before."""
    rng = random.Random(7)
    table = SlotTable()
    held: dict[str, int] = {}
    size = 0
    members = {f"i{n:03d}": inst(f"i{n:03d}", weight=1) for n in range(300)}
    before = None
    for _step in range(60):
        for iid in rng.sample(sorted(members), 3):
            del members[iid]
        for _ in range(rng.choice([0, 3, 6])):
            iid = f"i{rng.randrange(10_000):04d}"
            members[iid] = inst(iid)
        for iid in rng.sample(sorted(members), 2):
            members[iid] = inst(iid, weight=rng.randrange(1, 5), state=rng.choice(["up", "drain"]))
        service = svc("web", *members.values())
        after = table.assigned(service, None)

        held = {i: s for i, s in held.items() if i in members}
        if len(members) > size:
            size = pool_size(len(members), None)
        free = sorted(set(range(size)) - set(held.values()))
        for iid in sorted(members):
            if iid not in held:
                held[iid] = free.pop(0)
        assert holders(after.slots) == {f"s{s + 1}": i for i, s in held.items()}
        assert all(s.instance is None or s.instance == members[s.instance.id] for s in after.slots)
        assert tuple(s for block in after.blocks for s in block) == after.slots
        if before is not None and len(before.slots) == len(after.slots):
            for old, new in zip(before.slots, after.slots, strict=True):
                assert (old is new) == (old == new)
            for old_block, new_block in zip(before.blocks, after.blocks, strict=True):
                assert (old_block is new_block) == (old_block == new_block)
        before = after


def test_a_change_to_one_instance_touches_one_slot_and_one_block() -> None:
    table = SlotTable()
    members = [inst(f"i{n:04d}") for n in range(1000)]
    first = table.assigned(svc("web", *members), None)
    members[600] = inst("i0600", weight=7)
    second = table.assigned(svc("web", *members), None)
    assert len(first.blocks) == 2000 // BLOCK + 1
    pairs = zip(first.blocks, second.blocks, strict=True)
    assert [n for n, (a, b) in enumerate(pairs) if a is not b] == [600 // BLOCK]
    assert changed_slots(first, second) == [600]
    grown = table.assigned(svc("web", *members, *(inst(f"j{n:04d}") for n in range(1001))), None)
    assert changed_slots(second, grown) is None  # the pool grew: not a runtime change


def test_slot_rendering_values() -> None:
    assert (Slot("s1").address, Slot("s1").weight, Slot("s1").disabled) == ("127.0.0.1:1", 1, True)
    draining = Slot("s2", inst("a", weight=5, state="drain"))
    assert (draining.address, draining.weight, draining.disabled) == ("10.0.0.1:8000", 0, False)
    down = Slot("s3", inst("a", weight=5, state="down"))
    assert (down.weight, down.disabled) == (5, True)
    assert Slot("s4", inst("a", weight=999)).weight == 256
    assert Slot("s5", inst("a b")).id is None  # not safe in a comment marker
    name, instance = Slot("s6", inst("x"))
    assert (name, instance and instance.id) == ("s6", "x")


def test_a_restarted_driver_renders_the_same_bytes(tmp_path: Path) -> None:
    first = HaproxyDriver(target(tmp_path))
    churn = [
        snap(1, svc("web", inst("a"), inst("b"), inst("c"), inst("d"))),
        snap(2, svc("web", inst("a"), inst("d"))),
        snap(3, svc("web", inst("a"), inst("d"), inst("e", state="drain"), inst("z"))),
    ]
    for snapshot in churn:
        text = render(first, snapshot)
    (tmp_path / "haproxy.cfg").write_text(text)
    assert "s2 10.0.0.1:8000 id 2 weight 0  # lbsync-id=e" in text  # e took b's old slot

    restarted = HaproxyDriver(target(tmp_path))
    assert render(restarted, churn[-1]) == text


def test_template_settings_are_checked(tmp_path: Path) -> None:
    driver = HaproxyDriver(target(tmp_path))
    snapshot = snap(
        1,
        svc("a", listen=8080, balance="least_conn"),
        svc("b", listen="127.0.0.1:9090", balance="ip_hash"),
        svc("c", listen="0.0.0.0:1 ssl crt /x", balance="roundrobin; evil", slots="lots"),
        svc("d", listen="[::1]:7070", slots=4),
    )
    with structlog.testing.capture_logs() as events:
        context = driver.template_context(snapshot)
    assert context["bind"] == {"a": ":8080", "b": "127.0.0.1:9090", "d": "[::1]:7070"}
    assert context["balance"] == {
        "a": "leastconn",
        "b": "source",
        "c": "roundrobin",
        "d": "roundrobin",
    }
    assert {e["setting"] for e in events} == {"listen", "balance", "slots"}
    assert [len(context["slots"][n]) for n in "abcd"] == [16, 16, 16, 4]


# --- parsing -----------------------------------------------------------------------------


def test_config_servers_reads_slots_and_markers() -> None:
    text = (
        "global\n    nbthread 1\nbackend web\n    balance roundrobin\n"
        "    server s1 10.0.0.1:80 weight 3  # lbsync-id=a\n"
        "    server s2 [::1]:81 weight 0\n"
        "    server s3 127.0.0.1:1 disabled\n"
        "frontend web\n    bind :80\n"
        "peers p\n    server other 10.9.9.9:1024\n"
    )
    servers = config_servers(text)
    assert list(servers) == ["web"]
    web = servers["web"]
    assert web["s1"].want == Want("10.0.0.1", 80, 3, "ready")
    assert web["s1"].instance_id == "a"
    assert web["s2"].want == Want("::1", 81, 0, "drain")
    assert web["s3"].want == Want("127.0.0.1", 1, 1, "maint")


def test_show_proc_after_a_failed_reload() -> None:
    text = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>\n"
        "4016            master          3 [failed: 1]   0d00h02m42s     2.6.12-1+deb12u4\n"
        "# workers\n"
        "4516            worker          1               0d00h00m28s     2.6.12-1+deb12u4\n"
        "# programs\n\n"
    )
    proc = parse_show_proc(text)
    assert (proc.master_pid, proc.reloads, proc.failed) == (4016, 3, 1)
    assert proc.pids == (4516,)
    assert proc.current == ()  # no worker of the latest generation
    with pytest.raises(ValueError, match="no master line"):
        parse_show_proc("Unknown command.\n")


# --- the server-state file ---------------------------------------------------------------

CONFIG = (
    "backend web\n"
    "    server s1 10.0.0.1:8000 weight 1  # lbsync-id=a\n"
    "    server s2 127.0.0.1:1 disabled\n"
    "    server s3 10.0.0.3:8003 weight 0  # lbsync-id=c\n"
    "    server s4 10.0.0.4:8004 weight 2 disabled  # lbsync-id=d\n"
)


def test_state_lines_that_agree_with_the_config_are_kept() -> None:
    dump = HEADER + "\n".join(
        [
            state_line("s1", "10.0.0.1", 8000, 0, 1),
            state_line("s2", "127.0.0.1", 1, 5, 1),  # loaded disabled, still maint
            state_line("s3", "10.0.0.3", 8003, 8, 4, 4),  # set drain at runtime
            state_line("s4", "10.0.0.4", 8004, 1, 2),
        ]
    )
    text, kept, dropped = sanitize_state(dump + "\n\n", CONFIG)
    assert (kept, dropped) == (4, 0)
    assert text.startswith(HEADER)
    assert len(servers_state(text)) == 4


def test_state_lines_that_would_override_the_config_are_dropped() -> None:
    dump = HEADER + "\n".join(
        [
            state_line("s1", "10.0.0.1", 9999, 0, 1),  # old port: HAProxy would keep it
            state_line("s2", "10.0.0.2", 8002, 4, 1),  # freed slot, ready at runtime
            state_line("s3", "10.0.0.3", 8003, 0, 4),  # ready, config says drain
            state_line("s4", "10.0.0.4", 8004, 0, 2),  # ready, config says down
            state_line("s9", "10.0.0.9", 8009, 0, 1),  # not in the config
        ]
    )
    text, kept, dropped = sanitize_state(dump, CONFIG)
    assert (kept, dropped) == (0, 5)
    assert text == HEADER


def test_no_dump_at_all_gives_a_valid_empty_state_file() -> None:
    assert sanitize_state("", CONFIG) == ("1\n", 0, 0)


# --- runtime commands and decisions ------------------------------------------------------


def runtime(admin: int, addr: str = "127.0.0.1", port: int = 1, uweight: int = 1) -> RuntimeServer:
    return RuntimeServer("web", "s1", addr, "-", port, admin, uweight)


def test_commands_take_a_slot_in_and_out_of_service() -> None:
    key = ServerCommands("web", "s1", "lb")
    up = Want("10.0.0.1", 8000, 3, "ready")
    assert server_commands(key, runtime(5), up) == [
        "set server web/s1 addr 10.0.0.1 port 8000",
        "set weight web/s1 3",
        "set server web/s1 state ready",
    ]
    serving = runtime(4, "10.0.0.1", 8000, 3)
    assert serving.matches(up)
    free = Want("127.0.0.1", 1, 1, "maint")
    assert server_commands(key, serving, free) == [
        "set server web/s1 state maint",
        "set server web/s1 addr 127.0.0.1 port 1",
        "set weight web/s1 1",
    ]
    drain = Want("10.0.0.1", 8000, 3, "drain")
    assert server_commands(key, serving, drain) == ["set server web/s1 state drain"]
    assert runtime(8, "10.0.0.1", 8000, 3).matches(drain)
    assert server_commands(key, runtime(8, "10.0.0.1", 8000, 3), up) == [
        "set server web/s1 state ready"
    ]


def test_transitions_from_what_the_runtime_was_set_to() -> None:
    up = Slot("s1", inst("a", weight=3))
    draining = Slot("s1", inst("a", weight=3, state="drain"))
    moved = Slot("s1", inst("a", port=9000, weight=3))
    free = Slot("s1")

    def commands_between(before: Slot, after: Slot) -> list[str]:
        base, now = (Assigned((s,), ((s,),)) for s in (before, after))
        return transition(Plan("web", now, base, [0], "lb"), 0)[1].split("; ")

    assert commands_between(free, up) == [
        "set server web/s1 addr 10.0.0.1 port 8000",
        "set weight web/s1 3",
        "set server web/s1 state ready",
    ]
    assert commands_between(up, draining) == ["set server web/s1 state drain"]
    # Leaving drain always sets the weight: after a reload a draining server is weight 0.
    assert commands_between(draining, up) == [
        "set weight web/s1 3",
        "set server web/s1 state ready",
    ]
    assert commands_between(up, moved) == ["set server web/s1 addr 10.0.0.1 port 9000"]
    assert commands_between(up, free) == [
        "set server web/s1 state maint",
        "set server web/s1 addr 127.0.0.1 port 1",
        "set weight web/s1 1",
    ]


def test_backend_state_reads_the_slot_line_and_copes_with_another_order() -> None:
    lines = [state_line(f"s{n}", "10.0.0.1", 8000 + n, 0, 1) for n in (1, 2, 3)]
    state = BackendState("web", HEADER + "\n".join(lines) + "\n\n")
    assert state.count == 3
    assert state.server(1, "s2").port == 8002
    shuffled = BackendState("web", HEADER + "\n".join(reversed(lines)) + "\n")
    assert shuffled.server(0, "s1").port == 8001
    assert shuffled.server(2, "s3").port == 8003


def test_state_columns_are_what_a_server_is_in_row_order() -> None:
    lines = [state_line("s1", "10.0.0.1", 8001, 0, 1), state_line("s2", "10.0.0.2", 8002, 1, 3)]
    columns = state_columns((HEADER + "\n".join(lines) + "\n\n").encode())
    assert columns is not None
    assert columns[0] == HEADER.split("\n")[1][2:].encode()
    assert columns[1:] == (
        b"web\nweb",
        b"s1\ns2",
        b"10.0.0.1\n10.0.0.2",
        b"-\n-",
        b"8001\n8002",
        b"0\n1",
        b"1\n3",
    )
    # the time since the last change moves every second; it is not compared
    later = state_columns(
        (HEADER + "\n".join(ln.replace(" 5 1 0 ", " 9 1 0 ") for ln in lines)).encode()
    )
    assert later == columns
    drained = state_columns(
        (HEADER + "\n".join([lines[0], state_line("s2", "10.0.0.2", 8002, 8, 3)])).encode()
    )
    assert drained is not None
    assert drained != columns


def test_state_columns_of_an_answer_read_in_pieces_are_those_of_the_whole() -> None:
    lines = [state_line(f"s{n}", f"10.0.{n // 250}.{n % 250}", 8000 + n, 0, 1) for n in range(3000)]
    answer = (HEADER + "\n".join(lines) + "\n").encode()
    assert len(answer) > 3 * 65536  # several pieces
    columns = state_columns(answer)
    assert columns is not None
    assert columns[2] == "\n".join(f"s{n}" for n in range(3000)).encode()
    assert columns[5] == "\n".join(str(8000 + n) for n in range(3000)).encode()
    ragged = [*lines[:2000], lines[2000] + " extra", *lines[2001:]]
    assert state_columns((HEADER + "\n".join(ragged) + "\n").encode()) is None


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "Unknown command\n",
        HEADER + state_line("s1", "10.0.0.1", 8001, 0, 1) + " extra\n",  # a ragged row
        HEADER.replace("srv_uweight", "srv_weight") + state_line("s1", "10.0.0.1", 8001, 0, 1),
    ],
)
def test_state_columns_of_an_irregular_answer_are_none(answer: str) -> None:
    assert state_columns(answer.encode()) is None


def test_runtime_update_declines_what_it_cannot_do(tmp_path: Path) -> None:
    driver = HaproxyDriver(target(tmp_path))
    base = snap(1, svc("web", inst("a")))
    cases = {
        "no applied snapshot": (None, snap(2, svc("web", inst("a"), inst("b")))),
        "a backend appeared": (base, snap(2, svc("web", inst("a")), svc("api"))),
        "settings changed": (base, snap(2, svc("web", inst("a"), balance="leastconn"))),
        "meta changed": (base, snap(2, svc("web", inst("a", meta={"zone": "b"})))),
        "no membership change": (base, snap(2, svc("web", inst("a")))),
        "keys outside": (base, snap(2, svc("web", inst("a")), keys={"/global/x": "1"})),
        "admin socket": (base, snap(2, svc("web", inst("a"), inst("b")))),  # nobody listens
    }
    for reason, (old, new) in cases.items():
        with structlog.testing.capture_logs() as events:
            assert driver.runtime_update(old, new) is False
        assert reason in events[-1]["reason"], (reason, events)

    off = HaproxyDriver(target(tmp_path, runtime=False))
    assert off.runtime_update(base, snap(2, svc("web", inst("a"), inst("b")))) is False


def test_membership_keys_do_not_count_as_other_keys(tmp_path: Path) -> None:
    driver = HaproxyDriver(target(tmp_path))
    old = snap(1, svc("web", inst("a")), keys={"/services/web/instances/a": "x"})
    new = snap(
        2,
        svc("web", inst("a"), inst("b")),
        keys={"/services/web/instances/a": "x", "/services/web/health/b": "down"},
    )
    with structlog.testing.capture_logs() as events:
        driver.runtime_update(old, new)
    assert "admin socket" in events[-1]["reason"]  # got as far as talking to HAProxy


def test_validate_needs_a_staged_main(tmp_path: Path) -> None:
    driver = HaproxyDriver(target(tmp_path))
    with pytest.raises(ValidationFailed, match="no main config"):
        driver.validate(StagedConfig(root=tmp_path, main=None, files={}))


@pytest.mark.parametrize(
    ("instances", "cap"), [(0, 256), (4, 256), (64, 256), (65, 512), (300, 2048)]
)
def test_slots_cap_is_a_power_of_two_over_four_per_instance(instances: int, cap: int) -> None:
    assert slots_cap(instances) == cap


def test_a_slots_setting_cannot_multiply_the_config(tmp_path: Path) -> None:
    """Issue 17: four small keys asked for 100,000 slots each (a 19.5 MB config)."""
    driver = HaproxyDriver(target(tmp_path))
    few = [inst(f"i{n}", port=8000 + n) for n in range(4)]
    snapshot = snap(1, svc("big", *few, slots=4096), svc("fit", *few, slots=100))
    with structlog.testing.capture_logs() as events:
        context = driver.template_context(snapshot)
    assert [len(context["slots"][n]) for n in ("big", "fit")] == [256, 100]
    assert [(e["service"], e["outcome"]) for e in events] == [("big", "capped at 256")]
