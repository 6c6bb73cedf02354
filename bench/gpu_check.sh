#!/usr/bin/env bash
# One prepared GPU check of the batched PAIR-X engine: bench/engine.py --preset miewid (MiewID
# architecture, 440 px, backbone.blocks.3, random weights), k_colors 10 then 0, with the targets
# (>= 20 pairs/s at k_colors=10, >= 100 pairs/s at k_colors=0, peak memory <= 40 GiB) checked at the end.
#
# For a GPU machine without network access. Run from the repository root:
#     bash bench/gpu_check.sh            # or: BENCH_DEVICE=cpu bash bench/gpu_check.sh (dry run)
#
# Uses python3 with torch as installed on the machine, plus any wheels shipped beside the
# checkout in .whl/ (installed offline into /tmp/site, no dependencies resolved). Reaches no
# network. Every step is timeout-guarded; the whole script ends in under 5 minutes.
# Results: JSON lines on stdout (also kept in $OUT/ or /tmp/pairx_gpu_check/ when writable),
# followed by a short table.
#
# Environment overrides (all optional):
#   BENCH_DEVICE        cuda (default) or cpu for a dry run of the same path
#   BENCH_MODEL         default miewid-arch (440 px); the dry run uses timm:test_efficientnet?size=64
#   BENCH_BUDGET_GIB    memory budget handed to the engine, default 40
#   BENCH_BATCH_SIZES   default 1,8,16,32 (pairs per batch; the engine also cuts to the budget)
#   BENCH_PAIRS         pairs per measurement, default 32
#   BENCH_TF32          1: allow TF32 (default 0: full float32)
#   BENCH_MEMORY_FORMAT auto (default: contiguous on GPU), channels_last or contiguous

set -u
START=$SECONDS
cd "$(dirname "$0")/.."

DEVICE="${BENCH_DEVICE:-cuda}"
BUDGET="${BENCH_BUDGET_GIB:-40}"
BATCH_SIZES="${BENCH_BATCH_SIZES:-1,8,16,32}"
PAIRS="${BENCH_PAIRS:-32}"
if [ "$DEVICE" = "cpu" ]; then
  MODEL="${BENCH_MODEL:-timm:test_efficientnet?size=64}"
  LAYER="backbone.blocks.2"
else
  MODEL="${BENCH_MODEL:-miewid-arch}"
  LAYER="backbone.blocks.3"
fi
TF32_FLAG=""
if [ "${BENCH_TF32:-0}" = "1" ] && [ "$DEVICE" != "cpu" ]; then TF32_FLAG="--tf32"; fi
MEMORY_FORMAT="${BENCH_MEMORY_FORMAT:-auto}"

# results folder and file, wheels, environment check (stops here when torch or a package is missing)
NAME=gpu_check
source bench/gpu_env.sh

# k_colors=10 first (the figure that matters), then k_colors=0; each bounded on its own, so a
# slow first part still leaves its JSON lines (written line by line) and the time for the second.
run_bench() {  # $1 = k_colors, $2 = time limit (s)
  section "bench k_colors=$1 (limit $2 s)"
  timeout -k 10 "$2" "$PY" bench/engine.py --preset miewid --model "$MODEL" --device "$DEVICE" --layers "$LAYER" \
    --k-colors "$1" --batch-sizes "$BATCH_SIZES" --pairs "$PAIRS" --reference-pairs 2 \
    --repeats 2 --warmup 1 --memory-budget-gib "$BUDGET" --memory-format "$MEMORY_FORMAT" $TF32_FLAG \
    | tee -a "$JSONL"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "k_colors=$1: stopped at the $2 s limit (partial results kept)"; fi
  if [ "$rc" -ne 0 ]; then echo "k_colors=$1: bench exited with $rc"; fi
}

run_bench 10 140
# what is left of the 5 minutes (minus a margin for the table), at most 100 s
LEFT=$(( 280 - (SECONDS - START) ))
if [ "$LEFT" -gt 100 ]; then LEFT=100; fi
if [ "$LEFT" -ge 20 ]; then
  run_bench 0 "$LEFT"
else
  echo "skipping k_colors=0: only $LEFT s left"
fi

section "figures"
timeout -k 2 20 "$PY" - "$JSONL" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if record.get("mode") in ("engine", "reference"):
        rows.append(record)
if not rows:
    print("no measurements"); sys.exit(1)
print(f"{rows[0]['model']} on {rows[0]['device_name']} ({rows[0]['dtype']}, {rows[0]['input_size']} px, "
      f"layers {rows[0]['layers']}, tf32 {rows[0].get('tf32')}, memory format {rows[0].get('memory_format')})")
header = f"{'k':>3} {'mode':>9} {'bs':>4} {'pairs':>5} {'s/pair':>8} {'pairs/s':>8} {'x ref':>7} {'x bs1':>7} {'peak GiB':>9} images/batch"
print(header); print("-" * len(header))
def fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else format("-", spec.rstrip("f").split(".")[0] + "s")
for r in rows:
    peak = r["peak_memory_bytes"] / 2**30 if r.get("peak_memory_bytes") is not None else None
    print(f"{r['k_colors']:>3} {r['mode']:>9} {fmt(r['batch_size'], '>4')} {r['pairs']:>5} "
          f"{fmt(r['seconds_per_pair'], '>8.4f')} {fmt(r['pairs_per_s'], '>8.2f')} "
          f"{fmt(r['speedup_vs_reference'], '>7.1f')} {fmt(r['speedup_vs_engine_bs1'], '>7.2f')} "
          f"{fmt(peak, '>9.2f')} {r.get('images_per_batch', '')}")
# targets at 440 px (the preset): best engine pairs/s per k_colors within 40 GiB of peak memory
TARGETS = {10: 20.0, 0: 100.0}
for k, target in TARGETS.items():
    fits = [r for r in rows if r["mode"] == "engine" and r["k_colors"] == k and r.get("pairs_per_s")
            and (r.get("peak_memory_bytes") or 0) <= 40 * 2**30]
    if not fits:
        print(f"target k_colors={k}: no measurement"); continue
    best = max(fits, key=lambda r: r["pairs_per_s"])
    verdict = "met" if best["pairs_per_s"] >= target else "MISSED"
    print(f"target k_colors={k}: >= {target:g} pairs/s within 40 GiB: {verdict} "
          f"({best['pairs_per_s']:.2f} pairs/s at batch size {best['batch_size']}, "
          f"{(best.get('peak_memory_bytes') or 0) / 2**30:.2f} GiB)")
EOF
echo "JSON lines: $JSONL"
echo "total $((SECONDS - START)) s"
