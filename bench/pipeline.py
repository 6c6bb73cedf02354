"""End-to-end pipeline benchmark: ``nightly`` on a synthetic or manta workload.

Prints JSON lines: for the cold run (empty cache and outputs), the warm-cache run (outputs
deleted, activation cache kept) and the rerun (everything skipped): pairs, seconds, pairs/s, the
share of time in decode, engine, render and writes, and the orchestration overhead: flow wall
time against the same work (embed, then the same explain batches) run by calling the task
functions directly in this process, both for the whole run and for the explain fan-out alone.

    python bench/pipeline.py                      # synthetic: 8 individuals, top-3
    python bench/pipeline.py --mantas PATH/TO/mantas
    python bench/pipeline.py --preset miewid      # real size: MiewID architecture, 440 px photos, blocks.3

Each run line carries ``night_share``: the share of the flow's wall time spent in each timed
stage of the explain tasks (decode, engine, render, write) summed over workers, and the rest
(``orchestration_and_other``: embedding, retrieval and stage 1, scheduling, bookkeeping); and
``night_breakdown`` (:func:`night_breakdown`): every phase of the night, embedding, retrieval and
stage 1 included, as shares that sum to 1.

    python bench/pipeline.py --preset miewid --individuals 20 --uploads 1 --top-k 3 --batch-pairs 3 \
        --workers 0 --cold-only                   # the real-size night of docs/performance.md
    python bench/pipeline.py --compare-render 2   # pictures inline against beside the next batch
    python bench/pipeline.py --preset miewid --individuals 20 --uploads 1 --rerank-k 20 --cold-only  # more judged
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def synthetic_workload(folder: Path, individuals: int, size: int, uploads: int | None = None) -> tuple[str, str]:
    """One gallery photo per individual; one upload each for the first ``uploads`` (default: all)."""
    from pairx_core.synthetic import make_individuals, render_photo

    for number, ind in enumerate(make_individuals(individuals, seed=7)):
        (folder / "gallery" / ind.id).mkdir(parents=True, exist_ok=True)
        render_photo(ind, seed=1, size=(size, size)).image.save(folder / "gallery" / ind.id / "a.png")
        (folder / "uploads").mkdir(parents=True, exist_ok=True)
        if uploads is None or number < uploads:
            render_photo(ind, seed=2, size=(size, size)).image.save(folder / "uploads" / f"{ind.id}.png")
    return str(folder / "uploads"), str(folder / "gallery")


#: flow phases timed by the nightly flow (wall seconds in ``stage_seconds``) -> breakdown row
NIGHT_PHASES = {"embed_wall": "embedding", "embeddings_read_wall": "retrieval", "retrieval_wall": "retrieval",
                "stage1_wall": "stage1_rerank", "candidates_wall": "write"}
#: timed stages inside the explain tasks -> breakdown row
EXPLAIN_STAGES = {"decode": "decode", "engine": "engine", "render": "render", "write": "write"}


def night_breakdown(stages: dict[str, float], explain_seconds: float, flow_seconds: float) -> dict[str, float]:
    """Where a night's wall time went, as shares of ``flow_seconds`` (they sum to 1).

    The flow's phases (embedding, retrieval, stage 1, the candidates table) are wall clocks. The
    explain fan-out's wall time is split by the task bodies' timed stages; when workers ran in
    parallel (stage seconds summed over workers exceed the fan-out's wall time) the fan-out's wall
    time is shared out in proportion to them. ``orchestration`` is the rest: flow start, planning,
    scheduling, bookkeeping and the fan-out's time outside the task bodies' stages.
    """
    if not flow_seconds:
        return {}
    seconds: dict[str, float] = {}
    for key, row in NIGHT_PHASES.items():
        seconds[row] = seconds.get(row, 0.0) + stages.get(key, 0.0)
    inside = {row: stages.get(key, 0.0) for key, row in EXPLAIN_STAGES.items()}
    busy = sum(inside.values())
    scale = explain_seconds / busy if busy > explain_seconds > 0 else 1.0
    for row, value in inside.items():
        seconds[row] = seconds.get(row, 0.0) + value * scale
    seconds["orchestration"] = max(0.0, flow_seconds - sum(seconds.values()))
    return {row: round(value / flow_seconds, 3) for row, value in seconds.items()}


def _night_share(stages: dict[str, float], flow_seconds: float) -> dict[str, float] | None:
    """Share of the flow's wall time per timed stage, plus what the stages do not cover."""
    if not flow_seconds:
        return None
    shares = {name: round(value / flow_seconds, 3) for name, value in stages.items()}
    shares["orchestration_and_other"] = round(max(0.0, 1 - sum(stages.values()) / flow_seconds), 3)
    return shares


def compare_render(config, work: Path, rounds: int) -> None:
    """Cold nights with pictures drawn inline and in the background, alternating (same inputs,
    fresh output and cache each); one line per night, then the medians and the gain."""
    import statistics

    from flows.nightly import nightly

    seconds: dict[str, list[float]] = {"inline": [], "background": []}
    flows: dict[str, list[float]] = {"inline": [], "background": []}
    for round_number in range(rounds):
        for mode in ("inline", "background"):
            out = work / f"out-{mode}-{round_number}"
            summary = nightly(config.model_copy(update={"out": str(out), "render_in_background": mode == "background"}))
            stages = summary.get("stage_seconds", {})
            seconds[mode].append(summary.get("explain_seconds", 0.0))
            flows[mode].append(summary["seconds"])
            emit(run="compare_render", mode=mode, round=round_number, pairs=summary["done"],
                 flow_s=summary["seconds"], explain_s=round(summary.get("explain_seconds", 0.0), 2),
                 stage_s={k: round(stages.get(k, 0.0), 2) for k in ("engine", "render", "render_busy")},
                 load_average=[round(v, 2) for v in os.getloadavg()])
            shutil.rmtree(out, ignore_errors=True)
    inline, background = statistics.median(seconds["inline"]), statistics.median(seconds["background"])
    emit(run="compare_render_summary", rounds=rounds, explain_s_inline=round(inline, 2),
         explain_s_background=round(background, 2),
         explain_gain=round(1 - background / inline, 3) if inline else None,
         flow_s_inline=round(statistics.median(flows["inline"]), 2),
         flow_s_background=round(statistics.median(flows["background"]), 2))


def night_config(args: argparse.Namespace, uploads: str, gallery: str, out: Path):
    """The nightly flow's config for this benchmark's options (``--rerank-k`` left out: the flow's default)."""
    from flows.config import NightlyConfig

    options = {} if args.rerank_k is None else {"rerank_k": args.rerank_k}
    return NightlyConfig(uploads=uploads, gallery=gallery, out=str(out), model=args.model, layers=[args.layer],
                         k_colors=args.k_colors, top_k=args.top_k, batch_pairs=args.batch_pairs,
                         workers=args.workers, device="cpu", allow_random_weights=True,
                         render_in_background=not args.render_inline, **options)


def main() -> None:
    """Run the benchmark; one function on purpose: the protocol reads top to bottom."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:efficientnet_b0?size=128")
    parser.add_argument("--layer", default="backbone.blocks.3")
    parser.add_argument("--k-colors", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--rerank-k", type=int, default=None,
                        help="candidates per upload judged by stage 1 (default: the nightly default, 5; 0: none)")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--individuals", type=int, default=8)
    parser.add_argument("--uploads", type=int, default=None,
                        help="uploads tonight (default: one per individual); the gallery keeps all individuals")
    parser.add_argument("--render-inline", action="store_true",
                        help="draw pictures after each engine call, not in a thread beside the next batch")
    parser.add_argument("--compare-render", type=int, default=0, metavar="ROUNDS",
                        help="instead: ROUNDS rounds of two cold nights, pictures drawn after each engine call "
                             "and beside the next batch, alternating; prints the explain fan-out's seconds of each")
    parser.add_argument("--cold-only", action="store_true",
                        help="run only the cold night (no warm-cache run, rerun or direct-call baseline)")
    parser.add_argument("--preset", choices=("miewid",), default=None,
                        help="miewid: miewid-arch (random weights) on 440 px synthetic photos, backbone.blocks.3, "
                             "k_colors=10, 4 individuals, 4 pairs per batch")
    parser.add_argument("--mantas",
                        help="folder with uploads/, gallery/ and manifest.csv (uploads/, gallery/, manifest.csv)")
    args = parser.parse_args()
    photo_size = 128
    if args.preset == "miewid":
        args.model, args.layer, photo_size = "miewid-arch", "backbone.blocks.3", 440
        if args.individuals == parser.get_default("individuals"):
            args.individuals = 4
        if args.batch_pairs == parser.get_default("batch_pairs"):
            args.batch_pairs = 4
    warnings.simplefilter("ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_flush_denormal(True)
    work = Path(tempfile.mkdtemp(prefix="pairx-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    if args.mantas:
        uploads, gallery = str(Path(args.mantas) / "uploads"), str(Path(args.mantas) / "manifest.csv")
    else:
        uploads, gallery = synthetic_workload(work / "data", args.individuals, photo_size, args.uploads)

    from infra.prefect_server import prefect_api
    from flows.nightly import nightly
    from infra.tables import read_table
    from tasks.embed import embed_images
    from tasks.explain import PairItem, RunSettings, explain_pairs_batch

    out = work / "out"
    config = night_config(args, uploads, gallery, out)
    if args.compare_render:
        with prefect_api():
            compare_render(config, work, args.compare_render)
        shutil.rmtree(work, ignore_errors=True)
        return
    flow_seconds, explain_seconds, task_seconds, worker_engine = {}, {}, {}, {}
    with prefect_api():
        for label in ("cold",) if args.cold_only else ("cold", "warm_cache", "rerun"):
            if label == "warm_cache":  # keep the activation cache, drop the results
                for sub in ("tables", "viz"):
                    shutil.rmtree(out / sub, ignore_errors=True)
            started = time.perf_counter()
            summary = nightly(config)
            wall = time.perf_counter() - started
            flow_seconds[label] = summary["seconds"]
            explain_seconds[label] = summary.get("explain_seconds", 0.0)
            stages = summary.get("stage_seconds", {})
            task_seconds[label] = sum(v for k, v in stages.items() if k in EXPLAIN_STAGES)
            worker_engine[label] = stages.get("engine", 0.0)
            busy = task_seconds[label] or 1.0
            emit(run=label, pairs=summary["done"], skipped=summary["skipped"], wall_s=round(wall, 2),
                 flow_s=summary["seconds"], pairs_per_s=round(summary["done"] / wall, 3) if summary["done"] else None,
                 stage_share={k: round(v / busy, 3) for k, v in stages.items() if k in EXPLAIN_STAGES},
                 night_share=_night_share({k: v for k, v in stages.items() if k in EXPLAIN_STAGES},
                                          summary["seconds"]),
                 night_breakdown=night_breakdown(stages, summary.get("explain_seconds", 0.0), summary["seconds"]),
                 stage_s={k: round(v, 2) for k, v in stages.items()},
                 stage1_pairs=summary.get("stage1_pairs"), load_average=[round(v, 2) for v in os.getloadavg()])
    if args.cold_only:
        shutil.rmtree(work, ignore_errors=True)
        return

    # the same work (embed the images, explain the same pairs in the same batches) called directly
    # in this process with an empty cache: the orchestration-free baseline of the cold run.
    # Measured twice in a row (this machine's speed drifts by ~10 % over minutes); the overheads
    # use the mean of both.
    pairs = read_table(str(out), "pairs")
    items = [PairItem(r.pair_id, r.image_0, r.image_1) for r in pairs.drop_duplicates("pair_id").itertuples()]
    images = sorted({i.image_0 for i in items} | {i.image_1 for i in items})
    settings = RunSettings(out=str(work / "direct"), model=args.model, layers=(args.layer,), run_id="direct",
                           k_colors=args.k_colors, device="cpu", render_in_background=not args.render_inline)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))  # as the workers do
    explain_pairs_batch(items[:1], settings)  # warm the model in this process

    def direct_run() -> tuple[float, float, float, float]:
        """Seconds for (embed + explain, explain alone, engine alone, timed stages of the explain
        batches), empty cache and outputs."""
        shutil.rmtree(work / "direct", ignore_errors=True)
        started = time.perf_counter()
        for start in range(0, len(images), 32):
            embed_images(images[start:start + 32], model=args.model, cache_url=str(work / "direct" / "cache"),
                         layers=[args.layer], run_id="direct", out=str(work / "direct"), device="cpu")
        embed_done = time.perf_counter()
        stages = [explain_pairs_batch(items[start:start + args.batch_pairs], settings).seconds
                  for start in range(0, len(items), args.batch_pairs)]
        finished = time.perf_counter()
        return (finished - started, finished - embed_done, sum(s["engine"] for s in stages),
                sum(sum(s.values()) for s in stages))

    runs = [direct_run(), direct_run()]
    direct, direct_explain, engine_s, direct_stages = (sum(values) / len(runs) for values in zip(*runs))
    direct_untimed = direct_explain - direct_stages  # the loop, key and row building outside the stages
    emit(run="direct_tasks", pairs=len(items), wall_s=round(direct, 2),
         wall_s_each=[round(r[0], 2) for r in runs], explain_s=round(direct_explain, 2),
         engine_s=round(engine_s, 2), pairs_per_s=round(len(items) / direct, 3),
         engine_share=round(engine_s / direct, 3),
         orchestration_overhead_cold=round(flow_seconds["cold"] / direct - 1, 3),
         orchestration_overhead_warm_cache=round(flow_seconds["warm_cache"] / direct - 1, 3),
         # the explain fan-out alone: per-batch cost of Prefect tasks on Dask, without the
         # once-per-run worker start, model load and cluster teardown
         explain_overhead_cold=round(explain_seconds["cold"] / direct_explain - 1, 3),
         explain_overhead_warm_cache=round(explain_seconds["warm_cache"] / direct_explain - 1, 3),
         # split of that overhead: (1) the fan-out's time outside the timed stages (decode, engine,
         # render, write) of the task bodies, less the same untimed share of the direct calls:
         # submission, scheduling, Prefect task-run bookkeeping, result transfer; as a share of the
         # direct explain time; (2) the engine's speed inside the worker against this process
         orchestration_gap_cold=round(
             (explain_seconds["cold"] - task_seconds["cold"] - direct_untimed) / direct_explain, 3),
         orchestration_gap_warm_cache=round(
             (explain_seconds["warm_cache"] - task_seconds["warm_cache"] - direct_untimed) / direct_explain, 3),
         worker_engine_vs_direct_cold=round(worker_engine["cold"] / engine_s, 3),
         worker_engine_vs_direct_warm_cache=round(worker_engine["warm_cache"] / engine_s, 3))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
