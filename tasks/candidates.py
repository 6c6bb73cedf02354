"""The ``candidates`` rows of a night: retrieved pairs re-ranked with what their explanations gave.

Candidates meet their explanations by ``output_key``, never by ``pair_id``: two names of one
content (an upload copied under a second name, a gallery photo filed under two individuals) give
different pair ids but one key, and are explained once (:func:`once_per_key`); every candidate of
that content points to the one explanation.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from infra.inputs import PairItem
from infra.keys import OutputSettings
from infra.records import STAGE1_COLUMNS
from infra.records import candidate_rows as build_candidate_rows
from infra.tables import read_table
from pairx_core.retrieval import Candidate, PairOutcome, rank_candidates


def candidate_keys(candidates: Sequence[Candidate], hashes: Mapping[str, str], settings: OutputSettings,
                   layer: str, pair_items: Mapping[str, PairItem] | None = None) -> dict[str, str]:
    """Per pair id, the output key at ``layer`` its explanation has.

    ``hashes``: content hash by the candidates' ``query`` / ``gallery_image`` names;
    ``pair_items``: the pair each candidate explains (crop boxes, rotations) by pair id, when
    not the two whole photos.
    """
    def item(c: Candidate) -> PairItem:
        return (pair_items or {}).get(c.pair_id) or PairItem(c.pair_id, c.query, c.gallery_image)

    return {c.pair_id: settings.output_keys(item(c), hashes[c.query], hashes[c.gallery_image])[layer]
            for c in candidates}


def once_per_key(items: Sequence[PairItem], keys: Mapping[str, str]) -> list[PairItem]:
    """``items`` without those whose output key (``keys`` by pair id) an earlier item has."""
    seen: set[str] = set()
    unique = []
    for item in items:
        if keys[item.pair_id] not in seen:
            seen.add(keys[item.pair_id])
            unique.append(item)
    return unique


def _first_rows(out: str, model_id: str, layer: str, output_keys: set[str], columns: Sequence[str],
                storage_options: Mapping[str, Any] | None) -> dict[str, dict]:
    """Per output key, ``columns`` of the first committed ``pairs`` row of ``model_id`` at ``layer``
    (this run's or an earlier one's) with that key; NaN read as None."""
    if not output_keys:
        return {}
    frame = read_table(out, "pairs", [("layer", "==", layer)], model_id=model_id,
                       columns=list(dict.fromkeys(["output_key", "created_at", *columns])),
                       storage_options=storage_options)
    frame = frame[frame["output_key"].isin(output_keys)].sort_values("created_at", kind="stable")
    rows: dict[str, dict] = {}
    for row in frame.to_dict("records"):  # the first commit of a key wins
        rows.setdefault(row["output_key"], {name: _defined(row[name]) for name in columns})
    return rows


def _defined(value: Any) -> Any:
    """None for a missing or NaN table value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def explained_outcomes(out: str, model_id: str, layer: str, output_keys: set[str],
                       storage_options: Mapping[str, Any] | None = None) -> dict[str, PairOutcome]:
    """Per output key, the outcome of its first committed ``pairs`` row at ``layer``."""
    rows = _first_rows(out, model_id, layer, output_keys, ["layer", "irm", "viz_uri"], storage_options)
    return {key: PairOutcome(layer=row["layer"], irm=None if row["irm"] is None else float(row["irm"]),
                             viz_uri=row["viz_uri"] or None, output_key=key) for key, row in rows.items()}


def explained_metrics(out: str, model_id: str, layer: str, keys: Mapping[str, str],
                      storage_options: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """By pair id, the IRM and plausibility metrics (``infra.records.STAGE1_COLUMNS``) of its full
    explanation at ``layer``, as stage 1 reports them; ``keys``: output key by pair id. The first
    committed ``pairs`` row of a key wins; a pair without one (its explanation failed) is left out."""
    rows = _first_rows(out, model_id, layer, set(keys.values()), ["irm", *STAGE1_COLUMNS], storage_options)
    return {pair_id: dict(rows[key]) for pair_id, key in keys.items() if key in rows}


def candidate_rows(out: str, model_id: str, model_spec: str, layer: str, candidates: Sequence[Candidate],
                   keys: Mapping[str, str], storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Rows for the ``candidates`` table (ranked by :func:`pairx_core.retrieval.rank_candidates`, built by
    :func:`infra.records.candidate_rows`); ``keys``: output key by pair id (:func:`candidate_keys`)."""
    by_key = explained_outcomes(out, model_id, layer, set(keys.values()), storage_options)
    outcomes = {c.pair_id: by_key[keys[c.pair_id]] for c in candidates if keys[c.pair_id] in by_key}
    return build_candidate_rows(rank_candidates(candidates, outcomes), model_spec)
