"""nginx runtime mode: membership changes pushed to a Lua balancer, no reload.

The nginx side is ``lbsync/lua/lbsync/runtime.lua`` (read its header first): each
round-robin upstream keeps its rendered static ``server`` list and gains a
``balancer_by_lua_block`` that balances over the peer list lbsync pushed for it, if any; a
loopback-only control location takes pushes and answers which lists it holds.

What this module decides and does (``NginxDriver`` calls it):

- **runtime_update**: a change that only moves instances in or out, or changes their
  address, weight or up/drain state, in upstreams that the Lua balancer drives, is pushed
  (one POST per changed upstream, at the snapshot's etcd revision); anything else
  (an upstream appears or goes, settings, meta, keys outside the schema, a hostname that
  the balancer could not use, the template) declines, and the pipeline reloads. So does
  any failure to push: an unreachable endpoint, a refused or stale push.
- **after a reload** (``verify``): nginx starts a new *generation* on every config load
  and serves every upstream from its static list until lbsync pushes again; lbsync waits
  for the new generation to answer and pushes every upstream.
- **tick** (called from the daemon's loop): every ``poll_interval``, GET the control
  endpoint; a generation lbsync did not push to (nginx restarted or reloaded by someone
  else) or a missing upstream gets a full re-push. An upstream whose revision or peer list
  differs from what lbsync last pushed there was changed by someone else: that is logged
  as ``runtime.tampered``, counted, and repaired by a forced push.
- **authentication**: every request carries the token in ``control_token_file`` (a 0600 file
  lbsync creates, which nginx's master reads when it loads the config).

Between a restart and the re-push nothing is wrong, only static: the static lists are the
rendered files, which lbsync writes on every change, runtime or not.
"""

from __future__ import annotations

import functools
import ipaddress
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from lbsync import metrics
from lbsync.config import NginxTarget
from lbsync.drivers.membership import meta_changed, other_keys_changed
from lbsync.drivers.nginx.control import ControlClient, ControlState, StalePush, digest
from lbsync.drivers.nginx.control_token import load_or_create
from lbsync.drivers.nginx.lua import lua_modules
from lbsync.errors import DriverError
from lbsync.model import Service, Snapshot

log = structlog.get_logger("lbsync.drivers.nginx")

LUA_DIR = Path(__file__).resolve().parents[2] / "lua"
DICT_SIZE = "16m"  # keep it fixed: a size change wipes the shared dict on reload
STATIC_BALANCE = frozenset({"least_conn", "ip_hash", "random"})  # not done by the Lua side
_WAIT_FIRST = 0.005
_WAIT_MAX = 0.05
_UNREACHABLE_GRACE = 0.2  # after a verified reload, how long a refused control port may last
_OLD_WORKERS_GRACE = 1.0  # after a reload, how long pushes refused by old workers are retried


class _Decline(Exception):
    """This change cannot go through the control endpoint; the reason is logged."""


# --- what the Lua side can do ----------------------------------------------------------


def lua_balanced(service: Service) -> bool:
    """True if the stock template gives this upstream the Lua balancer (round robin)."""
    return str(service.settings.get("balance", "")) not in STATIC_BALANCE


def pushable(service: Service) -> bool:
    """Every instance that takes traffic has an IP address (the balancer cannot resolve)."""
    return all(_is_ip(i.host) for i in service.instances if not i.down)


def peers(service: Service) -> list[dict[str, Any]]:
    """The push payload: up and draining instances (down ones are left out)."""
    return [
        {
            "id": i.id,
            "host": i.host,
            "port": i.port,
            "weight": i.weight,
            "state": "up" if i.up else "drain",
        }
        for i in service.instances
        if not i.down
    ]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _same_instances_apart_from_membership(old: Service, new: Service) -> str | None:
    """Why ``old → new`` needs more than a push, or None."""
    if old.settings != new.settings:
        return "settings changed"
    why = meta_changed(old, new)
    if why:
        return why
    if not lua_balanced(new):
        return f"balance {new.settings.get('balance')} is not done by the Lua balancer"
    if not pushable(new):
        return "an instance has a hostname (the Lua balancer needs IP addresses)"
    return None


