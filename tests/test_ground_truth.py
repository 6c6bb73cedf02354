"""Tests of ground-truth match accuracy (pairx_core.synthetic.ground_truth)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pairx_core.errors import ConfigError
from pairx_core.geometry import cell_centres, cell_index_centres, cell_size, map_points
from pairx_core.synthetic import make_individuals, render_photo, true_mapping
from pairx_core.synthetic.ground_truth import match_accuracy, match_hits, random_baseline, resized_mapping

SIZE = (128, 128)
GRID = (16, 16)


@pytest.fixture(scope="module")
def pair():
    ind = make_individuals(1, seed=21)[0]
    a = render_photo(ind, seed=1, size=SIZE, difficulty=0.8)
    b = render_photo(ind, seed=2, size=SIZE, difficulty=0.8)
    return a, b, true_mapping(a, b)


def _all_cells(grid=GRID, size=SIZE) -> np.ndarray:
    return cell_index_centres(np.arange(grid[0] * grid[1]), grid, size)


def test_cell_centres_formula():
    # non-square: H=60, W=100, h=3, w=5 -> cells 20 x 20 px; (x, y) = (4, 1) -> (90, 30)
    assert cell_size((3, 5), (60, 100)) == (20.0, 20.0)
    assert cell_size((4, 5), (60, 100)) == (20.0, 15.0)
    np.testing.assert_allclose(cell_centres([[4, 1], [0, 0]], (4, 5), (60, 100)), [[90.0, 22.5], [10.0, 7.5]])
    # flat index is row-major: 7 on a 4x5 grid is (x=2, y=1)
    np.testing.assert_allclose(cell_index_centres([7], (4, 5), (60, 100)), [[50.0, 22.5]])
    with pytest.raises(ConfigError):
        cell_index_centres([20], (4, 5), (60, 100))


def test_perfect_matcher_scores_one(pair):
    a, b, mapping = pair
    xy_0 = _all_cells()
    true_1 = map_points(mapping, xy_0)
    inside = np.all((true_1 >= 0) & (true_1 < 128), axis=1)
    assert inside.sum() > 50
    xy_0, true_1 = xy_0[inside], true_1[inside]
    sxy = cell_size(GRID, SIZE)
    assert match_accuracy(xy_0, true_1, mapping, sxy) == 1.0
    assert match_accuracy(xy_0, true_1, mapping, sxy, image_size=SIZE) == 1.0
    # a perfect cell matcher outputs the centre of the cell holding the true position
    snapped = (np.floor(true_1 / sxy) + 0.5) * sxy
    assert match_accuracy(xy_0, snapped, mapping, sxy, image_size=SIZE) == 1.0


def test_offset_by_two_cells_scores_zero(pair):
    _, _, mapping = pair
    xy_0 = _all_cells()
    true_1 = map_points(mapping, xy_0)
    sx, sy = 8.0, 8.0
    for dx, dy in [(2, 0), (0, 2), (-2, 0), (0, -2), (2, 2), (-2, 1)]:
        assert match_accuracy(xy_0, true_1 + [dx * sx, dy * sy], mapping, (sx, sy)) == 0.0
    # one cell away (the 8-neighbourhood) still counts; just beyond it does not
    assert match_accuracy(xy_0, true_1 + [0.999 * sx, -0.999 * sy], mapping, (sx, sy)) == 1.0
    assert match_accuracy(xy_0, true_1 + [1.01 * sx, 0], mapping, (sx, sy)) == 0.0


def test_anisotropic_cells_use_x_and_y_sizes():
    ident = np.eye(3)
    xy = np.array([[50.0, 50.0]])
    # cells 10 px wide and 4 px tall
    assert match_accuracy(xy, xy + [9.0, 0.0], ident, (10.0, 4.0)) == 1.0
    assert match_accuracy(xy, xy + [0.0, 9.0], ident, (10.0, 4.0)) == 0.0
    assert match_accuracy(xy, xy + [0.0, 3.9], ident, (10.0, 4.0)) == 1.0
    assert match_accuracy(xy, xy + [3.9, 3.9], ident, 4.0) == 1.0


def test_first_k_in_rank_order():
    ident = np.eye(3)
    xy_0 = np.arange(12, dtype=float).reshape(6, 2) * 10
    xy_1 = xy_0.copy()
    xy_1[3:] += 50.0  # ranks 3..5 are wrong
    assert match_accuracy(xy_0, xy_1, ident, 8.0, k=3) == 1.0
    assert match_accuracy(xy_0, xy_1, ident, 8.0, k=6) == 0.5
    assert match_accuracy(xy_0, xy_1, ident, 8.0) == 0.5
    assert match_accuracy(xy_0, xy_1, ident, 8.0, k=100) == 0.5
    assert match_accuracy(xy_0, xy_1, ident, 8.0, k=4) == 0.75
    assert math.isnan(match_accuracy(xy_0, xy_1, ident, 8.0, k=0))
    assert math.isnan(match_accuracy(np.zeros((0, 2)), np.zeros((0, 2)), ident, 8.0))


def test_true_position_outside_image_is_a_miss():
    shift = np.array([[1.0, 0.0, 100.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # x + 100
    xy_0 = np.array([[10.0, 10.0], [27.0, 10.0], [60.0, 10.0]])  # true x: 110, 127, 160
    xy_1 = np.array([[110.0, 10.0], [124.0, 10.0], [124.0, 10.0]])
    # without bounds the third is still a miss (36 px off); the first two hit
    assert match_accuracy(xy_0, xy_1, shift, 8.0) == pytest.approx(2 / 3)
    xy_1[2] = [128 - 4.0, 10.0]
    xy_0[2] = [31.0, 10.0]  # true x = 131: outside a 128-wide image, though only 7 px off
    assert match_accuracy(xy_0, xy_1, shift, 8.0) == 1.0
    assert match_accuracy(xy_0, xy_1, shift, 8.0, image_size=(128, 128)) == pytest.approx(2 / 3)
    hits = match_hits(xy_0, xy_1, shift, 8.0, image_size=(128, 128))
    assert hits.tolist() == [True, True, False]


def test_random_baseline_is_exact_expectation_and_matches_random_matcher(pair):
    _, _, mapping = pair
    centres = _all_cells()
    sxy = cell_size(GRID, SIZE)
    n = len(centres)
    # exact expectation: mean over all (cell_0, cell_1) pairs
    true_1 = map_points(mapping, centres)
    inside = np.all((true_1 >= 0) & (true_1 < 128), axis=1)
    near = (np.abs(centres[None, :, 0] - true_1[:, None, 0]) <= sxy[0]) & (
        np.abs(centres[None, :, 1] - true_1[:, None, 1]) <= sxy[1]
    )
    exact = float((near & inside[:, None]).sum()) / (n * n)
    assert 0.005 < exact < 0.05

    baseline = random_baseline(GRID, SIZE, mapping, k=20, seed=0, n_trials=2000)
    assert baseline == random_baseline(GRID, SIZE, mapping, k=20, seed=0, n_trials=2000)
    std = math.sqrt(exact * (1 - exact) / 40_000)
    assert abs(baseline - exact) < 5 * std

    # an independent random matcher, scored by match_accuracy, lands near the baseline
    rng = np.random.default_rng(123)
    scores = [
        match_accuracy(centres[rng.integers(n, size=50)], centres[rng.integers(n, size=50)],
                       mapping, sxy, k=50, image_size=SIZE)
        for _ in range(400)
    ]
    assert abs(np.mean(scores) - baseline) < 5 * math.sqrt(exact * (1 - exact) / 20_000) + 5 * std


def test_random_baseline_identity_mapping_closed_form():
    # identity on a 10x10 grid: a cell's 3x3 neighbourhood (clipped at the border)
    grid, size = (10, 10), (100, 100)
    per_axis = (3 * 8 + 2 * 2) / 10  # interior cells have 3 neighbours per axis, border ones 2
    exact = per_axis**2 / 100
    got = random_baseline(grid, size, np.eye(3), k=50, seed=1, n_trials=2000)
    assert abs(got - exact) < 5 * math.sqrt(exact * (1 - exact) / 100_000)


def test_random_baseline_counts_out_of_image_positions_as_misses():
    # x -> x + 120 on a 128-px image with 8-px cells: only column 0 stays inside (true x = 124,
    # near columns 14 and 15); column 1 lands at x = 132, outside, yet within a cell of column 15
    shift = np.array([[1.0, 0.0, 120.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y_factor = (3 * 14 + 2 * 2) / 16 / 16
    with_bounds = (1 / 16) * (2 / 16) * y_factor
    without = with_bounds + (1 / 16) * (1 / 16) * y_factor
    std = math.sqrt(without / 400_000)
    got = random_baseline(GRID, SIZE, shift, k=100, seed=3, n_trials=4000)
    assert abs(got - with_bounds) < 5 * std
    got = random_baseline(GRID, SIZE, shift, k=100, seed=3, n_trials=4000, check_bounds=False)
    assert abs(got - without) < 5 * std


def test_resized_mapping_matches_rendering_at_another_size():
    ind = make_individuals(1, seed=5)[0]
    a_small, b_small = (render_photo(ind, seed=s, size=(128, 128), clean=True) for s in (1, 2))
    a_big, b_big = (render_photo(ind, seed=s, size=(256, 256), clean=True) for s in (1, 2))
    np.testing.assert_allclose(
        resized_mapping(true_mapping(a_small, b_small), (128, 128), (256, 256), (128, 128), (256, 256)),
        true_mapping(a_big, b_big), atol=1e-9,
    )
    # non-uniform resize of image 1 only: x' = x * 2, y' = y * 0.5
    m = resized_mapping(np.eye(3), (100, 100), (100, 100), (100, 100), (50, 200))
    np.testing.assert_allclose(map_points(m, [[10.0, 20.0]]), [[20.0, 10.0]])


@pytest.mark.parametrize(
    "call",
    [
        lambda: match_accuracy(np.zeros((3, 2)), np.zeros((4, 2)), np.eye(3), 8.0),
        lambda: match_accuracy(np.zeros((3, 2)), np.zeros((3, 2)), np.eye(3), 0.0),
        lambda: match_accuracy(np.zeros((3, 2)), np.zeros((3, 2)), np.eye(3), (8.0, -1.0)),
        lambda: match_accuracy(np.zeros((3, 2)), np.zeros((3, 2)), np.eye(2), 8.0),
        lambda: match_accuracy(np.zeros((3, 2)), np.zeros((3, 2)), np.eye(3), 8.0, k=-1),
        lambda: match_accuracy(np.zeros((3, 3)), np.zeros((3, 3)), np.eye(3), 8.0),
        lambda: random_baseline((16, 16), (128, 128), np.eye(3), k=0, seed=0),
        lambda: random_baseline((0, 16), (128, 128), np.eye(3), k=5, seed=0),
    ],
)
def test_bad_arguments_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()
