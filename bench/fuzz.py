"""``python -m bench fuzz [--examples N]``: the value fuzz suite (tests/fuzz), run longer.

CI runs ``tests/fuzz`` with 80 examples per property; this runs the same properties with
``--examples`` (default 2,000) through pytest, so a failure prints hypothesis's shrunk
catalog exactly as in CI. Not part of ``bench all``: it measures nothing, it searches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz")
    parser.add_argument("--examples", type=int, default=2000, help="examples per LB property")
    parser.add_argument("-k", default=None, help="only the properties matching (pytest -k)")
    args = parser.parse_args(argv)
    env = {**os.environ, "LBSYNC_FUZZ_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider"]
    if args.k:
        command += ["-k", args.k]
    done = subprocess.run(command, cwd=REPO, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench fuzz: pytest exited {done.returncode}")
