#!/usr/bin/env bash
# Create .venv at the repository root and install the project with its dev extras.
#
# The installer is uv (itself installed into .venv by pip first): it resolves in about a second,
# unpacks wheels in parallel into its cache (~/.cache/uv), links them into .venv and compiles
# bytecode as pip does. torch with its CUDA libraries is 3.3 GB of wheels: ~50 s in all from a
# clean clone, against 3.5 min with pip (docs/operations.md, "Setup time").
# PAIRX_SETUP_PIP=1 uses pip alone, as before.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
started=$SECONDS
# pip's "Location ... is ignored" notices about this machine's local indexes are filtered out
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch/torchvision pinned to the pair that works on these machines (see README);
# scripts/constraints.txt: the versions this project was last tested with (pyproject keeps lower
# bounds only); it also spares resolvers the backtracking between boto3 and aiobotocore's botocore pin
PACKAGES=("torch==2.14.1" "torchvision==0.29.1" -c scripts/constraints.txt -e ".[dev]")

if [ "${PAIRX_SETUP_PIP:-}" != 1 ] && quiet .venv/bin/python -m pip install -q -c scripts/constraints.txt uv; then
  # uv does not read pip's configuration: pass on the extra indexes and wheel folders pip is set up
  # with (this machine keeps torch and its CUDA wheels on local disk), and let uv pick the best
  # version across all indexes as pip does (its default takes the first index that has a package)
  from_pip=()
  for url in ${PIP_EXTRA_INDEX_URL:-$(.venv/bin/python -m pip config get global.extra-index-url 2>/dev/null || true)}; do
    from_pip+=(--extra-index-url "$url")
  done
  for place in ${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}; do
    from_pip+=(--find-links "$place")
  done
  .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python --index-strategy unsafe-best-match \
    "${from_pip[@]+"${from_pip[@]}"}" "${PACKAGES[@]}"
else
  quiet .venv/bin/python -m pip install -q "${PACKAGES[@]}"
fi

# headless Chromium for the review-site browser test (Debian package; needs root, so CI or a root shell)
if ! command -v chromium >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q chromium >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
echo "setup done: .venv ready ($((SECONDS - started)) s)"
