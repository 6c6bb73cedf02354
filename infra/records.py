"""Rows of the output tables, built from what the core computed (the table schemas live in
``infra.tables``).

- :func:`error_row`, :func:`unloadable_pair_row`, :func:`refused_pair_row`: the ``errors`` table;
- :func:`image_rows`, :func:`new_image_rows`: the ``images`` table (one row per name, content and model);
- :func:`decision_row`: the ``decisions`` table (one reviewer decision on one upload);
- :func:`explanation_rows`: one explained pair -> its ``pairs`` rows (one per layer) and its
  ``matches`` rows, with match positions in ORIGINAL photo coordinates (EXIF-upright, full
  resolution; :mod:`pairx_core.geometry`'s continuous convention).

Pure functions except :func:`new_image_rows`, which reads what the ``images`` table already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from pairx_core.metrics import PlausibilityMetrics
from pairx_core.results import LayerExplanation, PairExplanation

from .images import LoadedImage
from .inputs import PairItem
from .tables import read_table

__all__ = [
    "RowContext",
    "decision_row",
    "error_row",
    "explanation_rows",
    "image_rows",
    "match_rows",
    "new_image_rows",
    "pair_row",
    "refused_pair_row",
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


# ---------------------------------------------------------------------- decisions
def decision_row(*, decision_id: str, query: str, content_hash: str | None, box: Sequence[float] | None,
                 decision: str, individual: str | None, candidate: Mapping[str, Any] | None, model_id: str,
                 night_run_id: str, reviewer: str, decided_at: datetime, supersedes: str | None,
                 note: str | None, run_id: str) -> dict:
    """The ``decisions`` row of one decision; ``candidate`` is the accepted ``candidates`` row (its
    ``gallery_image``, ``rank``, ``retrieval_rank``, ``similarity``, ``irm``, ``rerank_score``) or None."""
    chosen = candidate or {}
    return {
        "decision_id": decision_id, "query": query, "content_hash": content_hash, "box": _box_list(box),
        "decision": decision, "individual": individual, "gallery_image": chosen.get("gallery_image"),
        "rank": chosen.get("rank"), "retrieval_rank": chosen.get("retrieval_rank"),
        "similarity": chosen.get("similarity"), "irm": chosen.get("irm"), "rerank_score": chosen.get("rerank_score"),
        "model_id": model_id, "night_run_id": night_run_id, "reviewer": reviewer, "decided_at": decided_at,
        "supersedes": supersedes, "note": note, "run_id": run_id, "created_at": _now(),
    }
