"""Rows of the output tables, built from what the core computed (the table schemas live in
``infra.tables``).

- :func:`error_row`, :func:`unloadable_pair_row`, :func:`refused_pair_row`: the ``errors`` table;
- :func:`image_rows`, :func:`new_image_rows`: the ``images`` table (one row per name, content and model);
- :func:`candidate_rows`: the ``candidates`` table (a night's re-ranked candidates);
- :func:`decision_row`: the ``decisions`` table (one reviewer decision on one upload: a photo or one
  detection in it);
- :func:`run_row`: the ``runs`` table (one run's summary);
- :func:`explanation_rows`: one explained pair -> its ``pairs`` rows (one per layer) and its
  ``matches`` rows, with match positions in ORIGINAL photo coordinates (EXIF-upright, full
  resolution; :mod:`pairx_core.geometry`'s continuous convention).

Pure functions except :func:`new_image_rows`, which reads what the ``images`` table already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
import json
from typing import Any, Mapping, Protocol, Sequence

from pairx_core.metrics import PlausibilityMetrics
from pairx_core.results import LayerExplanation, PairExplanation
from pairx_core.retrieval import RankedCandidate
from pairx_core.specs import public_spec

from .detections import detection_id
from .images import LoadedImage
from .inputs import PairItem
from .night_items import NightItem
from .redaction import redact_text
from .tables import read_table

__all__ = [
    "RowContext",
    "STAGE1_COLUMNS",
    "candidate_row",
    "candidate_rows",
    "decision_row",
    "error_row",
    "explanation_rows",
    "image_rows",
    "match_rows",
    "new_image_rows",
    "pair_row",
    "query_item_columns",
    "refused_pair_row",
    "run_row",
    "unloadable_pair_row",
]


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------- errors
def error_row(item: str, stage: str, error: BaseException, run_id: str) -> dict:
    """An ``errors`` row; ``content_hash`` is set when the error is about the file's content itself."""
    return {"item": item, "stage": stage, "error_type": type(error).__name__, "message": str(error)[:2000],
            "content_hash": getattr(error, "content_hash", None), "run_id": run_id, "created_at": _now()}


def unloadable_pair_row(pair_id: str, run_id: str) -> dict:
    """The ``errors`` row of a pair skipped because one of its images did not load (that image has
    its own ``load`` row)."""
    return {"item": pair_id, "stage": "explain", "error_type": "InputImageError",
            "message": "an image of this pair could not be loaded (see its own row)",
            "content_hash": None, "run_id": run_id, "created_at": _now()}


def refused_pair_row(pair_id: str, reason: str, run_id: str) -> dict:
    """The ``errors`` row of a pairs-table row refused before any read (a URL or a path outside
    the image root)."""
    return {"item": pair_id, "stage": "input", "error_type": "PathRefused", "message": reason[:2000],
            "content_hash": None, "run_id": run_id, "created_at": _now()}


# ---------------------------------------------------------------------- images
def image_rows(loaded: Sequence[LoadedImage], known: set[tuple[str, str]], run_id: str) -> list[dict]:
    """``images`` rows of the ``(image_uri, content_hash)`` pairs in ``loaded`` not in ``known``.

    One row per name and content: two names of one content are two rows (both names are kept),
    and new bytes under a known name are a new row (both versions are kept).
    """
    known, now, rows = set(known), _now(), []
    for image in loaded:
        identity = (image.uri, image.content_hash)
        if identity in known:
            continue
        known.add(identity)
        rows.append({"image_uri": image.uri, "content_hash": image.content_hash, "width": image.original_size[0],
                     "height": image.original_size[1], "embedded_at": now, "run_id": run_id})
    return rows


