"""Is a change only membership? The tests both runtime modes (HAProxy's admin socket,
nginx's Lua balancer) share before they apply a change without a reload.

Membership is what registrations and health marks say: which instances exist, their
address, weight and state. Anything else a template may read (a raw key, a service's
settings, an instance's meta) needs a render and a reload.
"""

from __future__ import annotations

from lbsync.keymap import differing
from lbsync.model import Service, Snapshot

_MEMBERSHIP_KINDS = ("instances", "health")


def is_membership_key(key: str) -> bool:
    """``/services/<svc>/instances/<id>`` or ``/services/<svc>/health/<id>``."""
    parts = key.split("/")
    return len(parts) == 5 and parts[1] == "services" and parts[3] in _MEMBERSHIP_KINDS


def other_keys_changed(old: Snapshot, new: Snapshot) -> bool:
    """A raw key a template might read, other than registrations and health marks, differs
    (added, removed or changed: only the key groups that are not shared are compared, see
    ``lbsync.keymap.differing``; only the keys that differ are looked at)."""
    return any(not is_membership_key(key) for key in differing(old.keys, new.keys))


def meta_changed(old: Service, new: Service) -> str | None:
    """An instance present on both sides whose meta changed (a template may render it)."""
    before = {i.id: i for i in old.instances}
    for inst in new.instances:
        prev = before.get(inst.id)
        if prev is not None and prev.meta != inst.meta:
            return f"instance {inst.id}: meta changed"
    return None
