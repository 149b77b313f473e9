#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the live demo: a private etcd, nginx and three
# backends on loopback, with lbsync moving traffic as instances come and go.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py
