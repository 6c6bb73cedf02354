# Shared start of the GPU scripts (bench/gpu_check.sh, bench/gpu_matrix.sh); sourced, not run.
# Installs the wheels in .whl/ (offline, into /tmp/site), prints the environment (torch, CUDA,
# GPUs) and stops the calling script when torch or a needed package is missing. Expects START
# (the caller's $SECONDS at its start), NAME (the script's name: results go to $OUT, default
# /tmp/pairx_$NAME, as $NAME.jsonl in $JSONL) and the current directory at the repository root.

RESULTS="${OUT:-/tmp/pairx_$NAME}"
mkdir -p "$RESULTS" 2>/dev/null || RESULTS="$(mktemp -d)"
JSONL="$RESULTS/$NAME.jsonl"
: > "$JSONL"

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

section() { printf '\n=== %s (t=%ds)\n' "$1" "$((SECONDS - START))"; }

section "wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  timeout -k 5 90 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    || echo "warning: installing .whl/*.whl failed (exit $?); using what is installed"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ beside the checkout; using installed packages only"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

section "environment"
timeout -k 5 60 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
missing = []
for name in ("torch", "numpy", "pandas", "timm", "zennit", "safetensors", "PIL"):
    try:
        module = importlib.import_module(name)
        print(f"{name:12s} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001
        missing.append(name)
        print(f"{name:12s} MISSING ({type(error).__name__}: {error})")
if "torch" in missing:
    sys.exit(3)
import torch
print("cuda available", torch.cuda.is_available(), "| torch cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    print(f"gpu {i}: {props.name}, {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free, "
          f"cc {props.major}.{props.minor}, {props.multi_processor_count} SMs")
sys.exit(3 if missing else 0)
EOF
ENV_RC=$?
if command -v nvidia-smi > /dev/null; then
  timeout -k 2 15 nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,clocks.sm --format=csv
fi
if [ "$ENV_RC" -ne 0 ]; then
  echo "environment check failed (exit $ENV_RC): missing packages or no torch; stopping"
  exit "$ENV_RC"
fi

