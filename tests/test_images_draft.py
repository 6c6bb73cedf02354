"""Reduced-scale JPEG decoding: coordinates stay in full-resolution pixels, resolution floors hold."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from infra.images import decode_image


def _jpeg_with_marker(size=(1600, 1200), marker=(1003, 421), radius=12, orientation=None) -> bytes:
    """Grey JPEG with a dark disc centred on ``marker`` (stored pixels)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.full((h, w, 3), 200, np.uint8)
    pixels[(xx - marker[0]) ** 2 + (yy - marker[1]) ** 2 <= radius**2] = 20
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _dark_centroid(image: Image.Image) -> np.ndarray:
    """Centroid of the dark disc, continuous coordinates (pixel ``j`` covers ``[j, j + 1)``)."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    weight = np.clip(110.0 - gray, 0, None)
    yy, xx = np.mgrid[0 : gray.shape[0], 0 : gray.shape[1]] + 0.5
    return np.array([(xx * weight).sum() / weight.sum(), (yy * weight).sum() / weight.sum()])


@pytest.mark.parametrize(
    "box,theta",
    [(None, 0.0), ((700, 200, 600, 500), 0.0), ((701, 203, 601, 497), 0.0), ((700, 150, 600, 560), 0.4)],
    ids=["whole", "box", "odd-box", "rotated"],
)
def test_reduced_scale_maps_back_to_full_resolution(box, theta):
    data = _jpeg_with_marker(marker=(1003, 421))
    marker = (1003.5, 421.5)  # the disc's centre pixel, continuous
    full = decode_image(data, box=box, theta=theta)
    small = decode_image(data, box=box, theta=theta, target_size=(32, 32), picture_long_side=0)
    assert full.decode_scale == 1 and small.decode_scale > 1  # the draft was really used
    assert small.original_size == full.original_size == (1600, 1200) and small.box == full.box
    assert small.size[0] * small.decode_scale == pytest.approx(full.size[0], abs=small.decode_scale)
    found = small.to_original(_dark_centroid(small.image)[None])[0]
    assert np.abs(found - np.array(marker)).max() <= 1.5  # within ~1 px at full resolution
    # the same point through the model-input mapping, and back
    point = full.from_original(np.array([marker], dtype=float), (224, 224))
    point_small = small.from_original(np.array([marker], dtype=float), (224, 224))
    np.testing.assert_allclose(point_small, point, atol=224 / min(full.size) * small.decode_scale)
    np.testing.assert_allclose(small.to_original(point_small, (224, 224)), [marker], atol=1e-9)


def test_exif_rotated_jpeg_reduced_scale():
    # orientation 6: the upright image is the stored one turned 90 degrees clockwise
    data = _jpeg_with_marker(marker=(1003, 421), orientation=6)
    small = decode_image(data, target_size=(32, 32), picture_long_side=0)
    full = decode_image(data)
    assert small.decode_scale == 8 and small.original_size == full.original_size == (1200, 1600)
    truth = _dark_centroid(full.image)
    found = small.to_original(_dark_centroid(small.image)[None])[0]
    assert np.abs(found - truth).max() <= 1.5


def test_resolution_floors_model_input_and_picture():
    data = _jpeg_with_marker(size=(4000, 3000))
    # picture floor: long side >= 90 % of 1024 -> 1/4 (1000 x 750), not 1/8 (500 x 375)
    default = decode_image(data, target_size=(440, 440))
    assert default.decode_scale == 4 and default.size == (1000, 750)
    # a larger picture asked for: 1/2 (2000 x 1500)
    assert decode_image(data, target_size=(440, 440), picture_long_side=2000).decode_scale == 2
    # the caller asks for less: model input 440 bounds it -> 1/4 (750 >= 440, 375 < 440 at 1/8)
    assert decode_image(data, target_size=(440, 440), picture_long_side=0).decode_scale == 4
    # a small box: its own full-resolution size is all there is; never below the model input
    boxed = decode_image(data, box=(100, 100, 500, 400), target_size=(64, 64), picture_long_side=0)
    assert boxed.decode_scale == 4 and min(boxed.size) >= 64
    assert decode_image(data, box=(100, 100, 500, 400), target_size=(64, 64)).decode_scale == 1  # picture floor
    # no target: full decode (unchanged behaviour); PNG: never drafted
    assert decode_image(data).decode_scale == 1
    buffer = io.BytesIO()
    Image.new("RGB", (1600, 1200)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), target_size=(32, 32), picture_long_side=0).decode_scale == 1


def test_scale_must_divide_stored_size():
    data = _jpeg_with_marker(size=(1602, 1200))  # 1602 = 2 x 801: only 1/2 divides both sides
    small = decode_image(data, target_size=(32, 32), picture_long_side=0)
    assert small.decode_scale == 2 and small.size == (801, 600)
    # the decoded image's right edge is the full image's right edge; its last pixel centre covers 2 px
    assert math.isclose(small.to_original(np.array([[801.0, 0.0]]))[0, 0], 1602.0)
    assert math.isclose(small.to_original(np.array([[800.5, 0.0]]))[0, 0], 1601.0)
