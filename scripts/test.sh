#!/usr/bin/env bash
# Run the test suite inside .venv (set up on first use). CPU only; the GPU check is bench/gpu_check.sh.
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --quick    the inner loop: no end-to-end runs, no float64 reference comparisons (-m "not slow")
#   bash scripts/test.sh -k lease   any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pairx ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
args=()
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${args[@]+"${args[@]}"}"
