"""HAProxy: validated master-worker reloads, and membership changes with no reload at all.

Reload path: ``haproxy -c -dW`` on the staged config plus the listen-address pre-check,
SIGUSR2 to the master (``-W``; the master CLI's ``reload`` when the master is not a local
process, as from a sidecar), then ``show proc`` on the master socket until a new worker
generation is up.

Runtime path: every service is a backend with a fixed pool of server *slots*
(``s1``..``sN``). An instance keeps its slot while it exists; free slots are parked on
``127.0.0.1:1`` and disabled. A change that only moves instances in and out of slots, or
changes their address, weight or state, is applied over the admin socket (``set server``,
``set weight``) and the rendered file (which says the same) is written without a reload.
A change costs what it touches: the slot table updates only the slots whose instance
changed (the rest stay the same objects, in blocks the template caches), the commands
come from the slots that differ between what the runtime holds and the new render, and
only those slots are read back from ``show servers state`` to confirm.

Four HAProxy 2.6 facts shape the code (see ``lb-mechanics.md``, ``server_state.c`` and
docs/haproxy.md):

- ``haproxy -c`` reads the ``server-state-file`` too, and every state it restores that
  differs from the config is a warning, which ``-dW`` makes fatal. ``validate`` therefore
  checks a copy of the staged main config whose ``server-state-file`` is a neutral one.
- Loading a state file does not simply "keep runtime changes": the port is always taken
  from the file, the address only for hostnames, and a server that the config
  ``disabled`` comes back *ready* if it was set ready at runtime after being loaded
  disabled. So a raw dump would resurrect a freed slot, or give it the config's address
  with the old port. Before each reload the dump is therefore checked against the config
  about to be loaded, and every line that disagrees with it (address, port, maint/drain,
  weight) is dropped: the config wins, and only agreeing lines (health-check state) carry
  over. That is safe because the rendered file always holds the runtime membership.
  A reload lbsync does not make (``systemctl reload haproxy``) dumps nothing first, so
  after a runtime change the state file is emptied: it would disagree with the config.
- Servers without an ``id`` are numbered in quadratic time per backend: ``haproxy -c`` on
  one 20,000-slot backend takes ~3.5 s, ~0.4 s with explicit ids (the template sets them).
- ``show proc``'s ``failed`` counter resets to 0 after a successful reload; a reload is
  confirmed by a worker with 0 reloads that was not there before.

Modules: ``driver`` (the Driver), ``slots`` (slot assignment), ``settings`` (per-service
settings), ``state`` (config server lines, ``show servers state``, the state file),
``master`` (the CLI socket client, ``show proc``, the master across a reload),
``runtime`` (plans and admin-socket commands for a membership-only change), ``check``
(what a reconcile tick reads: backend summaries and a slot-budgeted rotation) and
``admin_commands`` (the grammar of every command sent).
"""

# Importing the package registers the driver: ``driver_for`` imports ``lbsync.drivers.<kind>``.
from lbsync.drivers.haproxy.driver import HaproxyDriver

__all__ = ["HaproxyDriver"]
