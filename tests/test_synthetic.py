"""Tests of the synthetic individuals / photo generator (pairx_core.synthetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pairx_core.errors import ConfigError
from pairx_core.geometry import map_points
from pairx_core.synthetic import (
    BodyShape,
    Individual,
    Spot,
    make_dataset,
    make_individuals,
    render_canonical,
    render_photo,
    true_mapping,
)


@pytest.fixture(scope="module")
def individuals() -> list[Individual]:
    return make_individuals(8, seed=7)


def _pixels(photo) -> np.ndarray:
    return np.asarray(photo.image, dtype=np.int16)


# ------------------------------------------------------------------ determinism


def test_individuals_deterministic_per_seed_and_prefix_stable():
    a = make_individuals(4, seed=3)
    b = make_individuals(4, seed=3)
    assert a == b
    assert make_individuals(6, seed=3)[:4] == a  # individual i does not depend on n
    c = make_individuals(4, seed=4)
    assert all(not np.allclose(x.spot_centres[:5], y.spot_centres[:5]) for x, y in zip(a, c))


def test_render_deterministic_per_seed(individuals):
    ind = individuals[0]
    p1 = render_photo(ind, seed=11)
    p2 = render_photo(ind, seed=11)
    assert p1.image.mode == "RGB" and p1.image.size == (128, 128)
    assert np.array_equal(_pixels(p1), _pixels(p2))
    assert np.array_equal(p1.transform, p2.transform)
    assert p1.night == p2.night
    p3 = render_photo(ind, seed=12)
    assert np.abs(_pixels(p1) - _pixels(p3)).mean() > 5
    assert not np.allclose(p1.transform, p3.transform)
    # same photo seed, another individual: another pose too
    p4 = render_photo(individuals[1], seed=11)
    assert not np.allclose(p1.transform, p4.transform)


def test_switches_do_not_change_pose(individuals):
    ind = individuals[2]
    full = render_photo(ind, seed=5, difficulty=0.8)
    clean = render_photo(ind, seed=5, difficulty=0.8, clean=True)
    assert np.array_equal(full.transform, clean.transform)
    assert not np.array_equal(_pixels(full), _pixels(clean))
    assert not clean.occluder_mask.any()
    assert np.array_equal(clean.visible_mask, clean.body_mask)


# ------------------------------------------------------------------ geometry


def test_transform_puts_spot_colour_at_spot_centre(individuals):
    """The pixel containing each transformed spot centre shows that spot's colour."""
    checked = ok = 0
    for n, ind in enumerate(individuals[:5]):
        for seed in range(3):
            photo = render_photo(ind, seed=100 * n + seed, difficulty=1.0, clean=True)
            pixels = _pixels(photo)
            height, width = photo.size
            centres = photo.spot_pixels()
            min_stretch = np.linalg.svd(photo.transform[:2, :2], compute_uv=False).min()
            for (x, y), radius, colour in zip(centres, ind.spot_radii, ind.spot_colours):
                if not (1 <= x < width - 1 and 1 <= y < height - 1) or radius * min_stretch < 1.2:
                    continue
                checked += 1
                got = pixels[int(math.floor(y)), int(math.floor(x))]
                ok += bool(np.all(np.abs(got - colour.astype(np.int16)) <= 8))
    assert checked >= 100
    assert ok / checked >= 0.97, f"{ok}/{checked} spot centres show the spot colour"


def test_spot_centroid_matches_transform_subpixel():
    """Sub-pixel check (catches half-pixel convention errors): the colour centroid of each drawn
    spot lies where the transform puts the spot centre."""
    spots = tuple(
        Spot(128 + dx, 128 + dy, 12.0, (230, 230, 230))
        for dx, dy in [(-60, -25), (-20, -25), (20, -25), (60, -25), (-40, 25), (0, 25), (40, 25)]
    )
    ind = Individual("hand-made", BodyShape("ellipse", 105.0, 70.0, 2.0), (40, 40, 40), spots)
    base = np.array(ind.base_colour, dtype=np.float64)
    spot_col = np.array(spots[0].colour, dtype=np.float64)
    errors = []
    for seed in range(4):
        photo = render_photo(ind, seed=seed, size=(96, 128), difficulty=1.0, clean=True, supersample=4)
        pixels = np.asarray(photo.image, dtype=np.float64)
        height, width = photo.size
        stretch = np.linalg.norm(photo.transform[:2, :2], 2)
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        for x, y in photo.spot_pixels():
            reach = 12.0 * stretch + 1.5
            if not (reach <= x <= width - reach and reach <= y <= height - reach):
                continue
            near = (xs - x) ** 2 + (ys - y) ** 2 <= reach**2
            alpha = np.clip((pixels[near] - base) @ (spot_col - base) / np.sum((spot_col - base) ** 2), 0, 1)
            if not photo.body_mask[near].all():
                continue
            cx = np.sum(alpha * xs[near]) / alpha.sum()
            cy = np.sum(alpha * ys[near]) / alpha.sum()
            errors.append(math.hypot(cx - x, cy - y))
    assert len(errors) >= 12
    assert max(errors) < 0.08, errors  # measured ~0.03


