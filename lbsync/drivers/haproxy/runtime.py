"""HAProxy runtime updates: the plan for a membership-only change and its admin-socket
commands, read back until HAProxy holds what the new config says."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import lbsync.drivers.haproxy.admin_commands as cmd
from lbsync.drivers.haproxy.master import Cli
from lbsync.drivers.haproxy.slots import AdminState, Assigned, Want, changed_slots
from lbsync.drivers.haproxy.state import (
    FDRAIN,
    FMAINT,
    RuntimeServer,
    host_matches,
    parse_ip,
    servers_state,
    state_row,
)
from lbsync.drivers.membership import meta_changed
from lbsync.errors import DriverError
from lbsync.model import Service

MAX_CLI_LINE = 8000  # bytes of ";"-joined commands sent in one admin-socket session
_PRIORITY: dict[AdminState, int] = {"ready": 0, "drain": 1, "maint": 2}


class Decline(Exception):
    """runtime_update cannot apply this change; the reason goes into the log event."""


@dataclass
class Plan:
    """One backend of a runtime update: its new slots, the slots the runtime holds (None:
    unknown, compare with HAProxy's state), the indexes of the slots to change, the
    target they belong to (named by the errors of refused commands) and, when the caller
    read it already, HAProxy's ``show servers state`` answer to compare with first."""

    backend: str
    after: Assigned
    base: Assigned | None
    touched: list[int] | None
    target: str
    answer: str | None = None


class BackendState:
    """``show servers state <backend>``, read lazily: HAProxy lists a backend's servers in
    config order, so slot ``s<N>`` is normally line N and only that line is parsed."""

    def __init__(self, backend: str, answer: str) -> None:
        self.backend = backend
        lines = answer.split("\n")
        start = next((n for n, ln in enumerate(lines) if ln.startswith("# be_id")), None)
        self.header = lines[start][1:].split() if start is not None else []
        self.rows = lines[start + 1 :] if start is not None else []
        while self.rows and not self.rows[-1]:
            self.rows.pop()
        self._by_name: dict[str, RuntimeServer] | None = None

    @property
    def count(self) -> int:
        return len(self.rows)

    def server(self, idx: int, name: str) -> RuntimeServer:
        if idx < len(self.rows):
            found = state_row(self.header, self.rows[idx])
            if found is not None and found.name == name and found.backend == self.backend:
                return found
        if self._by_name is None:
            text = "\n".join(["# " + " ".join(self.header), *self.rows])
            self._by_name = {s.name: s for s in servers_state(text)}
        found = self._by_name.get(name)
        if found is None:
            raise Decline(f"{self.backend}/{name}: not in the running HAProxy")
        return found


def corrections(plan: Plan, state: BackendState, indexes: list[int]) -> list[tuple[int, str]]:
    """Commands taking each of these slots from what HAProxy reports to what it should be."""
    out = []
    for idx in indexes:
        slot = plan.after.slots[idx]
        want = Want.of(slot)
        server = ServerCommands(plan.backend, slot.name, plan.target)
        commands = server_commands(server, state.server(idx, slot.name), want)
        out.append((_PRIORITY[want.admin], "; ".join(commands)))
    return out


def transition(plan: Plan, idx: int) -> tuple[int, str]:
    """Commands taking slot ``idx`` from what the runtime was set to hold to the new want.

    Conservative where HAProxy's representation depends on history (a draining server is
    weight 0 after a reload but ``state drain`` after a runtime change): leaving drain
    always sets the weight. The read-back catches anything else.
    """
    assert plan.base is not None
    slot = plan.after.slots[idx]
    server = ServerCommands(plan.backend, slot.name, plan.target)
    was, want = Want.of(plan.base.slots[idx]), Want.of(slot)
    commands = []
    if want.admin == "maint" and was.admin != "maint":
        commands.append(server.state("maint"))
    if (was.host, was.port) != (want.host, want.port):
        commands.append(server.addr(want.host, want.port))
    if want.admin != "drain" and (was.admin == "drain" or was.weight != want.weight):
        commands.append(server.weight(want.weight))
    if want.admin == "ready" and was.admin != "ready":
        commands.append(server.state("ready"))
    if want.admin == "drain" and was.admin != "drain":
        commands.append(server.state("drain"))
    return _PRIORITY[want.admin], "; ".join(commands)


def server_commands(server: ServerCommands, have: RuntimeServer, want: Want) -> list[str]:
    """CLI commands taking one server from ``have`` to ``want``."""
    commands = []
    if want.admin == "maint" and have.admin != "maint":
        commands.append(server.state("maint"))
    if have.port != want.port or not host_matches(have, want.host):
        commands.append(server.addr(want.host, want.port))
    if want.admin != "drain" and have.uweight != want.weight:
        commands.append(server.weight(want.weight))
    forced = have.admin_bits & (FMAINT | FDRAIN)
    if want.admin == "ready" and (forced or have.uweight == 0):
        commands.append(server.state("ready"))
    if want.admin == "drain" and have.admin != "drain":
        commands.append(server.state("drain"))
    return commands


class ServerCommands(NamedTuple):
    """One server's admin-socket commands, each built by ``admin_commands`` (which refuses
    any argument outside its grammar with DriverError, so nothing is sent)."""

    backend: str
    name: str
    target: str

    def state(self, state: AdminState) -> str:
        return cmd.set_server_state(self.backend, self.name, state, target=self.target)

    def addr(self, host: str, port: int) -> str:
        if parse_ip(host) is None:
            key = f"{self.backend}/{self.name}"
            raise Decline(f"{key}: {host!r} is a hostname; the runtime API needs an IP")
        return cmd.set_server_addr(self.backend, self.name, host, port, target=self.target)

    def weight(self, weight: int) -> str:
        return cmd.set_weight(self.backend, self.name, weight, target=self.target)


def batches(commands: Iterable[str]) -> Iterator[str]:
    """Join commands with ";" into lines of at most MAX_CLI_LINE bytes (one session each)."""
    line = ""
    for command in commands:
        if line and len(line) + len(command) + 2 > MAX_CLI_LINE:
            yield line
            line = ""
        line = f"{line}; {command}" if line else command
    if line:
        yield line


def same_service(a: Service, b: Service) -> bool:
    return a is b or a == b


def backend_plan(
    name: str, base: Assigned | None, after: Assigned, old: Service, new: Service, *, target: str
) -> Plan:
    """The plan for one backend: the slots whose wanted state moved (all of them, compared
    with HAProxy's state, when ``base`` is unknown); Decline if meta or the pool changed."""
    if base is None:  # compare the whole backend with HAProxy's state
        why = meta_changed(old, new)
        if why:
            raise Decline(f"{name}: {why}")
        return Plan(name, after, None, None, target)
    touched = changed_slots(base, after)
    if touched is None:
        grown = len(after.slots) > len(base.slots)
        why = "slots exhausted" if grown else "the slot pool differs"
        raise Decline(f"{name}: {why} (runtime {len(base.slots)}, rendered {len(after.slots)})")
    moved = []
    for idx in touched:
        was, now = base.slots[idx].instance, after.slots[idx].instance
        if was is not None and now is not None and was.id == now.id and was.meta != now.meta:
            raise Decline(f"{name}: instance {now.id}: meta changed")
        if Want.of(base.slots[idx]) != Want.of(after.slots[idx]):
            moved.append(idx)
    return Plan(name, after, base, moved, target)


def apply_plans(admin: Cli, plans: list[Plan]) -> int:
    """Send the commands, read the touched slots back; one correction, then give up."""
    batch: list[tuple[int, str]] = []
    try:
        for plan in plans:
            if plan.base is None:
                state = read_backend_state(admin, plan, plan.answer)
                plan.touched = [
                    idx
                    for idx, slot in enumerate(plan.after.slots)
                    if not state.server(idx, slot.name).matches(Want.of(slot))
                ]
                batch += corrections(plan, state, plan.touched)
            else:
                assert plan.touched is not None
                batch += [transition(plan, idx) for idx in plan.touched]
        sent = 0
        for _attempt in range(2):
            for line in batches(cmd for _, cmd in sorted(batch, key=lambda c: c[0])):
                admin.query(line)
            sent += len(batch)
            batch = []
            for plan in plans:
                if plan.touched:
                    state = read_backend_state(admin, plan)
                    wrong = [
                        idx
                        for idx in plan.touched
                        if not state.server(idx, plan.after.slots[idx].name).matches(
                            Want.of(plan.after.slots[idx])
                        )
                    ]
                    batch += corrections(plan, state, wrong)
            if not batch:
                return sent
    except DriverError as err:
        raise Decline(f"admin socket: {err}") from err
    raise Decline("the runtime state did not converge")


def read_backend_state(admin: Cli, plan: Plan, answer: str | None = None) -> BackendState:
    """``show servers state <backend>`` (read now unless ``answer`` holds it); Decline
    unless it has exactly our slots."""
    if answer is None:
        answer = admin.query(cmd.show_servers_state(plan.backend, target=plan.target))
    state = BackendState(plan.backend, answer)
    if state.count != len(plan.after.slots):
        if not state.count:
            raise Decline(f"{plan.backend}: not in the running HAProxy")
        grown = len(plan.after.slots) > state.count
        why = "slots exhausted" if grown else "the slot pool differs"
        raise Decline(
            f"{plan.backend}: {why} (runtime {state.count}, rendered {len(plan.after.slots)})"
        )
    return state
