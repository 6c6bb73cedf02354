"""The review figures of the site's index, read through the dashboard views (``infra/views.sql``).

``review_progress`` (per night: uploads, decided, pending, median time to decision),
``model_precision`` (per night run and model: share of ``match`` decisions on retrieval rank 0 and
on re-ranked rank 0) and ``plausibility_calibration`` (per model: ROC AUC of the re-rank score and of
similarity alone) are queried as they are, so the index and any dashboard show the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..views import create_views

__all__ = ["ReviewFigures", "load_review_figures"]

logger = logging.getLogger(__name__)

PROGRESS_SQL = ("SELECT CAST(date AS VARCHAR) AS date, model_id, uploads, decided, unsure, pending, "
                "median_s_to_decision FROM review_progress")
PRECISION_SQL = ("SELECT CAST(date AS VARCHAR) AS date, night_run_id, model_id, matches, matches_among_candidates, "
                 "retrieval_top1_share, reranked_top1_share FROM model_precision ORDER BY date DESC, night_run_id")
CALIBRATION_SQL = ("SELECT model_id, uploads, candidates, comparisons, auc_rerank_score, auc_similarity "
                   "FROM plausibility_calibration ORDER BY model_id")


@dataclass
class ReviewFigures:
    """The three review views as frames (columns as selected above, None for NULL; empty when unread)."""

    progress: pd.DataFrame = field(default_factory=pd.DataFrame)
    precision: pd.DataFrame = field(default_factory=pd.DataFrame)
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: why the figures could not be read (the index then says so), None when they were
    problem: str | None = None

    def progress_of(self, date: str, model_id: str) -> dict | None:
        """The ``review_progress`` row of one night, or None (no uploads ranked that night)."""
        if self.progress.empty:
            return None
        rows = self.progress[(self.progress["date"] == str(date)) & (self.progress["model_id"] == model_id)]
        return None if rows.empty else rows.iloc[0].to_dict()


def _frame(connection: Any, sql: str) -> pd.DataFrame:
    """The rows of ``sql`` with plain Python values, None for SQL NULL."""
    frame = connection.execute(sql).df()
    return frame.astype(object).where(frame.notna(), None)


def load_review_figures(out: str, storage_options: Mapping[str, Any] | None = None) -> ReviewFigures:
    """Query the review views of ``out``; a query that fails leaves the figures empty, with a WARNING
    (the rest of the site does not depend on them; a remote OUT needs DuckDB's ``httpfs``)."""
    import duckdb

    try:
        with duckdb.connect() as connection:
            create_views(connection, out, storage_options)
            return ReviewFigures(progress=_frame(connection, PROGRESS_SQL),
                                 precision=_frame(connection, PRECISION_SQL),
                                 calibration=_frame(connection, CALIBRATION_SQL))
    except duckdb.Error as error:
        problem = str(error).splitlines()[0]
        logger.warning("report: review figures not read from the views: %s", problem)
        return ReviewFigures(problem=problem)
