"""Ground-truth accuracy of feature matches when the true image-to-image mapping is known.

A match pairs a feature cell of image 0 with one of image 1; both are given by a position in pixel
coordinates (usually the cell centre, :func:`pairx_core.geometry.cell_centres`). A match is *correct* when its
image-1 position lies within one feature cell of where its image-0 position really goes:
``|dx| <= sx`` and ``|dy| <= sy``, with ``(sx, sy)`` the cell size in pixels (Chebyshev distance of
at most one cell, i.e. the true cell or one of its 8 neighbours when positions are cell centres).

Pixel coordinates, cell sizes and cell centres are those of :mod:`pairx_core.geometry`
(continuous: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``, so an image of width ``W``
spans ``0 <= x < W``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..geometry import as_transform, cell_index_centres, cell_size, compose, map_homogeneous, scaling, size_hw


def _points(xy: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(xy, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ConfigError(f"{name} must have shape (N, 2), got {array.shape}")
    return array


def match_hits(
    xy_0: np.ndarray,
    xy_1: np.ndarray,
    mapping_0_to_1: np.ndarray,
    cell_size: float | Sequence[float],
    *,
    image_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Per-match correctness, ``(N,)`` bool; :func:`match_accuracy` explains the rule."""
    p0 = _points(xy_0, "xy_0")
    p1 = _points(xy_1, "xy_1")
    if p0.shape != p1.shape:
        raise ConfigError(f"xy_0 and xy_1 must have the same shape, got {p0.shape} and {p1.shape}")
    mapping = as_transform(mapping_0_to_1)
    sx, sy = _cell_xy(cell_size)
    if len(p0) == 0:
        return np.zeros(0, dtype=bool)
    homog = map_homogeneous(mapping, p0)
    with np.errstate(divide="ignore", invalid="ignore"):
        true_1 = homog[:, :2] / homog[:, 2:3]
    finite = np.all(np.isfinite(true_1), axis=1)
    # the homogeneous coordinate must stay positive for the point to be in front of "camera" 1
    w_ok = homog[:, 2] > 0
    with np.errstate(invalid="ignore"):
        hits = (np.abs(p1[:, 0] - true_1[:, 0]) <= sx) & (np.abs(p1[:, 1] - true_1[:, 1]) <= sy)
    hits &= finite & w_ok
    if image_size is not None:
        height, width = size_hw(image_size, "image_size")
        with np.errstate(invalid="ignore"):
            inside = (
                (true_1[:, 0] >= 0) & (true_1[:, 0] < width) & (true_1[:, 1] >= 0) & (true_1[:, 1] < height)
            )
        hits &= inside
    return hits


def _cell_xy(value: float | Sequence[float]) -> tuple[float, float]:
    if np.ndim(value) == 0:
        sx = sy = float(value)  # type: ignore[arg-type]
    else:
        try:
            sx, sy = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(f"cell_size must be a number or (sx, sy), got {value!r}") from None
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise ConfigError(f"cell_size must be positive, got {value!r}")
    return sx, sy


