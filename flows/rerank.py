"""Two-stage re-ranking for the nightly flow.

Stage 1: every upload's ``rerank_k`` most similar gallery images are judged from the activation
cache (``tasks.stage1``: relevance at the layer, mutual matches, IRM; no pixel maps, no decode,
nothing below the layer). The candidates are re-ranked by ``rerank_score``.
Stage 2: only the ``top_k`` best of each upload are explained in full (pixel maps, pictures) by
the usual explain tasks. The ``candidates`` table keeps all ``rerank_k`` rows, with their stage-1
metrics, retrieval rank, final rank and whether they were explained in full.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from infra.inputs import PairItem, derive_pair_id
from infra.keys import OutputSettings
from infra.records import candidate_rows
from pairx_core.retrieval import Candidate, PairOutcome, best_reranked, rank_candidates, retrieve
from tasks.candidates import candidate_keys, explained_outcomes, once_per_key
from tasks.stage1 import Stage1Pair, Stage1Settings, stage1_batch_task

from .common import FlowSummary, chunks, notify

#: pairs per stage-1 task (one forward and one backward of the upper network for 2x this many rows)
STAGE1_BATCH_PAIRS = 40


@dataclass
class Reranked:
    """What stage 1 decided: the pairs to explain in full and the facts for the candidates rows."""

    items: list[PairItem]
    candidates: list[Candidate]
    retrieval_rank: dict[str, int]
    metrics: dict[str, dict]
    explained: set[str]
    #: output key at the ranking layer by pair id
    keys: dict[str, str]


def stage1_rerank(config, layer: str, candidates: Sequence[Candidate], hashes: Mapping[str, str],
                  summary: FlowSummary, annotations: dict,
                  pair_items: Mapping[str, PairItem] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Stage 1 for every candidate as Dask tasks; returns metrics by pair id and the pair ids to
    explain in full (each upload's ``top_k`` best by ``rerank_score``). ``hashes``: cache key by
    name; ``pair_items``: each candidate's photos and crops (default: the names are whole photos)."""
    import dask
    from prefect.futures import as_completed

    settings = Stage1Settings(model=config.model, cache_url=config.cache_url, layer=layer, k_lines=config.k_lines,
                              device=config.device, storage_options=config.storage_options or None,
                              min_image_side=config.min_image_side)
    items = pair_items or {}
    pairs = []
    for c in candidates:
        item = items.get(c.pair_id) or PairItem(c.pair_id, c.query, c.gallery_image)
        pairs.append(Stage1Pair(c.pair_id, item.image_0, hashes[c.query], item.image_1, hashes[c.gallery_image],
                                item.box_0, item.box_1, item.theta_0, item.theta_1))
    started = time.perf_counter()
    summary.advance("stage1", planned=len(pairs))
    with dask.annotate(**annotations) if annotations else contextlib.nullcontext():
        futures = [stage1_batch_task.submit(batch, settings) for batch in chunks(pairs, STAGE1_BATCH_PAIRS)]
    metrics: dict[str, dict] = {}
    for future in as_completed(futures):
        result = future.result()
        metrics.update(result.metrics)
        for stage, seconds in result.seconds.items():
            summary.stage_seconds[f"stage1_{stage}"] = summary.stage_seconds.get(f"stage1_{stage}", 0.0) + seconds
        summary.planned["stage1_decoded"] = summary.planned.get("stage1_decoded", 0) + result.images_decoded
        summary.cache["damaged"] += result.cache_damaged
        summary.advance("stage1", len(result.metrics))
        notify(summary)
    summary.stage_seconds["stage1_wall"] = summary.stage_seconds.get("stage1_wall", 0.0) + time.perf_counter() - started
    return metrics, best_reranked(candidates, {pid: m.get("irm") for pid, m in metrics.items()}, config.top_k)


def plan_reranked(config, layer: str, query_matrix: np.ndarray, gallery_matrix: np.ndarray,
                  query_uris: Sequence[str], gallery_uris: Sequence[str], gallery: Mapping[str, str | None],
                  hashes: Mapping[str, str], summary: FlowSummary, annotations: dict,
                  key_settings: OutputSettings, contents: Mapping[str, str] | None = None,
                  make_item: Callable[[Candidate], PairItem] | None = None) -> Reranked:
    """Retrieve ``rerank_k`` per upload, run stage 1, choose the ``top_k`` to explain in full
    (each output key once: two names of one content are one explanation).

    ``hashes``: activation-cache key by item name; ``contents``: content hash by item name
    (default: ``hashes``, whole photos); ``make_item``: the pair to explain for a candidate
    (default: its two whole photos).
    """
    started = time.perf_counter()
    candidates, ranks = retrieve(query_matrix, gallery_matrix, query_uris, gallery_uris, gallery, config.rerank_k,
                                 derive_pair_id)
    if make_item is None:
        def make_item(c: Candidate) -> PairItem:
            return PairItem(c.pair_id, c.query, c.gallery_image, individual_1=c.individual)
    pair_items = {c.pair_id: make_item(c) for c in candidates}
    keys = candidate_keys(candidates, contents or hashes, key_settings, layer, pair_items)
    summary.stage_seconds["retrieval_wall"] = (summary.stage_seconds.get("retrieval_wall", 0.0)
                                               + time.perf_counter() - started)
    metrics, chosen = stage1_rerank(config, layer, candidates, hashes, summary, annotations, pair_items)
    items = [pair_items[pid] for pid in chosen]
    return Reranked(once_per_key(items, keys), candidates, ranks, metrics, set(chosen), keys)


def reranked_rows(out: str, model_id: str, model_spec: str, layer: str, plan: Reranked,
                  storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """``candidates`` rows: all ``rerank_k`` per upload, ranked by stage-1 ``rerank_score``.

    Explained rows carry the picture and output key of their full explanation (this run's or an
    earlier run's, read back from ``pairs``).
    """
    explained = explained_outcomes(out, model_id, layer, {plan.keys[pid] for pid in plan.explained}, storage_options)
    outcomes = {}
    for candidate in plan.candidates:
        found = explained.get(plan.keys[candidate.pair_id]) if candidate.pair_id in plan.explained else None
        outcomes[candidate.pair_id] = PairOutcome(
            layer=layer, irm=(plan.metrics.get(candidate.pair_id) or {}).get("irm"),
            viz_uri=found.viz_uri if found else None, output_key=found.output_key if found else None)
    return candidate_rows(rank_candidates(plan.candidates, outcomes), model_spec,
                          retrieval_rank=plan.retrieval_rank, explained=plan.explained, stage1=plan.metrics)
