#!/usr/bin/env bash
# GPU variants of the batched PAIR-X engine in one run: bench/engine.py --preset miewid (MiewID
# architecture, 440 px, backbone.blocks.3, random weights) at one batch size (12 pairs = 24
# images per batch), k_colors 10 and 0, for each of:
#   baseline     float32, TF32 off, cudnn.benchmark off, contiguous (the H200 figures so far)
#   benchmark    + cudnn.benchmark
#   tf32         + TF32 (+ benchmark)
#   chlast       + channels_last (+ TF32 + benchmark)
#   grouped      + 5 pixel passes per backward call (is_grads_batched; k_colors 10 only)
#   bf16         bfloat16 autocast of the forward and backward passes (+ benchmark + channels_last)
#   big0         chlast at k_colors 0 with twice the batch (24 pairs = 48 images: without pixel maps
#                the memory plan allows it within 40 GiB)
# Every variant but the baseline also reports agreement_vs_fp32 (top-k match sets and pixel-map
# correlation against a strict float32 call on the same inputs). A table ends the output.
#
# For a GPU machine without network access; same wheel handling as bench/gpu_check.sh (wheels in
# .whl/ installed offline into /tmp/site). Run from the repository root:
#     bash bench/gpu_matrix.sh            # or: BENCH_DEVICE=cpu bash bench/gpu_matrix.sh (dry run)
# Every variant is timeout-guarded; the whole script ends in under 6 minutes.
# Results: JSON lines in $OUT/gpu_matrix.jsonl (or /tmp/pairx_gpu_matrix/), then the table.
#
# Environment overrides (all optional):
#   BENCH_DEVICE      cuda (default) or cpu (dry run: tiny model; GPU-only switches left out)
#   BENCH_MODEL       default miewid-arch (440 px); the dry run uses timm:test_efficientnet?size=64
#   BENCH_BATCH_PAIRS pairs per batch, default 12 (24 images)
#   BENCH_PAIRS       pairs per timed call, default 24
#   BENCH_REPEATS     timed rounds per variant, default 2
#   BENCH_BUDGET_GIB  memory budget handed to the engine, default 40
#   BENCH_VARIANTS    default "baseline tf32 chlast grouped big0" (also: benchmark; bf16 runs on the CPU only)

set -u
START=$SECONDS
cd "$(dirname "$0")/.."

DEVICE="${BENCH_DEVICE:-cuda}"
BATCH_PAIRS="${BENCH_BATCH_PAIRS:-12}"
PAIRS="${BENCH_PAIRS:-24}"
REPEATS="${BENCH_REPEATS:-2}"
BUDGET="${BENCH_BUDGET_GIB:-40}"
VARIANTS="${BENCH_VARIANTS:-baseline tf32 chlast grouped big0}"
TOTAL_LIMIT=320  # seconds for all variants (the table and the start-up come on top)
if [ "$DEVICE" = "cpu" ]; then
  MODEL="${BENCH_MODEL:-timm:test_efficientnet?size=64}"
  LAYER="backbone.blocks.2"
  BATCH_PAIRS="${BENCH_BATCH_PAIRS:-2}"
  PAIRS="${BENCH_PAIRS:-2}"
  REPEATS="${BENCH_REPEATS:-1}"
else
  MODEL="${BENCH_MODEL:-miewid-arch}"
  LAYER="backbone.blocks.3"
fi

# results folder and file, wheels, environment check (stops here when torch or a package is missing)
NAME=gpu_matrix
source bench/gpu_env.sh

variant_flags() {  # $1 = variant -> bench/engine.py switches (GPU-only ones left out on the CPU)
  local gpu=""
  case "$1" in
    baseline)  echo "--memory-format contiguous" ;;
    benchmark) [ "$DEVICE" != "cpu" ] && gpu="--cudnn-benchmark"; echo "--memory-format contiguous $gpu --agreement" ;;
    tf32)      [ "$DEVICE" != "cpu" ] && gpu="--cudnn-benchmark --tf32"; echo "--memory-format contiguous $gpu --agreement" ;;
    chlast)    [ "$DEVICE" != "cpu" ] && gpu="--cudnn-benchmark --tf32"; echo "--memory-format channels_last $gpu --agreement" ;;
    grouped)   [ "$DEVICE" != "cpu" ] && gpu="--cudnn-benchmark --tf32"
               echo "--memory-format channels_last $gpu --pixel-pass-group 5 --agreement" ;;
    bf16)      [ "$DEVICE" != "cpu" ] && gpu="--cudnn-benchmark"
               echo "--memory-format channels_last --autocast bfloat16 $gpu --agreement" ;;
    big0)      [ "$DEVICE" != "cpu" ] && gpu="--cudnn-benchmark --tf32"; echo "--memory-format channels_last $gpu --agreement" ;;
    *)         echo "unknown" ;;
  esac
}

