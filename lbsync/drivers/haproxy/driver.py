"""The HAProxy driver: validate, reload with master-worker confirmation, runtime updates."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from lbsync.config import HaproxyTarget
from lbsync.drivers.base import Driver, ReloadTicket, own_ticket, register_driver, run_checker
from lbsync.drivers.haproxy.admin_commands import show_servers_state
from lbsync.drivers.haproxy.check import (
    BACKEND_STATS,
    CheckRotation,
    Summary,
    ask_all,
    backend_summaries,
)
from lbsync.drivers.haproxy.master import (
    POLL_INTERVAL,
    SOCKET_TIMEOUT,
    Cli,
    Master,
    MasterState,
    start_time,
)
from lbsync.drivers.haproxy.runtime import (
    Decline,
    Plan,
    apply_plans,
    backend_plan,
    same_service,
)
from lbsync.drivers.haproxy.settings import ServiceSettings
from lbsync.drivers.haproxy.slots import Assigned, SlotTable
from lbsync.drivers.haproxy.state import (
    checkable_copy,
    config_servers,
    forget_server_state,
    save_server_state,
    slot_indexes,
    state_columns,
)
from lbsync.drivers.listen import check_listen, haproxy_listens
from lbsync.drivers.membership import other_keys_changed
from lbsync.errors import DriverError, ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.model import Snapshot
from lbsync.stage.tree import StagedConfig
from lbsync.structure import haproxy_line_shape

log = structlog.get_logger("lbsync.drivers.haproxy")

_RECENT = 4  # snapshots whose slots are remembered for runtime diffs


@dataclass(frozen=True)
class HaproxyTicket(ReloadTicket):
    before: MasterState


class InStep(NamedTuple):
    """A backend as ``repair_runtime`` read it: the slots it should hold, the
    ``state_columns`` of HAProxy's answer and its summary (``check.backend_summaries``;
    None when there was none). The same columns for the same slots are in step again
    without comparing server by server; a moved summary means reading it again."""

    slots: Assigned
    columns: tuple[bytes, ...] | None
    summary: Summary | None


@register_driver("haproxy")
class HaproxyDriver(Driver):
    """Drives one master-worker HAProxy (``haproxy -W -S <master.sock> -p <pid>``)."""

    target: HaproxyTarget

    def __init__(self, target: HaproxyTarget) -> None:
        super().__init__(target)
        self._slots = SlotTable()
        self._master = Master(target, self.name)
        self._seeded = False
        # Slots per backend for the last few snapshots rendered (identity-keyed): the base
        # a runtime update diffs against is the one rendered for the applied snapshot.
        self._recent: list[tuple[Snapshot, dict[str, Assigned]]] = []
        # Backends this driver changed over the admin socket since the last reload.
        self._runtime: dict[str, Assigned] = {}
        # Per backend, what ``repair_runtime`` last found in step (see ``InStep``).
        self._in_step: dict[str, InStep] = {}
        self._rotation = CheckRotation(target.runtime_check_slots)
        self._identity: tuple[int, float | None] | None = None  # the last ``lb_identity``
        self._settings = ServiceSettings(self.name)

    # -- template context ---------------------------------------------------------------

    def line_shape(self) -> Callable[[str], list[str]]:
        return haproxy_line_shape

    def template_context(self, snapshot: Snapshot) -> Mapping[str, Any]:
        """Slots, balance and bind per service, and the socket/state paths of the target.

        Idempotent for the same snapshot; the slot memory it updates is what
        ``runtime_update`` applies next. ``slot_blocks[name]`` holds the same slots in
        blocks that stay the same objects while unchanged (for ``{% cache %}``).
        """
        assigned = self._assign(snapshot)
        settings = {n: self._settings.balance_and_bind(s) for n, s in snapshot.services.items()}
        return {
            "slots": {n: a.slots for n, a in assigned.items()},
            "slot_blocks": {n: a.blocks for n, a in assigned.items()},
            "balance": {n: balance for n, (balance, _) in settings.items()},
            "bind": {n: bind for n, (_, bind) in settings.items() if bind is not None},
            "admin_socket": _str_or_none(self.target.admin_socket),
            "state_file": _str_or_none(self.target.state_file),
        }

    def _assign(self, snapshot: Snapshot) -> dict[str, Assigned]:
        if self._recent and self._recent[-1][0] is snapshot:
            return self._recent[-1][1]
        if not self._seeded:
            self._seed_from(self.target.config)
            self._seeded = True
        if not self._recent or self._recent[-1][0].services.keys() != snapshot.services.keys():
            self._slots.forget_except(snapshot.services)
            self._settings.forget_except(snapshot.services)
        assigned = {
            name: self._slots.assigned(service, self._settings.slots(service))
            for name, service in snapshot.services.items()
        }
        self._recent = [*self._recent[-(_RECENT - 1) :], (snapshot, assigned)]
        return assigned

    def _assigned_for(self, snapshot: Snapshot) -> dict[str, Assigned] | None:
        """The slots rendered for ``snapshot``, if it is one of the last few rendered."""
        return next((a for s, a in reversed(self._recent) if s is snapshot), None)

    def _seed_from(self, config: Path) -> None:
        """Take slot assignments from the live config, so a restarted lbsync renders the
        same bytes (no write, no reload) instead of re-packing every backend."""
        try:
            text = config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        for backend, servers in config_servers(text).items():
            indexes = slot_indexes(servers)
            if indexes is None:
                continue  # not a slot backend (hand-written, or a custom template)
            held = {c.instance_id: indexes[n] for n, c in servers.items() if c.instance_id}
            self._slots.seed(backend, max(indexes.values()) + 1, held)

    # -- validate -----------------------------------------------------------------------

    def validate(self, staged: StagedConfig) -> None:
        """``haproxy -c -dW`` on the staged main config, then the listen pre-check.

        No ``-q``: in 2.6 it also swallows the ``[ALERT]`` lines that say what is wrong
        (only the ``[NOTICE]`` banner is dropped from the report). The check never reads
        the live state file: a stale one turns into warnings, and ``-dW`` makes warnings
        fatal.
        """
        if staged.main is None:
            raise ValidationFailed("no main config was staged", command=[self.target.binary])
        with checkable_copy(staged.main) as checked:
            argv = [self.target.binary, "-c", "-dW", "-f", str(checked)]
            run_checker(
                argv,
                staged=staged,
                live_config=self.target.config,
                timeout=self.target.command_timeout,
                what="haproxy -c refused the new config",
                shown_argv=[*argv[:-1], str(self.target.config)],
                clean=lambda text: _without_notices(text).replace(str(checked), str(staged.main)),
            )
        self._check_new_listens(staged.main)

    def _check_new_listens(self, staged_main: Path) -> None:
        """Refuse a new ``bind`` address that another process holds (``haproxy -c`` can't
        see it, and a reload would then drop traffic for seconds)."""
        live = set(haproxy_listens(self.target.config))
        new = [a for a in dict.fromkeys(haproxy_listens(staged_main)) if a not in live]
        if new:
            log.info("haproxy.new_listens", target=self.name, addresses=[str(a) for a in new])
            check_listen(new, own_pids=self._master.own_pids(), target=self.name, reuseport=True)

    # -- reload + verify ----------------------------------------------------------------

    def reload(self) -> HaproxyTicket:
        """Save the server state (sanitized), then SIGUSR2 to the master.

        A master that answers on its socket but is not a local ``haproxy`` process (a
        sidecar without a shared PID namespace) gets the master CLI's ``reload`` instead:
        its pid means nothing here, and signalling it could hit an unrelated process.
        """
        started = time.monotonic()
        self._runtime.clear()  # from now on HAProxy holds what the config on disk says
        self._in_step.clear()  # and the next reconcile tick reads every backend again
        before = self._master.processes(ReloadFailed)
        saved = save_server_state(self.target, self._admin_or_none())
        how = "signal" if before.master_started is not None else "master_cli"
        try:
            if how == "signal":
                os.kill(before.master_pid, signal.SIGUSR2)
            else:
                self._master.cli().query("reload")  # 2.6 answers nothing, then closes
        except (OSError, DriverError) as exc:
            raise ReloadFailed(
                f"cannot reload the HAProxy master (pid {before.master_pid}, by {how}): "
                f"{getattr(exc, 'strerror', None) or exc}",
                target=self.name,
            ) from exc
        log.info("haproxy.reload", target=self.name, by=how, **asdict(before), state_file=saved)
        return HaproxyTicket(started_at=started, before=before)

    def verify(self, ticket: ReloadTicket) -> None:
        """Poll until a new worker generation serves, bounded by ``verify_timeout``.

        Fails at once if the master died or was replaced, or if ``show proc`` counts a
        failed load; otherwise at the deadline.
        """
        before = own_ticket(ticket, HaproxyTicket, self.name).before
        deadline = time.monotonic() + self.target.verify_timeout
        last = "no answer yet"
        while True:
            self._master.check_same(before)
            try:
                new = self._master.new_workers(before)
            except VerifyFailed:
                raise
            except DriverError as err:  # the master re-executes itself: retry
                new, last = None, str(err)
            if new:
                log.info(
                    "haproxy.verify",
                    target=self.name,
                    master_pid=before.master_pid,
                    workers=list(new),
                    ms=round((time.monotonic() - ticket.started_at) * 1000, 1),
                )
                return
            if time.monotonic() >= deadline:
                raise VerifyFailed(
                    f"no new HAProxy worker within {self.target.verify_timeout:g}s ({last})",
                    target=self.name,
                )
            time.sleep(POLL_INTERVAL)

    # -- runtime ------------------------------------------------------------------------

    def runtime_update(self, old: Snapshot | None, new: Snapshot) -> bool:
        """Apply a membership-only change over the admin socket; False = reload instead.

        What to send comes from the slots that changed between what the runtime holds
        (the slots rendered for ``old``, or what this driver last sent, since the last
        reload) and the slots for ``new``: a change costs the slots it touches, not the
        backend. Every touched slot is then read back from ``show servers state``; one
        that did not converge is corrected from what HAProxy actually reports, once, and
        the update is declined (→ reload, where the config wins) if it still disagrees.
        Without the slots for ``old`` (a restarted lbsync), whole backends are compared.
        """
        started = time.monotonic()
        try:
            plans = self._runtime_plans(old, new)
            sent = apply_plans(self._admin(), plans)
        except Decline as why:
            log.info("haproxy.runtime_update", target=self.name, applied=False, reason=str(why))
            return False
        for plan in plans:
            self._runtime[plan.backend] = plan.after
        forget_server_state(self.target)
        log.info(
            "haproxy.runtime_update",
            target=self.name,
            applied=True,
            backends=[p.backend for p in plans],
            slots=sum(len(p.touched or ()) for p in plans),
            commands=sent,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        return True

    def lb_identity(self) -> tuple[int, float | None] | None:
        """The master's pid and start time (``show proc``, or the pid file). A reload
        re-executes the same master process, so only a restart changes it. A local
        master still alive with the start time seen last is the same one: one ``/proc``
        read instead of a ``show proc`` on every reconcile tick."""
        known = self._identity
        if known is not None and known[1] is not None and start_time(known[0]) == known[1]:
            return known
        try:
            state = self._master.processes(DriverError)
        except DriverError:
            self._identity = None
            return None
        self._identity = (state.master_pid, state.master_started)
        return self._identity

    def repair_runtime(self, applied: Snapshot | None) -> bool:
        """Runtime mode: put back what someone changed over the admin socket (``set server
        … state maint``) or what HAProxy lost, for the reconcile comparison.

        Every tick reads the backends' summaries (``check.py``); a backend is read in full
        with ``show servers state`` when its summary moved since it was found in step, when
        it was never found in step for the slots it should hold, or in its turn of the
        ``CheckRotation`` (``runtime_check_slots`` a tick). A backend whose answer has
        the same ``state_columns`` as the last one found in step for the same slots is in
        step (no server-by-server comparison); any other is compared with the slots
        rendered for it (or last sent), and the servers that differ are corrected and read
        back, as a runtime update without a known base does. True = something differed
        and was corrected; DriverError when it could not be (the caller reloads: the
        config on disk is ours and wins).
        """
        if not self.target.runtime or self.target.admin_socket is None or applied is None:
            return False
        rendered = self._assigned_for(applied)
        if rendered is None:
            return False  # not rendered lately: nothing to compare with
        admin = self._admin()
        due = self._rotation.due(list(rendered), {n: len(a.slots) for n, a in rendered.items()})
        stats, answers = self._ask_due(admin, due, sum(len(rendered[n].slots) for n in due))
        summaries = backend_summaries(stats)
        answered = dict(zip(due, answers, strict=True))
        others = [n for n in self._suspects(rendered, summaries) if n not in answered]
        more = ask_all(admin, self._show(others), target=self.name)
        answered.update(zip(others, more, strict=True))
        plans, read = [], {}
        for name, answer in answered.items():
            held = self._runtime.get(name, rendered[name])  # what HAProxy should hold
            read[name] = InStep(held, state_columns(answer), (summaries or {}).get(name))
            known = self._in_step.get(name)
            if known is None or known.slots is not held or known.columns != read[name].columns:
                text = answer.decode(errors="replace")
                plans.append(Plan(name, held, None, None, self.name, text))
        try:
            sent = apply_plans(admin, plans)
        except Decline as why:
            raise DriverError(f"runtime state cannot be repaired: {why}", target=self.name) from why
        self._in_step = {n: k for n, k in self._in_step.items() if n in rendered}
        repaired = {p.backend for p in plans if p.touched}
        for name, found in read.items():  # a repaired one is back to what it was found
            if found.columns is not None and name not in repaired:
                self._in_step[name] = found
        if sent:
            log.info(
                "haproxy.runtime_repaired",
                target=self.name,
                backends=sorted(repaired),
                commands=sent,
            )
        return sent > 0

    def _suspects(
        self, rendered: Mapping[str, Assigned], summaries: dict[str, Summary] | None
    ) -> list[str]:
        """The backends to read in full whatever their turn: never found in step for the
        slots HAProxy should hold, or their summary moved since (all without summaries)."""
        if summaries is None:
            return list(rendered)
        suspects = []
        for name, assigned in rendered.items():
            known = self._in_step.get(name)
            if (
                known is None
                or known.slots is not self._runtime.get(name, assigned)
                or known.summary != summaries.get(name)
            ):
                suspects.append(name)
        return suspects

    def _ask_due(self, admin: Cli, due: list[str], slots: int) -> tuple[bytes, list[bytes]]:
        """The summaries and the due backends' answers: in one session, or in two when
        the due backends are more than a tick's budget (one bigger than the budget),
        whose answer, sent alone, is kept as read rather than cut out (``ask_all``)."""
        if slots <= self.target.runtime_check_slots:
            stats, *answers = ask_all(admin, [BACKEND_STATS, *self._show(due)], target=self.name)
            return stats, answers
        (stats,) = ask_all(admin, [BACKEND_STATS], target=self.name)
        return stats, ask_all(admin, self._show(due), target=self.name)

    def _show(self, backends: list[str]) -> list[str]:
        return [show_servers_state(name, target=self.name) for name in backends]

    def _runtime_plans(self, old: Snapshot | None, new: Snapshot) -> list[Plan]:
        """The backends to change and their touched slots; Decline if anything else did."""
        if not self.target.runtime or self.target.admin_socket is None:
            raise Decline("runtime mode is off")
        if old is None:
            raise Decline("no applied snapshot to compare with")
        if old.services.keys() != new.services.keys():
            raise Decline("a backend appeared or disappeared")
        if other_keys_changed(old, new):
            raise Decline("keys outside the instance schema changed")
        now = self._assign(new)
        names = [n for n, s in new.services.items() if not same_service(old.services[n], s)]
        names += [
            n
            for n, held in self._runtime.items()
            if now.get(n, held) is not held and n not in names
        ]
        if not names:
            raise Decline("no membership change (the template or something else changed)")
        rendered = self._assigned_for(old) or {}
        plans = []
        for name in names:
            before, after = old.services[name], new.services[name]
            if before.settings != after.settings:
                raise Decline(f"{name}: settings changed")
            base = self._runtime.get(name) or rendered.get(name)
            plans.append(backend_plan(name, base, now[name], before, after, target=self.name))
        return plans

    def _admin_or_none(self) -> Cli | None:
        return None if self.target.admin_socket is None else self._admin()

    def _admin(self) -> Cli:
        assert self.target.admin_socket is not None
        return Cli(
            self.target.admin_socket,
            target=self.name,
            timeout=min(self.target.command_timeout, SOCKET_TIMEOUT),
        )


def _without_notices(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("[NOTICE]"))


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