def match_accuracy(
    xy_0: np.ndarray,
    xy_1: np.ndarray,
    mapping_0_to_1: np.ndarray,
    cell_size: float | Sequence[float],
    k: int | None = None,
    *,
    image_size: Sequence[int] | None = None,
) -> float:
    """Share of the first ``k`` matches that are correct under the true mapping.

    Args:
        xy_0, xy_1: ``(N, 2)`` pixel ``(x, y)`` of the matched positions in image 0 and image 1,
            row ``i`` being the match of rank ``i`` (best first).
        mapping_0_to_1: 3x3 homography from image-0 pixels to image-1 pixels (e.g.
            :func:`pairx_core.synthetic.true_mapping`, rescaled to the model input with
            :func:`resized_mapping` when the photos were resized).
        cell_size: ``(sx, sy)`` in pixels, or one number for square cells.
        k: how many top-ranked matches to score; ``None`` scores all, a ``k`` larger than ``N``
            scores all ``N``.
        image_size: ``(H, W)`` of image 1. When given, a match whose image-0 point truly lands
            outside image 1 is a miss, whatever its ``xy_1``.

    Match ``i`` is correct when ``|xy_1[i] - H(xy_0[i])|`` is at most ``sx`` in ``x`` and ``sy`` in
    ``y``. No match is ever dropped from the denominator: points whose true position falls outside
    image 1 (with ``image_size``) or is undefined (sent to infinity or behind the camera) count
    as misses. Returns NaN when there are no matches to score.
    """
    if k is not None:
        if int(k) != k or k < 0:
            raise ConfigError(f"k must be a non-negative integer or None, got {k!r}")
        k = int(k)
    p0 = _points(xy_0, "xy_0")
    p1 = _points(xy_1, "xy_1")
    if k is not None:
        p0, p1 = p0[:k], p1[:k]
    hits = match_hits(p0, p1, mapping_0_to_1, cell_size, image_size=image_size)
    if hits.size == 0:
        return float("nan")
    return float(hits.mean())


def random_baseline(
    n_cells_hw: Sequence[int],
    input_size: Sequence[int],
    mapping: np.ndarray,
    k: int,
    seed: int,
    n_trials: int = 2000,
    *,
    check_bounds: bool = True,
) -> float:
    """Expected :func:`match_accuracy` of a matcher that pairs uniformly random cells.

    Each trial draws ``k`` cells uniformly (with replacement) in image 0 and ``k`` in image 1,
    both on an ``n_cells_hw = (h, w)`` grid over an image of ``input_size = (H, W)``, takes their
    cell centres and scores them with cell size ``(W / w, H / h)``; the result is the mean over
    ``n_trials`` trials. ``check_bounds`` passes ``image_size=input_size`` to the scoring (use
    the same setting for the matcher you compare against). Its expectation does not depend on
    ``k``; ``k`` and ``n_trials`` only set how many random pairs are averaged.
    """
    h, w = size_hw(n_cells_hw, "n_cells_hw")
    size_hw(input_size, "input_size")
    if int(k) != k or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if int(n_trials) != n_trials or n_trials < 1:
        raise ConfigError(f"n_trials must be a positive integer, got {n_trials!r}")
    mapping = as_transform(mapping)
    rng = np.random.default_rng(int(seed))
    total = int(k) * int(n_trials)
    cells_0 = rng.integers(0, h * w, size=total)
    cells_1 = rng.integers(0, h * w, size=total)
    xy_0 = cell_index_centres(cells_0, (h, w), input_size)
    xy_1 = cell_index_centres(cells_1, (h, w), input_size)
    hits = match_hits(
        xy_0, xy_1, mapping, cell_size((h, w), input_size),
        image_size=input_size if check_bounds else None,
    )
    # every trial has the same k, so the mean over trials is the mean over all pairs
    return float(hits.mean())


def resized_mapping(
    mapping: np.ndarray,
    size_0: Sequence[int],
    new_size_0: Sequence[int],
    size_1: Sequence[int],
    new_size_1: Sequence[int],
) -> np.ndarray:
    """Re-express a pixel mapping after resizing image 0 from ``size_0`` to ``new_size_0`` and
    image 1 from ``size_1`` to ``new_size_1`` (all ``(H, W)``, resizing without keeping the
    aspect ratio, ``x' = x * W' / W``)."""
    h0, w0 = size_hw(size_0, "size_0")
    nh0, nw0 = size_hw(new_size_0, "new_size_0")
    h1, w1 = size_hw(size_1, "size_1")
    nh1, nw1 = size_hw(new_size_1, "new_size_1")
    return compose(scaling(nw1 / w1, nh1 / h1), mapping, scaling(w0 / nw0, h0 / nh0))
