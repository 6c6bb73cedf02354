"""Two-stage re-ranking for the nightly flow.

Each upload's ``rerank_k`` most similar gallery images are ranked by ``rerank_score``
(similarity and IRM), and every candidate that ends in the upload's final ``top_k`` is explained
in full (pixel maps, pictures). The IRM of a candidate comes from whichever computation reaches
it first, and no pair is judged twice:

1. the ``top_k`` most similar candidates are explained in full at once (their explanations give
   their IRM and plausibility metrics: stage 1 would compute exactly the same numbers, then the
   engine again);
2. stage 1 judges the other ``rerank_k - top_k`` from the activation cache (``tasks.stage1``:
   relevance at the layer, mutual matches, IRM; no pixel maps, no decode, nothing below the layer);
3. the candidates are re-ranked; one that stage 1 lifted into the final ``top_k`` is explained in
   full too. A candidate it displaced keeps its explanation (``explained`` is true, its rank is
   ``top_k`` or more).

The ``candidates`` table keeps all ``rerank_k`` rows with their metrics (from stage 1 or from the
full explanation), retrieval rank, final rank and whether they were explained in full.
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
from tasks.candidates import candidate_keys, explained_metrics, explained_outcomes, once_per_key
from tasks.stage1 import Stage1Pair, Stage1Settings, stage1_batch_task

from .common import FlowSummary, chunks, notify

#: pairs per stage-1 task (one forward and one backward of the upper network for 2x this many rows)
STAGE1_BATCH_PAIRS = 40


@dataclass
class Reranked:
    """What re-ranking decided: the pairs still to explain in full and the facts for the candidates rows."""

    #: candidates lifted into the final top_k by stage 1, not explained yet
    items: list[PairItem]
    candidates: list[Candidate]
    retrieval_rank: dict[str, int]
    #: metrics at the ranking layer by pair id: from stage 1 or from the full explanation
    metrics: dict[str, dict]
    #: pair ids explained in full: the top_k most similar and those lifted
    explained: set[str]
    #: output key at the ranking layer by pair id
    keys: dict[str, str]
    #: pair ids judged by stage 1
    judged: list[str]


def stage1_rerank(config, layer: str, candidates: Sequence[Candidate], hashes: Mapping[str, str],
                  summary: FlowSummary, annotations: dict,
                  pair_items: Mapping[str, PairItem] | None = None) -> dict[str, dict]:
    """Stage 1 for ``candidates`` as Dask tasks; returns their metrics by pair id (similarity and
    the plausibility metrics). ``hashes``: cache key by name; ``pair_items``: each candidate's
    photos and crops (default: the names are whole photos)."""
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
    return metrics


def plan_reranked(config, layer: str, query_matrix: np.ndarray, gallery_matrix: np.ndarray,
                  query_uris: Sequence[str], gallery_uris: Sequence[str], gallery: Mapping[str, str | None],
                  hashes: Mapping[str, str], summary: FlowSummary, annotations: dict,
                  key_settings: OutputSettings, explain: Callable[[list[PairItem]], None],
                  contents: Mapping[str, str] | None = None,
                  make_item: Callable[[Candidate], PairItem] | None = None) -> Reranked:
    """Retrieve ``rerank_k`` per upload, explain the ``top_k`` most similar in full (``explain``),
    judge the rest with stage 1 and choose the final ``top_k`` (module docstring). Returns the
    candidates still to explain in full (``items``: lifted by stage 1, each output key once).

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
    first = [c for c in candidates if ranks[c.pair_id] < config.top_k]
    explain(once_per_key([pair_items[c.pair_id] for c in first], keys))
    metrics = explained_metrics(config.out, key_settings.model_id, layer, {c.pair_id: keys[c.pair_id] for c in first},
                                config.storage_options or None)
    judged = [c for c in candidates if ranks[c.pair_id] >= config.top_k]
    metrics |= stage1_rerank(config, layer, judged, hashes, summary, annotations, pair_items)
    chosen = best_reranked(candidates, {pid: m.get("irm") for pid, m in metrics.items()}, config.top_k)
    lifted = [pair_items[pid] for pid in chosen if ranks[pid] >= config.top_k]
    explained = {c.pair_id for c in first} | set(chosen)
    return Reranked(once_per_key(lifted, keys), candidates, ranks, metrics, explained, keys,
                    [c.pair_id for c in judged])


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
