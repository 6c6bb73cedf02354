"""Two-stage re-ranking against full explanations: seconds and ground truth.

A night of N synthetic uploads against a gallery of synthetic photos (known individuals), with
the task functions called directly in this process (no Prefect, no Dask: the figures compare
the work, not the orchestration). After embedding everything into the activation cache:

- ``top3``: today's night: explain each upload's top-k by similarity in full;
- ``full_all``: explain all ``rerank_k`` candidates in full (pixel maps, pictures);
- ``two_stage``: stage 1 for ``rerank_k`` from the cache, full explanation of the top-k after
  re-ranking (the night's order until 2026-12-05);
- ``explain_first``: the night's order now: the top-k by similarity explained in full (the
  ``top3`` mode's work), stage 1 for the other ``rerank_k - top_k``, full explanation of those
  the re-ranking lifts into the top-k. Same final ranking as ``two_stage``.

Prints JSON lines with wall and engine seconds per mode, the ratios, and how often the true
individual is in the final top-k (and at rank 0) with re-ranking over ``rerank_k`` vs over the
top-k only.

    python bench/rerank.py                               # demo model, 40 individuals, 10 uploads
    python bench/rerank.py --uploads 40 --individuals 100 --gallery-photos 2
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


def main() -> None:
    """Run the benchmark; one function on purpose: the protocol reads top to bottom."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--layer", default=None, help="default: the demo model's layer")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--individuals", type=int, default=40)
    parser.add_argument("--gallery-photos", type=int, default=2)
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--k-colors", type=int, default=10)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--depths", default="5,10",
                        help="also report the top-k hit rate when re-ranking only the first D candidates by "
                             "similarity (comma-separated; from the same stage-1 results)")
    parser.add_argument("--skip-full", action="store_true",
                        help="skip explaining all rerank_k candidates in full (the slowest mode)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from infra.inputs import derive_pair_id
    from pairx_core.models import demo_default_layer
    from infra.records import candidate_rows
    from pairx_core.retrieval import Candidate, PairOutcome, rank_candidates, top_k
    from pairx_core.synthetic import make_individuals, render_photo
    from infra.cache import activation_cache
    from tasks.embed import embed_images
    from tasks.explain import PairItem, RunSettings, explain_pairs_batch
    from infra.model_runtime import get_model
    from tasks.stage1 import Stage1Pair, Stage1Settings, stage1_pairs

    def ranked_rows(pairs, found):
        return candidate_rows(rank_candidates(pairs, found), None)

    torch.set_flush_denormal(True)
    layer = args.layer or demo_default_layer()
    work = Path(tempfile.mkdtemp(prefix="pairx-rerank-"))
    owner: dict[str, str] = {}
    gallery, uploads = [], []
    for i, ind in enumerate(make_individuals(args.individuals, args.seed)):
        for n in range(args.gallery_photos):
            path = work / "gallery" / ind.id / f"{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_photo(ind, seed=args.seed * 100 + n, size=(args.size, args.size)).image.save(path)
            gallery.append(str(path))
            owner[str(path)] = ind.id
        if i < args.uploads:
            path = work / "uploads" / f"{ind.id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_photo(ind, seed=args.seed * 100 + 99, size=(args.size, args.size)).image.save(path)
            uploads.append(str(path))
            owner[str(path)] = ind.id
    cache_url = str(work / "cache")
    loaded = get_model(args.model, "cpu")
    started = time.perf_counter()
    hashes = {}
    images = gallery + uploads
    for start in range(0, len(images), 32):
        hashes.update(embed_images(images[start:start + 32], model=args.model, cache_url=cache_url, layers=[layer],
                                   run_id="bench", out=str(work / "embed"), device="cpu").hashes)
    embed_s = time.perf_counter() - started
    cache = activation_cache(cache_url, loaded.fingerprint, loaded.preprocessing.fingerprint(), [layer])
    order, scores = top_k(cache.get_embeddings([hashes[u] for u in uploads]),
                          cache.get_embeddings([hashes[g] for g in gallery]), args.rerank_k)
    candidates = [Candidate(u, gallery[gi], float(s), derive_pair_id(u, gallery[gi]), owner[gallery[gi]])
                  for qi, u in enumerate(uploads) for gi, s in zip(order[qi], scores[qi])]
    emit(run="setup", uploads=len(uploads), gallery=len(gallery), layer=layer, model=args.model,
         pairs_stage1=len(candidates), embed_s=round(embed_s, 2), threads=torch.get_num_threads())

    def settings(name: str) -> RunSettings:
        return RunSettings(out=str(work / name), model=args.model, layers=(layer,), run_id=name,
                           k_colors=args.k_colors, device="cpu")

    def explain(pairs: list[Candidate], name: str) -> tuple[float, float]:
        items = [PairItem(c.pair_id, c.query, c.gallery_image, individual_1=c.individual) for c in pairs]
        started, engine = time.perf_counter(), 0.0
        for start in range(0, len(items), args.batch_pairs):
            engine += explain_pairs_batch(items[start:start + args.batch_pairs], settings(name)).seconds["engine"]
        return time.perf_counter() - started, engine

    s1_settings = Stage1Settings(model=args.model, cache_url=cache_url, layer=layer)

    def stage1(pairs: list[Candidate]) -> tuple[float, float, dict]:
        todo = [Stage1Pair(c.pair_id, c.query, hashes[c.query], c.gallery_image, hashes[c.gallery_image])
                for c in pairs]
        started, engine, metrics = time.perf_counter(), 0.0, {}
        for start in range(0, len(todo), 40):
            result = stage1_pairs(todo[start:start + 40], s1_settings)
            engine += result.seconds["engine"]
            metrics.update(result.metrics)
        return time.perf_counter() - started, engine, metrics

    # warm up both paths (first calls in a process are much slower)
    explain(candidates[:2], "warmup")
    stage1(candidates[:2])
    shutil.rmtree(work / "warmup", ignore_errors=True)

    by_query: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_query.setdefault(c.query, []).append(c)
    top_by_similarity = [c for mine in by_query.values() for c in mine[:args.top_k]]

    top3_wall, top3_engine = explain(top_by_similarity, "top3")
    emit(run="top3", pairs=len(top_by_similarity), wall_s=round(top3_wall, 2), engine_s=round(top3_engine, 2))
    full_wall = full_engine = None
    if not args.skip_full:
        full_wall, full_engine = explain(candidates, "full_all")
        emit(run="full_all", pairs=len(candidates), wall_s=round(full_wall, 2), engine_s=round(full_engine, 2))
    s1_wall, s1_engine, metrics = stage1(candidates)
    outcomes = {pid: PairOutcome(layer, irm=m.get("irm")) for pid, m in metrics.items()}
    reranked = ranked_rows(candidates, outcomes)
    chosen = {row["pair_id"] for row in reranked if row["rank"] < args.top_k}
    s2_wall, s2_engine = explain([c for c in candidates if c.pair_id in chosen], "two_stage")
    two_wall, two_engine = s1_wall + s2_wall, s1_engine + s2_engine
    emit(run="two_stage", pairs_stage1=len(candidates), pairs_stage2=len(chosen), stage1_wall_s=round(s1_wall, 2),
         stage1_engine_s=round(s1_engine, 2), stage2_wall_s=round(s2_wall, 2), stage2_engine_s=round(s2_engine, 2),
         wall_s=round(two_wall, 2), engine_s=round(two_engine, 2))
    first_ids = {c.pair_id for c in top_by_similarity}
    rest = [c for c in candidates if c.pair_id not in first_ids]
    rest_wall, rest_engine, _ = stage1(rest)
    lifted = [c for c in candidates if c.pair_id in chosen - first_ids]
    lifted_wall, lifted_engine = explain(lifted, "lifted") if lifted else (0.0, 0.0)
    emit(run="explain_first", pairs_first=len(top_by_similarity), pairs_stage1=len(rest), pairs_lifted=len(lifted),
         stage1_wall_s=round(rest_wall, 2), lifted_wall_s=round(lifted_wall, 2),
         wall_s=round(top3_wall + rest_wall + lifted_wall, 2),
         engine_s=round(top3_engine + rest_engine + lifted_engine, 2))
    again_wall, again_engine = explain(top_by_similarity, "top3_again")  # the machine drifts: measure it twice
    emit(run="top3_again", pairs=len(top_by_similarity), wall_s=round(again_wall, 2), engine_s=round(again_engine, 2))
    top3_wall, top3_engine = (top3_wall + again_wall) / 2, (top3_engine + again_engine) / 2
    emit(run="ratios", two_stage_over_full_wall=round(two_wall / full_wall, 3) if full_wall else None,
         two_stage_over_full_engine=round(two_engine / full_engine, 3) if full_engine else None,
         two_stage_over_top3_wall=round(two_wall / top3_wall, 3),
         two_stage_over_top3_engine=round(two_engine / top3_engine, 3))

    # ground truth: the true individual in the final top-k, re-ranking over rerank_k vs over top-k
    top3_rows = ranked_rows(top_by_similarity, outcomes)
    def hits(rows: list[dict], depth: int) -> float:
        found = {q: False for q in uploads}
        for row in rows:
            if row["rank"] < depth and row["individual"] == owner[row["query"]]:
                found[row["query"]] = True
        return float(np.mean(list(found.values())))

    in_gallery = np.mean([any(owner[g] == owner[u] for g in gallery) for u in uploads])
    emit(run="ground_truth", uploads=len(uploads), true_in_gallery=float(in_gallery),
         true_in_retrieved=hits([{**r, "rank": 0} for r in ranked_rows(candidates, {})], 1),
         top_k_hit_rerank_over_k=hits(reranked, args.top_k), top_k_hit_rerank_over_top_k=hits(top3_rows, args.top_k),
         rank0_hit_rerank_over_k=hits(reranked, 1), rank0_hit_rerank_over_top_k=hits(top3_rows, 1),
         rank0_hit_similarity=hits(ranked_rows(candidates, {}), 1),
         irm_defined_share=round(float(np.mean([m.get("irm") is not None for m in metrics.values()])), 3))
    # a pair's stage-1 metrics do not depend on the other candidates: re-ranking only the first D by
    # similarity is the same ranking restricted to those rows
    retrieval_rank = {c.pair_id: rank for mine in by_query.values() for rank, c in enumerate(mine)}
    by_depth = {}
    for depth in sorted({int(d) for d in args.depths.split(",") if d.strip()} | {args.top_k, args.rerank_k}):
        rows = ranked_rows([c for mine in by_query.values() for c in mine[:depth]], outcomes)
        # explaining the top-k by similarity first: a candidate re-ranked into the top-k from further
        # down costs one more explanation
        lifted_per_upload = sum(row["rank"] < args.top_k and retrieval_rank[row["pair_id"]] >= args.top_k
                                for row in rows) / len(uploads)
        by_depth[str(depth)] = {"top_k_hit": hits(rows, args.top_k), "rank0_hit": hits(rows, 1),
                                "lifted_per_upload": round(lifted_per_upload, 3)}
    emit(run="ground_truth_by_depth", uploads=len(uploads), top_k=args.top_k, depths=by_depth)

    # float16 cache: what storing the layer in half precision would change (first 40 pairs)
    from pairx_core import ExplainConfig
    from pairx_core.metrics import plausibility
    from pairx_core.stage1 import stage1 as run_stage1

    sample = candidates[:40]
    unique = list(dict.fromkeys(hashes[x] for c in sample for x in (c.query, c.gallery_image)))
    index = [(unique.index(hashes[c.query]), unique.index(hashes[c.gallery_image])) for c in sample]
    exact = torch.from_numpy(cache.get_features(unique, layer))
    config = ExplainConfig(k_colors=0)
    results = {name: run_stage1(loaded.model, acts, index, layer, loaded.preprocessing.size, config)
               for name, acts in (("float32", exact), ("float16", exact.half().float()))}
    same_top, irm_diff, rank_flips = [], [], 0
    for a, b in zip(results["float32"], results["float16"]):
        la, lb = a.layers[layer], b.layers[layer]
        cols = ["row_0", "col_0", "row_1", "col_1"]
        same_top.append(la.matches[cols].head(20).reset_index(drop=True).equals(lb.matches[cols].head(20).reset_index(drop=True)))
        ia, ib = plausibility(la).irm, plausibility(lb).irm
        if ia is not None and ib is not None:
            irm_diff.append(abs(ia - ib))
        elif (ia is None) != (ib is None):
            rank_flips += 1
    emit(run="float16_cache_effect", pairs=len(sample), top20_matches_identical=round(float(np.mean(same_top)), 3),
         irm_abs_diff_max=round(max(irm_diff), 4) if irm_diff else None,
         irm_abs_diff_mean=round(float(np.mean(irm_diff)), 5) if irm_diff else None, irm_defined_changed=rank_flips)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
