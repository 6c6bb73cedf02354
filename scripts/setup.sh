#!/usr/bin/env bash
# Create .venv at the repository root and install the project with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch/torchvision first, pinned to the pair that works on these machines (see README)
# (pip's "Location ... is ignored" notices about this machine's local indexes are filtered out)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# scripts/constraints.txt: the versions this project was last tested with (pyproject keeps lower
# bounds only); it spares pip minutes of backtracking between boto3 and aiobotocore's botocore pin
quiet .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
# headless Chromium for the review-site browser test (Debian package; needs root, so CI or a root shell)
if ! command -v chromium >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q chromium >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
echo "setup done: .venv ready"
