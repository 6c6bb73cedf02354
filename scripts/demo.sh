#!/usr/bin/env bash
# The demo: sets up .venv on first use, then runs `pairx demo` with any options you give
# (e.g. bash scripts/demo.sh --out /tmp/pairx-demo --individuals 20).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pairx ] || bash scripts/setup.sh
exec .venv/bin/pairx demo "$@"