# --- the driver's runtime state -----------------------------------------------------------


@dataclass(frozen=True)
class ControlBefore:
    """The Lua side before a reload: its generation, and the snapshot to push after."""

    generation: str | None
    push: Snapshot | None


class RuntimeSync:
    """Keeps a running nginx's pushed peer lists in step with what lbsync applied."""

    def __init__(self, target: NginxTarget) -> None:
        self.target = target
        self.client = ControlClient(
            target.control_url,
            timeout=target.control_timeout,
            target=target.name,
            token=self.token,
        )
        self.lua_dir = target.lua_dir or LUA_DIR
        self._token: str | None = None
        self._generation: str | None = None  # the generation our last full sync went to
        # what lbsync last pushed per upstream, in that generation: revision, peers, digest
        self._pushed: dict[str, _Pushed] = {}
        self._tampered = 0
        self._last_tampered: dict[str, Any] | None = None
        self._loaded: Snapshot | None = None  # what nginx's pushed lists were last set to
        self._pending: Snapshot | None = None  # what the coming reload loads
        self._next_poll = 0.0
        self._reachable: bool | None = None

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def next_poll(self) -> float:
        """When ``tick`` next asks nginx (``time.monotonic()`` clock)."""
        return self._next_poll

    def token(self) -> str:
        """The control token, read (or created) on first use: not at construction, so a
        driver can be built without touching the file system. Raises DriverError."""
        if self._token is None:
            self._token = load_or_create(self.target.control_token_file, target=self.name)
        return self._token

    def status(self) -> dict[str, Any]:
        """For the daemon's /status: is the control endpoint answering, and tampering."""
        return {
            "control_reachable": self._reachable,
            "tampered": self._tampered,
            "last_tampered": self._last_tampered,
        }

    # -- template ---------------------------------------------------------------------

    def template_context(self, snapshot: Snapshot) -> dict[str, Any]:
        parts = urllib.parse.urlsplit(self.target.control_url)
        return {
            "nginx_runtime": {
                "lua_package_path": f"{self.lua_dir}/?.lua;;",
                "dict_size": DICT_SIZE,
                "control_listen": parts.netloc,
                "control_location": parts.path,
                "token_file": str(self.target.control_token_file),
                "upstreams": tuple(n for n, s in snapshot.services.items() if lua_balanced(s)),
            }
        }

    # -- runtime_update -----------------------------------------------------------------

    def update(self, old: Snapshot | None, new: Snapshot) -> bool:
        started = time.monotonic()
        try:
            changed = self._membership_changes(old, new)
            synced = self._push(new, changed)
        except _Decline as why:
            self._pending = new
            log.info("nginx.runtime_update", target=self.name, applied=False, reason=str(why))
            return False
        self._loaded = new
        log.info(
            "nginx.runtime_update",
            target=self.name,
            applied=True,
            upstreams=changed,
            full_sync=synced,
            revision=new.revision,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        return True

    def _membership_changes(self, old: Snapshot | None, new: Snapshot) -> list[str]:
        if old is None:
            raise _Decline("no applied snapshot to compare with")
        if set(old.services) != set(new.services):
            raise _Decline("an upstream appeared or disappeared")
        if other_keys_changed(old, new):
            raise _Decline("keys outside the instance schema changed")
        changed = [
            name
            for name, service in new.services.items()
            if peers(old.services[name]) != peers(service)
        ]
        if not changed:
            raise _Decline("no membership change (the template or something else changed)")
        for name in changed:
            why = _same_instances_apart_from_membership(old.services[name], new.services[name])
            if why:
                raise _Decline(f"{name}: {why}")
        return changed

    def _push(self, snapshot: Snapshot, names: list[str]) -> bool:
        """Push ``names``; if nginx turns out to be on a generation we never synced, push
        every upstream. Returns whether a full sync happened. _Decline on any failure."""
        generation = None
        try:
            for name in names:
                pushed = peers(snapshot.services[name])
                result = self.client.push(name, snapshot.revision, pushed)
                self._pushed[name] = _Pushed(snapshot.revision, pushed)
                generation = result.generation
            if generation is not None and generation != self._generation:
                self._sync_all(snapshot)
                return True
        except DriverError as err:
            self._generation = None  # unknown now: the next tick or push syncs everything
            raise _Decline(str(err)) from err
        return False

    def _sync_all(self, snapshot: Snapshot) -> str | None:
        """Push every upstream the balancer drives; remember the generation. Raises
        DriverError (a stale upstream is skipped: nginx already holds newer data)."""
        generation = None
        self._pushed = {}
        for name, service in snapshot.services.items():
            if not (lua_balanced(service) and pushable(service)):
                continue
            pushed = peers(service)
            # expected from now on even if refused as stale: tick repairs what differs
            self._pushed[name] = _Pushed(snapshot.revision, pushed)
            try:
                generation = self.client.push(name, snapshot.revision, pushed).generation
            except StalePush as err:
                log.info(
                    "nginx.runtime_push_stale", target=self.name, upstream=name, error=str(err)
                )
        if generation is None:
            generation = self.client.state().generation
        self._generation = generation
        self._loaded = snapshot
        return generation

    # -- around a reload -------------------------------------------------------------------

    def before_reload(self) -> ControlBefore:
        """For the ticket: the generation before the signal, and what to push after it."""
        push = self._pending or self._loaded
        self._pending = None
        try:
            before: str | None = self.client.state().generation
        except DriverError:
            before = None
        return ControlBefore(generation=before, push=push)

    def after_reload(self, control: ControlBefore) -> None:
        """Wait (bounded) for the new generation to answer, then push every upstream.

        Never raises: a failure is logged, and ``tick`` retries.
        """
        snapshot, before = control.push, control.generation
        started = time.monotonic()
        deadline = started + min(self.target.verify_timeout, 5.0)
        pause = _WAIT_FIRST
        last = "no answer"
        while True:
            try:
                state = self.client.state()
                if state.generation != before:
                    break
                last = f"still generation {before}"  # new workers not initialised yet
            except DriverError as err:
                # The new workers are up, so are their listening sockets: no answer means
                # the loaded config has no control location. Do not hold every reload.
                last = f"{err} (does the loaded config render the runtime template?)"
                if time.monotonic() - started >= _UNREACHABLE_GRACE:
                    deadline = 0.0
            if time.monotonic() >= deadline:
                self._generation = None
                log.warning("nginx.runtime_resync_failed", target=self.name, error=last)
                return
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_MAX)
        if snapshot is None:
            self._generation = None  # nothing to push yet; tick pushes what is applied
            return
        # The old workers still accept for a moment, with the token they loaded: after a
        # token change (rotation, or nginx started before the file existed) they refuse.
        self._resync(snapshot, reason="reload", retry_for=_OLD_WORKERS_GRACE)

    def _resync(self, snapshot: Snapshot, *, reason: str, retry_for: float = 0.0) -> bool:
        """Push every upstream; on failure retry (bounded) for ``retry_for`` seconds."""
        started = time.monotonic()
        pause = _WAIT_FIRST
        while True:
            try:
                generation = self._sync_all(snapshot)
                break
            except DriverError as err:
                if time.monotonic() - started >= retry_for:
                    self._generation = None
                    log.warning("nginx.runtime_resync_failed", target=self.name, error=str(err))
                    return False
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_MAX)
        log.info(
            "nginx.runtime_resync",
            target=self.name,
            reason=reason,
            generation=generation,
            revision=snapshot.revision,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        return True

    # -- tick -----------------------------------------------------------------------------

    def tick(self, applied: Snapshot | None, now: float | None = None) -> bool:
        """Every ``poll_interval``: is nginx on the generation we pushed to, holding every
        upstream we expect? If not, push them all. True = in step (or not due yet)."""
        now = time.monotonic() if now is None else now
        if now < self._next_poll:
            return self._reachable is not False
        self._next_poll = now + self.target.poll_interval
        snapshot = applied or self._loaded
        try:
            state = self.client.state()
        except DriverError as err:
            self._note_reachable(False, str(err))
            self._generation = None
            return False
        self._note_reachable(True, None)
        if snapshot is None:
            return True
        if state.generation != self._generation:
            why = "first sync" if self._generation is None else "nginx restarted or reloaded"
            return self._resync(snapshot, reason=why)
        missing = sorted(name for name in _expected(snapshot) if name not in state.services)
        if missing:
            return self._resync(snapshot, reason=f"missing upstreams {missing}")
        return self._repair(state)

    def _repair(self, state: ControlState) -> bool:
        """Push back, forced, every upstream whose revision or peers differ from what lbsync
        pushed: only a holder of the token can have changed them (another lbsync, or
        someone who read the token file). One ``runtime.tampered`` event per upstream."""
        ok = True
        for name, pushed in list(self._pushed.items()):
            found_revision = state.services.get(name)
            if found_revision is None:
                continue  # missing upstreams are re-pushed above
            if (found_revision, state.digests.get(name)) == (pushed.revision, pushed.digest):
                continue
            self._report_tampered(name, pushed, found_revision)
            try:
                self.client.push(name, pushed.revision, pushed.peers, force=True)
            except DriverError as err:
                log.warning("nginx.runtime_repair_failed", target=self.name, error=str(err))
                ok = False
        return ok

    def _report_tampered(self, name: str, pushed: _Pushed, found_revision: int) -> None:
        try:
            found: list[str] | str = _addresses(self.client.held(name))
        except DriverError as err:
            found = f"unknown ({err})"
        self._tampered += 1
        self._last_tampered = {
            "upstream": name,
            "expected_revision": pushed.revision,
            "found_revision": found_revision,
            "at": time.time(),
        }
        metrics.runtime_tampered(self.name)
        log.warning(
            "runtime.tampered",
            target=self.name,
            upstream=name,
            expected_revision=pushed.revision,
            found_revision=found_revision,
            expected_peers=_addresses(pushed.peers),
            found_peers=found,
            security=True,
        )

    def _note_reachable(self, reachable: bool, error: str | None) -> None:
        if reachable == self._reachable:
            return
        self._reachable = reachable
        if reachable:
            log.info("nginx.control_reachable", target=self.name, url=self.target.control_url)
        else:
            log.warning(
                "nginx.control_unreachable",
                target=self.name,
                url=self.target.control_url,
                error=error,
            )

    # -- checks -----------------------------------------------------------------------------

    def modules(self) -> list[Path]:
        """The Lua files nginx loads (checked before every reload)."""
        return lua_modules(self.lua_dir)


@dataclass(frozen=True)
class _Pushed:
    """One upstream as lbsync last pushed it (what ``tick`` expects nginx to hold)."""

    revision: int
    peers: list[dict[str, Any]]

    @functools.cached_property
    def digest(self) -> str:
        return digest(self.peers)


def _addresses(peer_list: list[dict[str, Any]]) -> list[str]:
    """Peers as ``host:port/state/weight`` for an event (bounded: a list can be long)."""
    return [
        f"{p.get('host')}:{p.get('port')}/{p.get('state')}/{p.get('weight')}"
        if isinstance(p, dict)
        else repr(p)[:100]
        for p in peer_list[:20]
    ]


def _expected(snapshot: Snapshot) -> Iterable[str]:
    return (n for n, s in snapshot.services.items() if lua_balanced(s) and pushable(s))
