"""Plausibility metrics of one pair at one layer (spec: "Plausibility metrics").

- geometric consistency: a homography fitted with RANSAC (OpenCV, 5 px threshold) to the pixel
  positions of the top matches; ``residual_px`` is the mean reprojection error over ALL those top
  matches (outliers included, so an incoherent set of lines scores badly), ``inliers`` the RANSAC
  inlier count, ``irm = 1 / (1 + residual_px)``. Only defined when the fit is over-determined and
  the matches carry relevance: with fewer than :data:`MIN_MATCHES_FOR_IRM` (5) top matches (a
  homography fits 4 points exactly, so 4 matches would always score 1.0), or zero total relevance
  among them, ``residual_px``, ``inliers`` and ``irm`` are None. Re-ranking then falls back to
  similarity for that pair (``pairx_core.retrieval.rerank_score``).
- ``match_coverage``: mean relevance ``R0 * R1`` of the top matches, normalised by
  ``max(R0) * max(R1)`` so that it lies in [0, 1] whatever the model's relevance scale.
- ``relevance_share``: share of the total relevance of both maps that lies on the cells of the
  top matches.
- ``match_share``: number of mutual matches / number of cells.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .geometry import map_points
from .results import LayerExplanation

RANSAC_THRESHOLD_PX = 5.0
TOP_MATCHES = 20
#: fewest top matches for which a homography is over-determined (4 points fit exactly)
MIN_MATCHES_FOR_IRM = 5


@dataclass(frozen=True)
class PlausibilityMetrics:
    n_matches: int
    residual_px: float | None
    inliers: int | None
    irm: float | None
    match_coverage: float
    relevance_share: float
    match_share: float

    def as_dict(self) -> dict:
        return asdict(self)


def homography_residual(points_0: np.ndarray, points_1: np.ndarray,
                        threshold: float = RANSAC_THRESHOLD_PX) -> tuple[float, int]:
    """RANSAC homography ``points_0 -> points_1`` ``(N, 2)``; returns (mean residual px, inliers)."""
    points_0 = np.asarray(points_0, dtype=np.float64).reshape(-1, 2)
    points_1 = np.asarray(points_1, dtype=np.float64).reshape(-1, 2)
    if len(points_0) < 4:
        return float("nan"), 0
    import cv2

    homography, mask = cv2.findHomography(points_0, points_1, cv2.RANSAC, threshold)
    if homography is None:
        return float("nan"), 0
    projected = map_points(homography, points_0)
    errors = np.linalg.norm(projected - points_1, axis=1)
    if not np.isfinite(errors).all():
        return float("nan"), int(mask.sum())
    return float(errors.mean()), int(mask.sum())


def geometric_consistency(matches) -> tuple[float | None, int | None, float | None]:
    """``(residual_px, inliers, irm)`` of the top ``matches`` (a matches DataFrame), or all None.

    None when there are fewer than :data:`MIN_MATCHES_FOR_IRM` matches, when their relevance sums
    to zero (or is not finite), or when RANSAC finds no model / a non-finite residual.
    """
    relevance = float(np.asarray(matches["relevance"], dtype=np.float64).sum()) if len(matches) else 0.0
    if len(matches) < MIN_MATCHES_FOR_IRM or not np.isfinite(relevance) or relevance <= 0.0:
        return None, None, None
    residual, inliers = homography_residual(
        matches[["x_0", "y_0"]].to_numpy(), matches[["x_1", "y_1"]].to_numpy()
    )
    if not np.isfinite(residual):
        return None, None, None
    return residual, inliers, 1.0 / (1.0 + residual)


def plausibility(layer: LayerExplanation, top: int = TOP_MATCHES) -> PlausibilityMetrics:
    """All plausibility measures of one :class:`LayerExplanation`."""
    matches = layer.matches.head(top)
    n_matches = layer.n_matches
    residual, inliers, irm = geometric_consistency(matches)
    r0 = np.asarray(layer.relevance_0, dtype=np.float64)
    r1 = np.asarray(layer.relevance_1, dtype=np.float64)
    scale = float(r0.max() * r1.max()) if r0.size and r1.size else 0.0
    coverage = float(matches["relevance"].mean() / scale) if len(matches) and scale > 0 else 0.0
    total = float(r0.sum() + r1.sum())
    if len(matches) and total > 0:
        on_0 = _cells_sum(r0, matches["row_0"], matches["col_0"])
        on_1 = _cells_sum(r1, matches["row_1"], matches["col_1"])
        share = (on_0 + on_1) / total
    else:
        share = 0.0
    return PlausibilityMetrics(
        n_matches=n_matches,
        residual_px=residual,
        inliers=inliers,
        irm=irm,
        match_coverage=coverage,
        relevance_share=float(share),
        match_share=n_matches / layer.n_cells if layer.n_cells else 0.0,
    )


def _cells_sum(relevance: np.ndarray, rows, cols) -> float:
    cells = set(zip(np.asarray(rows).tolist(), np.asarray(cols).tolist()))
    return float(sum(relevance[r, c] for r, c in cells))
