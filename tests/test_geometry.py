"""pairx_core.geometry: the one pixel convention, transforms and cell centres, and its users."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from infra.images import decode_image
from pairx_core.errors import ConfigError
from pairx_core.geometry import (
    cell_centres,
    cell_index_centres,
    cell_size,
    compose,
    invert,
    map_points,
    rotation,
    scaling,
    translation,
)
from pairx_core.matching import cell_centres as tensor_cell_centres


def test_compose_applies_the_last_transform_first():
    point = np.array([[1.0, 2.0]])
    np.testing.assert_allclose(map_points(compose(translation(10, 20), scaling(3)), point), [[13.0, 26.0]])
    np.testing.assert_allclose(map_points(compose(scaling(3), translation(10, 20)), point), [[33.0, 66.0]])
    # y points down: a quarter turn takes the x axis to the y axis
    np.testing.assert_allclose(map_points(rotation(math.pi / 2), [[1.0, 0.0]]), [[0.0, 1.0]], atol=1e-15)
    with pytest.raises(ConfigError, match="singular"):
        invert(scaling(0.0, 1.0))
    with pytest.raises(ConfigError):
        map_points(np.eye(2), point)


def test_crop_rotation_and_scale_round_trip_within_1e_9_px():
    # a chip cut from a 4000 x 3000 photo: box (1210, 730, 1500, 900) turned by 0.7 rad about its
    # centre, resized to a 440 x 440 model input (x and y scale differently)
    x0, y0, w, h, theta = 1210.0, 730.0, 1500.0, 900.0, 0.7
    model_to_original = compose(translation(x0 + w / 2, y0 + h / 2), rotation(theta), translation(-w / 2, -h / 2),
                                scaling(w / 440, h / 440))
    # known images: the model input's centre is the box centre, its corners the rotated box's corners
    np.testing.assert_allclose(map_points(model_to_original, [[220.0, 220.0]]), [[x0 + w / 2, y0 + h / 2]],
                               atol=1e-9)
    cos, sin = math.cos(theta), math.sin(theta)
    corner = np.array([x0 + w / 2 - cos * w / 2 + sin * h / 2, y0 + h / 2 - sin * w / 2 - cos * h / 2])
    np.testing.assert_allclose(map_points(model_to_original, [[0.0, 0.0]])[0], corner, atol=1e-9)
    # and back: original -> model input -> original
    original = np.array([[1987.25, 1203.5], [1210.0, 730.0], [3999.9, 0.1]])
    model = map_points(invert(model_to_original), original)
    assert np.abs(map_points(model_to_original, model) - original).max() < 1e-9


def test_image_records_use_the_same_convention():
    # the chip really is the rotated box: LoadedImage's mapping equals the composed one
    x0, y0, w, h, theta = 90, 30, 80, 60, -0.4
    buffer = io.BytesIO()
    Image.new("RGB", (200, 150), (40, 40, 40)).save(buffer, "PNG")
    loaded = decode_image(buffer.getvalue(), box=(x0, y0, w, h), theta=theta)
    input_size = (96, 128)  # (H, W)
    expected = compose(translation(x0 + w / 2, y0 + h / 2), rotation(theta), translation(-w / 2, -h / 2),
                       scaling(w / 128, h / 96))
    np.testing.assert_allclose(loaded.model_to_original(input_size), expected, atol=1e-12)
    points = np.array([[0.0, 0.0], [64.0, 48.0], [127.5, 95.5]])
    original = loaded.to_original(points, input_size)
    np.testing.assert_allclose(original[1], [x0 + w / 2, y0 + h / 2], atol=1e-9)
    assert np.abs(loaded.from_original(original, input_size) - points).max() < 1e-9


def test_cell_centres_continuous_and_one_implementation():
    # 14 x 14 cells over 440 px: cell 0 covers [0, 31.43), its centre is half a cell in
    assert cell_size((14, 14), (440, 440)) == (440 / 14, 440 / 14)
    np.testing.assert_allclose(cell_centres([[0, 0], [13, 13]], (14, 14), (440, 440)),
                               [[440 / 28, 440 / 28], [440 - 440 / 28, 440 - 440 / 28]])
    flat = torch.tensor([0, 5, 17, 195])
    x, y = tensor_cell_centres(flat, (14, 14), (440, 400))
    np.testing.assert_array_equal(np.stack([x.numpy(), y.numpy()], axis=1),
                                  cell_index_centres(flat.numpy(), (14, 14), (440, 400)))
    assert x.dtype == torch.float64