def test_true_mapping_composes(individuals):
    ind = individuals[3]
    a = render_photo(ind, seed=1, difficulty=1.0)
    b = render_photo(ind, seed=2, difficulty=1.0)
    m_ab = true_mapping(a, b)
    m_ba = true_mapping(b, a)
    assert m_ab.shape == (3, 3) and m_ab.dtype == np.float64
    np.testing.assert_allclose(m_ab @ m_ba, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(m_ab, b.transform @ np.linalg.inv(a.transform), atol=1e-10)
    # a's spot pixels mapped into b are b's spot pixels (direct canonical -> b computation)
    np.testing.assert_allclose(map_points(m_ab, a.spot_pixels()), b.spot_pixels(), atol=1e-8)
    pts = np.random.default_rng(0).uniform(0, 128, size=(50, 2))
    np.testing.assert_allclose(map_points(m_ba, map_points(m_ab, pts)), pts, atol=1e-8)
    # transforms passed directly work the same
    np.testing.assert_allclose(true_mapping(a.transform, b.transform), m_ab)


def test_map_points_handles_projective_mapping():
    h = np.array([[1.2, 0.1, 3.0], [-0.2, 0.9, 5.0], [0.001, 0.002, 1.0]])
    pts = np.array([[10.0, 20.0], [0.0, 0.0], [100.0, 50.0]])
    manual = []
    for x, y in pts:
        u, v, w = h @ [x, y, 1.0]
        manual.append((u / w, v / w))
    np.testing.assert_allclose(map_points(h, pts), manual)
    assert map_points(h, [10.0, 20.0]).shape == (1, 2)
    with pytest.raises(ConfigError):
        map_points(h, np.zeros((4, 3)))


# ------------------------------------------------------------------ individuals


def test_individuals_have_different_patterns(individuals):
    ids = [ind.id for ind in individuals]
    assert len(set(ids)) == len(ids)
    for i, a in enumerate(individuals):
        assert len(a.spots) >= 10
        for b in individuals[i + 1 :]:
            # share of a's spots that have a spot of b within 4 canonical units
            d = np.hypot(*(a.spot_centres[:, None, :] - b.spot_centres[None, :, :]).transpose(2, 0, 1))
            assert (d.min(axis=1) < 4.0).mean() < 0.5, (a.id, b.id)
    # and the rendered templates differ inside the body
    renders = [render_canonical(ind, 96) for ind in individuals]
    for i, ra in enumerate(renders):
        for rb in renders[i + 1 :]:
            both = ra.body_mask & rb.body_mask
            diff = np.abs(_pixels(ra)[both] - _pixels(rb)[both]).max(axis=1)
            assert (diff > 40).mean() > 0.05


def test_spots_inside_body_and_disjoint(individuals):
    for ind in individuals:
        c, r = ind.spot_centres, ind.spot_radii
        assert ind.body.contains(c[:, 0], c[:, 1]).all()
        gaps = np.hypot(*(c[:, None, :] - c[None, :, :]).transpose(2, 0, 1)) - r[:, None] - r[None, :]
        np.fill_diagonal(gaps, np.inf)
        assert gaps.min() > 0, ind.id


# ------------------------------------------------------------------ photo properties


def test_night_frames_are_grey_rgb(individuals):
    ind = individuals[4]
    night = render_photo(ind, seed=3, night=True)
    px = _pixels(night)
    assert night.night and night.image.mode == "RGB"
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
    day = render_photo(ind, seed=3, night=False)
    assert not day.night and np.abs(_pixels(day)[..., 0] - _pixels(day)[..., 2]).mean() > 3
    flags = [render_photo(ind, seed=s, night_prob=0.25, clean=False).night for s in range(40)]
    assert 3 <= sum(flags) <= 20
    assert not any(render_photo(ind, seed=s, night_prob=0.0).night for s in range(10))


def test_occluder_hides_body(individuals):
    photos = [render_photo(ind, seed=9, difficulty=1.0) for ind in individuals]
    assert all(not (p.visible_mask & p.occluder_mask).any() for p in photos)
    assert all(p.body_mask.sum() > 500 for p in photos)
    assert sum((p.body_mask & p.occluder_mask).any() for p in photos) >= len(photos) // 2


def test_make_dataset_layout_and_size():
    photos = make_dataset(3, 2, seed=1, size=(64, 80))
    assert [p.individual_id for p in photos] == ["ind-0000"] * 2 + ["ind-0001"] * 2 + ["ind-0002"] * 2
    assert all(p.image.size == (80, 64) and p.visible_mask.shape == (64, 80) for p in photos)
    assert not np.array_equal(_pixels(photos[0]), _pixels(photos[1]))
    again = make_dataset(3, 2, seed=1, size=(64, 80))
    assert all(np.array_equal(_pixels(p), _pixels(q)) for p, q in zip(photos, again))


@pytest.mark.parametrize(
    "kwargs",
    [{"size": (8, 128)}, {"size": (128,)}, {"difficulty": 1.5}, {"night_prob": -0.1}, {"supersample": 0}],
)
def test_bad_arguments_raise_config_error(individuals, kwargs):
    with pytest.raises(ConfigError):
        render_photo(individuals[0], seed=0, **kwargs)
