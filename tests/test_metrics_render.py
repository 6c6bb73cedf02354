"""Plausibility metrics on point sets with known homographies; rendered pictures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model_helpers import random_images, tiny_timm_efficientnet
from pairx_core import explain
from pairx_core.metrics import homography_residual, plausibility
from pairx_core.render import LINE_COLOURS, display_scale, jet, render
from pairx_core.results import LayerExplanation, matches_frame


def _layer_with_points(points_0, points_1, grid=(8, 8), size=(64, 64), k_colors=0):
    n = len(points_0)
    relevance = np.linspace(1.0, 0.1, n)
    frame = matches_frame({
        "rank": np.arange(n), "row_0": np.arange(n) % grid[0], "col_0": np.arange(n) // grid[0] % grid[1],
        "row_1": np.arange(n) % grid[0], "col_1": np.arange(n) // grid[0] % grid[1],
        "x_0": points_0[:, 0], "y_0": points_0[:, 1], "x_1": points_1[:, 0], "y_1": points_1[:, 1],
        "distance": np.ones(n), "relevance": relevance,
    })
    return LayerExplanation("l", np.ones(grid), np.ones(grid), frame, np.zeros((0, *size)), np.zeros((0, *size)),
                            (4, *grid), size)


def test_homography_exact_and_outliers():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 64, size=(20, 2))
    H = np.array([[1.1, 0.05, 3.0], [-0.04, 0.95, -2.0], [1e-4, 0.0, 1.0]])
    mapped = np.c_[points, np.ones(20)] @ H.T
    mapped = mapped[:, :2] / mapped[:, 2:]
    residual, inliers = homography_residual(points, mapped)
    assert residual < 1e-3 and inliers == 20
    corrupted = mapped.copy()
    corrupted[:5] += 30.0
    residual_bad, inliers_bad = homography_residual(points, corrupted)
    assert inliers_bad == 15 and residual_bad > 5.0
    metrics_good = plausibility(_layer_with_points(points, mapped))
    metrics_bad = plausibility(_layer_with_points(points, corrupted))
    assert metrics_good.irm > 0.99 and metrics_bad.irm < metrics_good.irm


def test_too_few_matches():
    points = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 1.0]])
    residual, inliers = homography_residual(points, points)
    assert np.isnan(residual) and inliers == 0
    metrics = plausibility(_layer_with_points(points, points))
    assert metrics.irm == 0.0 and metrics.n_matches == 3
    assert metrics.match_share == pytest.approx(3 / 64)


def test_coverage_and_share_ranges():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 64, size=(10, 2))
    metrics = plausibility(_layer_with_points(points, points + 1.0))
    assert 0.0 < metrics.match_coverage <= 1.0
    assert 0.0 < metrics.relevance_share <= 1.0


def test_jet_endpoints():
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours[0, 2] > 100 and colours[0, 0] == 0   # blue at 0
    assert colours[2, 0] > 100 and colours[2, 2] == 0   # red at 1


def test_rendered_picture_size_and_content():
    model = tiny_timm_efficientnet(dtype=torch.float32)
    x0, x1 = random_images(1, dtype=torch.float32, seed=1), random_images(1, dtype=torch.float32, seed=2)
    pair = explain(model, x0, x1, "backbone.blocks.3", k_lines=5, k_colors=3)[0]
    layer = pair.layers["backbone.blocks.3"]
    images = [np.full((64, 64, 3), 128, np.uint8), np.full((64, 64, 3), 60, np.uint8)]
    picture = render(layer, *images, similarity=pair.similarity, irm=0.5)
    assert picture.mode == "RGB" and picture.size == (128, 128 + 22)
    bottom = np.asarray(picture)[64:128]
    assert (bottom != 255).any(axis=-1).mean() > 0.01       # coloured regions on white
    compact = render(layer, *images, caption=False, compact=True)
    assert compact.size == (128, 64)
    # matches are drawn: some pixels differ from the plain overlay
    plain = render(LayerExplanation(**{**layer.__dict__, "k_lines": 0}), *images, caption=False, compact=True)
    assert (np.asarray(plain) != np.asarray(compact)).any()
    with pytest.raises(ValueError):
        render(layer, images[0][:10], images[1])
    # enlarged for small inputs: same picture, three times the size, lines at scaled positions
    enlarged = render(layer, *images, caption=False, compact=True, scale=3)
    assert enlarged.size == (384, 192)
    first = layer.matches.iloc[0]
    near_start = np.asarray(enlarged)[int(first.y_0 * 3) - 1:int(first.y_0 * 3) + 2,
                                      int(first.x_0 * 3) - 1:int(first.x_0 * 3) + 2]
    assert any((near_start == colour).all(axis=-1).any() for colour in LINE_COLOURS)


def test_display_scale():
    assert display_scale((96, 96)) == 3
    assert display_scale((440, 440)) == 1
    assert display_scale((128, 200)) == 2


def test_core_is_pure_compute():
    import subprocess
    import sys

    code = (
        "import sys, pairx_core, pairx_core.engine, pairx_core.models, pairx_core.metrics, pairx_core.render;"
        "bad=[m for m in ('fsspec','s3fs','prefect','dask','zarr','distributed') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
