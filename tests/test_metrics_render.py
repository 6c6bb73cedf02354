"""Plausibility metrics on point sets with known homographies; rendered pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_helpers import random_images, tiny_timm_efficientnet
from pairx_core import explain
from pairx_core.metrics import homography_residual, plausibility
from pairx_core.render import LINE_COLOURS, display_scale, display_size, fit_display, font_px, jet, render
from pairx_core.results import LayerExplanation, matches_frame


def _layer_with_points(points_0, points_1, grid=(8, 8), size=(64, 64), k_colors=0, relevance=None):
    n = len(points_0)
    relevance = np.linspace(1.0, 0.1, n) if relevance is None else relevance
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
    assert metrics.irm is None and metrics.residual_px is None and metrics.inliers is None
    assert metrics.n_matches == 3
    assert metrics.match_share == pytest.approx(3 / 64)


def test_four_matches_have_no_irm():
    """A homography fits any 4 points exactly: 4 random matches must not score IRM 1.0."""
    rng = np.random.default_rng(3)
    points_0, points_1 = rng.uniform(0, 64, size=(4, 2)), rng.uniform(0, 64, size=(4, 2))
    residual, inliers = homography_residual(points_0, points_1)
    assert residual < 1e-3 and inliers == 4  # the trap: a perfect fit of unrelated points
    metrics = plausibility(_layer_with_points(points_0, points_1))
    assert metrics.irm is None and metrics.residual_px is None and metrics.inliers is None
    # a fifth match makes the fit over-determined: unrelated points then score badly
    points_0, points_1 = rng.uniform(0, 64, size=(5, 2)), rng.uniform(0, 64, size=(5, 2))
    metrics = plausibility(_layer_with_points(points_0, points_1))
    assert metrics.irm is not None and metrics.irm < 0.5


def test_zero_relevance_has_no_irm():
    rng = np.random.default_rng(4)
    points = rng.uniform(0, 64, size=(12, 2))
    layer = _layer_with_points(points, points + 1.0, relevance=np.zeros(12))
    metrics = plausibility(layer)
    assert metrics.irm is None and metrics.inliers is None
    assert metrics.n_matches == 12  # the other measures are still reported
    with_relevance = plausibility(_layer_with_points(points, points + 1.0))
    assert with_relevance.irm > 0.99 and with_relevance.inliers == 12


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


def _explained_layer(k_colors=3):
    model = tiny_timm_efficientnet(dtype=torch.float32)
    x0, x1 = random_images(1, dtype=torch.float32, seed=1), random_images(1, dtype=torch.float32, seed=2)
    pair = explain(model, x0, x1, "backbone.blocks.3", k_lines=5, k_colors=k_colors)[0]
    return pair, pair.layers["backbone.blocks.3"]


def test_rendered_picture_size_and_content():
    pair, layer = _explained_layer()
    assert layer.input_size == (64, 64)
    # photos at their own resolution and aspect, not the model's 64 x 64
    photo_0 = np.full((300, 200, 3), 128, np.uint8)
    photo_1 = np.full((400, 400, 3), 60, np.uint8)
    picture = render(layer, photo_0, photo_1, similarity=pair.similarity, irm=0.5, caption=False)
    assert picture.mode == "RGB" and picture.size == (200 + 300, 2 * 300)  # both sides at the smaller height
    faded = round(0.35 * 128 + 0.65 * 255)
    no_maps = LayerExplanation(**{**layer.__dict__, "pixel_relevance_0": np.zeros((0, 64, 64)),
                                  "pixel_relevance_1": np.zeros((0, 64, 64))})
    background = np.asarray(render(layer=no_maps, image_0=photo_0, image_1=photo_1, caption=False))[300:, :200]
    assert (np.abs(background.astype(int) - faded) <= 1).all()  # the bottom panel is the faded photo
    left = np.asarray(picture)[300:, :200]
    assert (np.abs(left.astype(int) - faded) > 10).any(axis=-1).mean() > 0.01   # coloured regions over it
    compact = render(layer, photo_0, photo_1, caption=False, compact=True)
    assert compact.size == (500, 300)
    # matches are drawn: some pixels differ from the plain overlay
    plain = render(LayerExplanation(**{**layer.__dict__, "k_lines": 0}), photo_0, photo_1, caption=False, compact=True)
    assert (np.asarray(plain) != np.asarray(compact)).any()
    first = layer.matches.iloc[0]  # model-input coordinates, scaled to the 200 x 300 photo
    x, y = first.x_0 * 200 / 64, first.y_0 * 300 / 64  # continuous: the pixel holding it is (int(y), int(x))
    near_start = np.asarray(compact)[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3]
    assert any((near_start == colour).all(axis=-1).any() for colour in LINE_COLOURS)
    with pytest.raises(ValueError):
        render(layer, photo_0[..., :2], photo_1)


def test_labels_and_caption_are_legible():
    pair, layer = _explained_layer(k_colors=0)
    photo = np.full((1024, 768, 3), 200, np.uint8)
    bare = render(layer, photo, photo, caption=False)
    labelled = render(layer, photo, photo, similarity=pair.similarity, irm=None,
                      label_0="upload: a.jpg", label_1="candidate: #412 (b.jpg)")
    assert font_px(1024) >= 14 and font_px(100) == 14
    strips = labelled.height - bare.height
    assert strips >= 2 * font_px(1024)  # a label strip and a caption strip, each taller than the text
    label_strip = np.asarray(labelled)[: strips // 2]
    dark = (label_strip < 100).all(axis=-1)
    assert dark[:, :768].any() and dark[:, 768:].any()  # text on both sides
    rows_with_text = np.nonzero(dark.any(axis=1))[0]
    assert rows_with_text.max() - rows_with_text.min() >= 10  # glyphs are >= ~14 px tall, not a bitmap 8 px font


def test_display_size_caps_and_enlarges():
    assert display_size((4000, 3000)) == (1024, 768)
    assert display_size((4000, 3000), max_side=512) == (512, 384)
    assert display_size((64, 32)) == (320, 160)
    assert display_size((640, 480)) == (640, 480)
    from PIL import Image

    array = fit_display(Image.new("RGB", (3000, 1500), (10, 20, 30)))
    assert array.shape == (512, 1024, 3) and array.dtype == np.uint8


def test_display_scale():
    assert display_scale((96, 96)) == 3
    assert display_scale((440, 440)) == 1
    assert display_scale((128, 200)) == 2
