#!/usr/bin/env bash
# Run the default test suite inside .venv (CPU only; the GPU check is bench/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
