"""``python -m bench all`` | ``python -m bench <name> [options]`` (``--help`` per bench).

``all`` runs every bench below with its defaults, one after the other (~6 min on 2 cores);
each prints its table and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

BENCHES = (
    "latency",
    "burst",
    "scale",
    "rounds",
    "reconcile",
    "traffic",
    "startup",
    "catalog",
    "idle",
    "transport",
    "cli",
    "validation",
    "probe",
)
# The runtime modes' benches, owned with their drivers (nginx Lua balancer, HAProxy
# runtime API): part of ``all`` once they are in the tree.
RUNTIME_BENCHES = ("nginx_runtime", "haproxy_runtime")
# Run by name only, not by ``all``: they search or soak rather than measure.
ON_DEMAND = ("fuzz", "soak")


def _available() -> tuple[str, ...]:
    extra = []
    for name in RUNTIME_BENCHES:
        try:
            importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                print(f"bench: skipping {name}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # a bench being written by someone else: say, go on
            print(f"bench: skipping {name}: {exc!r}", file=sys.stderr)
            continue
        extra.append(name)
    return (*BENCHES, *extra)


def main(argv: list[str]) -> int:
    names = _available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*names, *ON_DEMAND, "all"):
        usage = ",".join((*names, *ON_DEMAND))
        print(f"usage: python -m bench {{all,{usage}}} [options]", file=sys.stderr)
        return 2
    chosen = names if argv[0] == "all" else (argv[0],)
    rest = argv[1:] if argv[0] != "all" else []
    started = time.monotonic()
    failed = []
    for name in chosen:
        print(f"\n=== bench {name}", flush=True)
        t0 = time.monotonic()
        try:
            importlib.import_module(f"bench.{name}").main(rest)
        except Exception:  # one broken bench must not hide the others' figures
            if len(chosen) == 1:
                raise
            traceback.print_exc()
            failed.append(name)
        print(f"  ({name}: {time.monotonic() - t0:.0f}s)", flush=True)
    print(f"\ndone in {time.monotonic() - started:.0f}s", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
