"""The ``candidates`` rows of a night: retrieved pairs re-ranked with what their explanations gave."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from infra.model_store import redact_model_spec
from infra.tables import read_table
from pairx_core.retrieval import Candidate, PairOutcome, rank_candidates


#: columns only a re-ranked night fills (stage-1 metrics, retrieval rank, explained flag): null otherwise
RERANK_ONLY_COLUMNS = ("retrieval_rank", "explained", "n_matches", "inliers", "residual_px", "match_coverage",
                       "relevance_share", "match_share")


def explained_outcomes(out: str, model_id: str, layer: str, pair_ids: set[str],
                       storage_options: Mapping[str, Any] | None = None) -> dict[str, PairOutcome]:
    """Per pair id, the latest ``pairs`` row of ``model_id`` at ``layer`` (this run's or an earlier one's)."""
    frame = read_table(out, "pairs", [("layer", "==", layer)], model_id=model_id,
                       columns=["pair_id", "layer", "irm", "viz_uri", "output_key", "created_at"],
                       storage_options=storage_options)
    frame = frame[frame["pair_id"].isin(pair_ids)].sort_values("created_at", kind="stable")
    outcomes = {}
    for row in frame.itertuples(index=False):  # later rows win
        irm = None if row.irm is None or (isinstance(row.irm, float) and math.isnan(row.irm)) else float(row.irm)
        outcomes[row.pair_id] = PairOutcome(layer=row.layer, irm=irm, viz_uri=row.viz_uri or None,
                                            output_key=row.output_key)
    return outcomes


def candidate_rows(out: str, model_id: str, model_spec: str, layer: str, candidates: Sequence[Candidate],
                   storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Rows for the ``candidates`` table (see :func:`pairx_core.retrieval.rank_candidates`)."""
    outcomes = explained_outcomes(out, model_id, layer, {c.pair_id for c in candidates}, storage_options)
    rows = rank_candidates(candidates, outcomes, model_spec=redact_model_spec(model_spec))
    return [{**dict.fromkeys(RERANK_ONLY_COLUMNS), **row} for row in rows]
