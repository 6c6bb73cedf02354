"""Result containers of the engine: plain numpy and pandas, detached from torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MATCH_COLUMNS = ("rank", "row_0", "col_0", "row_1", "col_1", "x_0", "y_0", "x_1", "y_1", "distance", "relevance")


@dataclass
class LayerExplanation:
    """PAIR-X explanation of one pair at one layer.

    Attributes:
        layer: module name.
        relevance_0, relevance_1: ``(h, w)`` intermediate relevance maps (channel-reduced).
        matches: one row per mutual match, sorted by relevance descending; columns
            ``MATCH_COLUMNS``; x/y are cell centres in model-input pixels.
        pixel_relevance_0, pixel_relevance_1: ``(k, H, W)`` pixel relevance of the top
            ``k = min(k_colors, n_matches)`` matches, in rank order.
        feature_shape: ``(C, h, w)`` of the layer's feature map.
        input_size: ``(H, W)`` of the model input.
        k_lines: how many matches the picture draws as lines.
    """

    layer: str
    relevance_0: np.ndarray
    relevance_1: np.ndarray
    matches: pd.DataFrame
    pixel_relevance_0: np.ndarray
    pixel_relevance_1: np.ndarray
    feature_shape: tuple[int, int, int]
    input_size: tuple[int, int]
    k_lines: int = 20

    @property
    def n_matches(self) -> int:
        return int(len(self.matches))

    @property
    def n_cells(self) -> int:
        return int(self.feature_shape[1] * self.feature_shape[2])


@dataclass
class PairExplanation:
    """PAIR-X explanation of one image pair.

    Attributes:
        index: position of the pair in the request.
        similarity: cosine similarity of the two embeddings.
        embedding_0, embedding_1: ``(D,)`` embeddings.
        layers: per requested layer, its :class:`LayerExplanation`.
    """

    index: int
    similarity: float
    embedding_0: np.ndarray
    embedding_1: np.ndarray
    layers: dict[str, LayerExplanation] = field(default_factory=dict)


def matches_frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Build the matches table with the documented column order and dtypes."""
    frame = pd.DataFrame({name: columns[name] for name in MATCH_COLUMNS})
    for name in ("rank", "row_0", "col_0", "row_1", "col_1"):
        frame[name] = frame[name].astype(np.int64)
    return frame
