#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run every check CI runs: ruff, mypy --strict, and the
# whole pytest suite (unit + integration against real etcd, nginx and HAProxy on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"
.venv/bin/mypy lbsync
echo "==> pytest"
exec .venv/bin/pytest "$@"