def new_image_rows(loaded: Sequence[LoadedImage], out: str, model_id: str, run_id: str,
                   storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """``images`` rows for the (name, content) pairs not yet recorded for ``model_id`` in ``out``.

    Concurrent writers (two batches of one run seeing the same new image) can still both record
    it; ``infra/views.sql``'s ``images`` view keeps the first row per (model_id, image_uri,
    content_hash).
    """
    frame = read_table(out, "images", model_id=model_id, columns=["image_uri", "content_hash"],
                       storage_options=storage_options)
    return image_rows(loaded, set(zip(frame["image_uri"], frame["content_hash"])), run_id)


# ---------------------------------------------------------------------- explanations
@dataclass(frozen=True)
class RowContext:
    """What every row of one batch write shares."""

    run_id: str
    commit_id: str
    model_spec: str
    k_lines: int


def _box_list(box: tuple[float, float, float, float] | None) -> list[float] | None:
    return None if box is None else [float(v) for v in box]


def pair_row(item: PairItem, layer: str, similarity: float, metrics: PlausibilityMetrics, output_key: str,
             viz_uri: str | None, context: RowContext) -> dict:
    """The ``pairs`` row of ``item`` at ``layer``."""
    return {
        "pair_id": item.pair_id, "image_0": item.image_0, "image_1": item.image_1, "layer": layer,
        "similarity": similarity, "n_matches": metrics.n_matches, "residual_px": metrics.residual_px,
        "inliers": metrics.inliers, "irm": metrics.irm, "match_coverage": metrics.match_coverage,
        "relevance_share": metrics.relevance_share, "match_share": metrics.match_share,
        "viz_uri": viz_uri, "box_0": _box_list(item.box_0), "box_1": _box_list(item.box_1),
        "theta_0": item.theta_0, "theta_1": item.theta_1, "model_spec": context.model_spec,
        "run_id": context.run_id, "output_key": output_key, "commit_id": context.commit_id,
    }


def match_rows(pair_id: str, explanation: LayerExplanation, image_0: LoadedImage, image_1: LoadedImage,
               output_key: str, context: RowContext) -> list[dict]:
    """The ``matches`` rows of the top ``k_lines`` matches, ends mapped from model-input
    coordinates to each photo's ORIGINAL coordinates (undoing resize, rotation, crop and any
    reduced-scale decode)."""
    top = explanation.matches.head(context.k_lines)
    xy_0 = image_0.to_original(top[["x_0", "y_0"]].to_numpy(), explanation.input_size)
    xy_1 = image_1.to_original(top[["x_1", "y_1"]].to_numpy(), explanation.input_size)
    return [
        {"pair_id": pair_id, "layer": explanation.layer, "rank": int(row.rank),
         "x_0": float(xy_0[j, 0]), "y_0": float(xy_0[j, 1]), "x_1": float(xy_1[j, 0]), "y_1": float(xy_1[j, 1]),
         "distance": float(row.distance), "relevance": float(row.relevance),
         "output_key": output_key, "commit_id": context.commit_id}
        for j, row in enumerate(top.itertuples(index=False))
    ]


def explanation_rows(item: PairItem, result: PairExplanation, images: tuple[LoadedImage, LoadedImage],
                     metrics: Mapping[str, PlausibilityMetrics], output_keys: Mapping[str, str],
                     viz_uris: Mapping[str, str | None], context: RowContext) -> tuple[list[dict], list[dict]]:
    """``(pairs rows, matches rows)`` of one explained pair, for the layers in ``output_keys``."""
    pairs, matches = [], []
    for layer, key in output_keys.items():
        pairs.append(pair_row(item, layer, result.similarity, metrics[layer], key, viz_uris.get(layer), context))
        matches.extend(match_rows(item.pair_id, result.layers[layer], images[0], images[1], key, context))
    return pairs, matches


# ---------------------------------------------------------------------- candidates
#: stage-1 metrics a re-ranked night copies into the candidates table (null otherwise)
STAGE1_COLUMNS = ("n_matches", "inliers", "residual_px", "match_coverage", "relevance_share", "match_share")
#: columns that say which upload item a row ranks beyond its name (:func:`query_item_columns`)
_QUERY_ITEM_COLUMNS = ("query_hash", "query_detection", "query_detection_id", "query_box", "detection_conf",
                       "species")


def query_item_columns(item: NightItem, content: str, pixel_box: Sequence[float] | None) -> dict:
    """The ``candidates`` columns that say which upload item a row ranks: ``query`` (the photo's
    URL), its content hash, detection (index and stable id), crop box in original pixels
    (``pixel_box``; None: the whole photo), detector confidence and species."""
    detection = item.detection
    return {"query": item.uri, "query_hash": content, "query_detection": detection,
            "query_detection_id": None if detection is None else detection_id(content, detection, item.box),
            "query_box": _box_list(pixel_box), "detection_conf": item.conf, "species": item.species}


def candidate_row(ranked: RankedCandidate, model_spec: str | None, *, retrieval_rank: int | None = None,
                  explained: bool | None = None, stage1: Mapping[str, Any] | None = None) -> dict:
    """The ``candidates`` row of one re-ranked candidate.

    ``model_spec`` is stored without credentials. ``retrieval_rank``, ``explained`` and ``stage1``
    (metrics by column name) only on a re-ranked night. The upload item's columns
    (:func:`query_item_columns`), ``gallery_source`` and ``top_k`` are null until the night fills them in.
    """
    candidate, outcome, stage1 = ranked.candidate, ranked.outcome, stage1 or {}
    return {
        "query": candidate.query, "rank": ranked.rank, "gallery_image": candidate.gallery_image,
        "individual": candidate.individual or None, "similarity": float(candidate.similarity), "irm": ranked.irm,
        "rerank_score": float(ranked.score), "pair_id": candidate.pair_id,
        "layer": outcome.layer if outcome else None, "viz_uri": outcome.viz_uri if outcome else None,
        "output_key": outcome.output_key if outcome else None,
        "model_spec": None if model_spec is None else public_spec(model_spec),
        "retrieval_rank": retrieval_rank, "explained": explained, "top_k": None,
        **{column: stage1.get(column) for column in STAGE1_COLUMNS},
        **dict.fromkeys(_QUERY_ITEM_COLUMNS),
        "gallery_source": None,
    }


def candidate_rows(ranked: Sequence[RankedCandidate], model_spec: str | None, *,
                   retrieval_rank: Mapping[str, int] | None = None, explained: set[str] | None = None,
                   stage1: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """``candidates`` rows of :func:`pairx_core.retrieval.rank_candidates`'s result, in its order.

    A re-ranked night gives ``retrieval_rank`` (by pair id), ``explained`` (pair ids explained in
    full) and ``stage1`` (metrics by pair id); without them those columns are null.
    """
    reranked = retrieval_rank is not None
    rows = []
    for entry in ranked:
        pair = entry.candidate.pair_id
        rows.append(candidate_row(
            entry, model_spec, retrieval_rank=retrieval_rank[pair] if reranked else None,
            explained=(pair in (explained or set())) if reranked else None,
            stage1=(stage1 or {}).get(pair)))
    return rows


# ---------------------------------------------------------------------- decisions
def decision_row(*, decision_id: str, query: str, content_hash: str | None, box: Sequence[float] | None,
                 detection_id: str | None, decision: str, individual: str | None,
                 candidate: Mapping[str, Any] | None, model_id: str, night_run_id: str, reviewer: str,
                 decided_at: datetime, supersedes: str | None, note: str | None, run_id: str) -> dict:
    """The ``decisions`` row of one decision; ``candidate`` is the accepted ``candidates`` row (its
    ``gallery_image``, ``rank``, ``retrieval_rank``, ``similarity``, ``irm``, ``rerank_score``) or None."""
    chosen = candidate or {}
    return {
        "decision_id": decision_id, "query": query, "content_hash": content_hash, "box": _box_list(box),
        "detection_id": detection_id,
        "decision": decision, "individual": individual, "gallery_image": chosen.get("gallery_image"),
        "rank": chosen.get("rank"), "retrieval_rank": chosen.get("retrieval_rank"),
        "similarity": chosen.get("similarity"), "irm": chosen.get("irm"), "rerank_score": chosen.get("rerank_score"),
        "model_id": model_id, "night_run_id": night_run_id, "reviewer": reviewer, "decided_at": decided_at,
        "supersedes": supersedes, "note": note, "run_id": run_id, "created_at": _now(),
    }


# ---------------------------------------------------------------------- runs
class RunFacts(Protocol):
    """What a run gathered about itself (``flows.run_record.FlowSummary`` has these)."""

    run_id: str
    status: str
    error: str | None
    done: int
    skipped: int
    failed: int
    seconds: float
    workers: set[str]
    model_facts: dict[str, Any]
    cache: dict[str, int]
    repaired_files: int
    planned: dict[str, Any]


def run_row(flow: str, parameters: Mapping[str, Any], run: RunFacts, started: datetime, finished: datetime,
            n_retries: int) -> dict:
    """The ``runs`` row of one run; ``parameters``: the config as stored (JSON-able, no storage
    options); ``n_retries``: storage retries the run made. Credentials are removed from the
    parameters and the error text."""
    facts, frames = run.model_facts, run.planned.get("frames") or {}
    return {
        "run_id": run.run_id, "flow": flow,
        "parameters": redact_text(json.dumps(dict(parameters), sort_keys=True)),
        "status": run.status, "error": redact_text(run.error) if run.error else None,
        "n_done": run.done, "n_skipped": run.skipped, "n_failed": run.failed,
        "duration_s": run.seconds, "started_at": started, "finished_at": finished,
        "model_spec": facts.get("model_spec"), "weights_digest": facts.get("weights_digest"),
        "random_weights": facts.get("random_weights"), "workers": sorted(run.workers),
        "cache_hits": run.cache["hits"], "cache_misses": run.cache["misses"], "cache_damaged": run.cache["damaged"],
        "n_repaired_files": run.repaired_files,
        "n_unsupported": sum(run.planned.get("unsupported", {}).values()),
        **{column: frames.get(column) for column in ("n_frames", "n_empty", "n_detections")},
        "n_retries": n_retries,
    }