for VARIANT in $VARIANTS; do
  FLAGS=$(variant_flags "$VARIANT")
  if [ "$FLAGS" = "unknown" ]; then echo "unknown variant $VARIANT; skipped"; continue; fi
  LEFT=$(( TOTAL_LIMIT - (SECONDS - START) ))
  LIMIT=$(( LEFT < 70 ? LEFT : 70 ))
  KS="10,0"; [ "$VARIANT" = "grouped" ] && KS="10"  # no pixel passes at k_colors 0
  BATCH="$BATCH_PAIRS"; CALL_PAIRS="$PAIRS"
  if [ "$VARIANT" = "big0" ]; then KS="0"; BATCH=$(( BATCH_PAIRS * 2 )); CALL_PAIRS=$(( PAIRS * 2 )); fi
  if [ "$LIMIT" -lt 25 ]; then echo "skipping $VARIANT: only $LEFT s left"; continue; fi
  section "$VARIANT: $FLAGS (limit $LIMIT s)"
  # shellcheck disable=SC2086  # FLAGS is a list of switches
  timeout -k 10 "$LIMIT" "$PY" bench/engine.py --preset miewid --model "$MODEL" --device "$DEVICE" \
    --layers "$LAYER" --k-colors "$KS" --batch-sizes "$BATCH" --pairs "$CALL_PAIRS" --repeats "$REPEATS" \
    --warmup 1 --memory-budget-gib "$BUDGET" $FLAGS \
    | "$PY" -c 'import json, sys
variant = sys.argv[1]
for line in sys.stdin:
    try:
        record = json.loads(line)
    except ValueError:
        continue
    record["variant"] = variant
    print(json.dumps(record), flush=True)' "$VARIANT" | tee -a "$JSONL" | cut -c1-240
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "$VARIANT: stopped at the $LIMIT s limit (partial results kept)"; fi
  if [ "$rc" -ne 0 ]; then echo "$VARIANT: bench exited with $rc"; fi
done

section "figures"
timeout -k 2 20 "$PY" - "$JSONL" <<'PYEOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if record.get("mode") == "engine":
        rows.append(record)
if not rows:
    print("no measurements"); sys.exit(1)
first = rows[0]
print(f"{first['model']} on {first['device_name']} ({first['dtype']}, {first['input_size']} px, layers {first['layers']}, "
      f"batch {first['batch_size']} pairs, {first['pairs']} pairs per call)")
base = {r["k_colors"]: r["pairs_per_s"] for r in rows if r["variant"] == "baseline" and r.get("pairs_per_s")}
header = (f"{'variant':>10} {'k':>3} {'pairs/s':>8} {'x base':>7} {'peak GiB':>9} {'img/batch':>9} "
          f"{'topk overlap':>12} {'pix corr min':>12} {'sim diff':>9}")
print(header); print("-" * len(header))
def num(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else format("-", ">" + spec.lstrip(">").split(".")[0].rstrip("f"))
for r in rows:
    agreement = r.get("agreement_vs_fp32") or {}
    peak = r["peak_memory_bytes"] / 2**30 if r.get("peak_memory_bytes") is not None else None
    ratio = r["pairs_per_s"] / base[r["k_colors"]] if r.get("pairs_per_s") and base.get(r["k_colors"]) else None
    images = max(r.get("images_per_batch") or [0]) or None
    print(f"{r['variant']:>10} {r['k_colors']:>3} {num(r.get('pairs_per_s'), '>8.2f')} {num(ratio, '>7.2f')} "
          f"{num(peak, '>9.2f')} {num(images, '>9d')} {num(agreement.get('top_k_match_overlap_mean'), '>12.4f')} "
          f"{num(agreement.get('pixel_map_corr_min'), '>12.5f')} {num(agreement.get('similarity_max_abs_diff'), '>9.2e')}")
for k, target in ((10, 20.0), (0, 100.0)):
    fits = [r for r in rows if r["k_colors"] == k and r.get("pairs_per_s")
            and (r.get("peak_memory_bytes") or 0) <= 40 * 2**30]
    if fits:
        best = max(fits, key=lambda r: r["pairs_per_s"])
        verdict = "met" if best["pairs_per_s"] >= target else "MISSED"
        print(f"target k_colors={k}: >= {target:g} pairs/s within 40 GiB: {verdict} "
              f"(best {best['pairs_per_s']:.2f} pairs/s: {best['variant']})")
PYEOF
echo "JSON lines: $JSONL"
echo "total $((SECONDS - START)) s"
