"""infra.images: decoding, EXIF, modes, boxes, rotation, coordinate mapping, bad inputs."""

from __future__ import annotations

import hashlib
import io
import math
import uuid

import numpy as np
import pytest
from PIL import Image

from infra.images import DEFAULT_MAX_PIXELS, decode_image, load_image
from infra.storage import StorageTarget
from pairx_core.errors import ImageError, StorageError


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _marker_image(width: int, height: int, point: tuple[int, int]) -> bytes:
    """Black PNG with a 3x3 white square centred on ``point``."""
    array = np.zeros((height, width, 3), np.uint8)
    x, y = point
    array[y - 1 : y + 2, x - 1 : x + 2] = 255
    return _encode(Image.fromarray(array))


def _centroid(image: Image.Image, near: np.ndarray, radius: int = 4) -> np.ndarray:
    """Intensity-weighted centroid (x, y) of the bright marker around ``near``, both in continuous
    coordinates (pixel ``j`` covers ``[j, j + 1)``)."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    cx, cy = (int(math.floor(v)) for v in near)
    y0, x0 = max(cy - radius, 0), max(cx - radius, 0)
    window = gray[y0 : cy + radius + 1, x0 : cx + radius + 1]
    ys, xs = np.mgrid[0 : window.shape[0], 0 : window.shape[1]] + 0.5  # pixel centres
    return np.array([(xs * window).sum() / window.sum() + x0, (ys * window).sum() / window.sum() + y0])


# ---------------------------------------------------------------------- basics
def test_content_hash_is_sha256_of_bytes_and_path_independent():
    data = _encode(Image.fromarray(_random_rgb(16, 12)))
    a = decode_image(data, "a.png")
    b = decode_image(data, "elsewhere/b.png")
    assert a.content_hash == b.content_hash == hashlib.sha256(data).hexdigest()
    assert a.uri == "a.png" and a.box is None and a.theta == 0.0
    assert a.original_size == (16, 12) and a.image.mode == "RGB"


def test_decoding_is_lossless_for_png():
    array = _random_rgb(20, 10)
    loaded = decode_image(_encode(Image.fromarray(array)))
    np.testing.assert_array_equal(np.asarray(loaded.image), array)


@pytest.mark.parametrize(("orientation", "expected_corner"),
                         [(6, "top_right"), (8, "bottom_left"), (3, "bottom_right")])
def test_exif_orientation_is_applied(orientation, expected_corner):
    # stored landscape 40x20 with a red block in the stored top-left corner
    array = np.zeros((20, 40, 3), np.uint8)
    array[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    loaded = decode_image(data, "oriented.jpg")
    expected_size = (20, 40) if orientation in (6, 8) else (40, 20)
    assert loaded.original_size == expected_size
    assert loaded.image.size == expected_size
    red = np.asarray(loaded.image)[..., 0].astype(float)
    w, h = expected_size
    corners = {
        "top_left": red[:6, :6].mean(),
        "top_right": red[:6, w - 6 :].mean(),
        "bottom_left": red[h - 6 :, :6].mean(),
        "bottom_right": red[h - 6 :, w - 6 :].mean(),
    }
    assert max(corners, key=corners.get) == expected_corner
    assert corners[expected_corner] > 200


# ---------------------------------------------------------------------- modes
def _mode_cases():
    gray = np.array([[0, 100, 255]], np.uint8)
    yield "L", _encode(Image.fromarray(gray, "L")), [0, 100, 255]
    yield "LA", _encode(Image.fromarray(np.dstack([gray, np.zeros_like(gray)]), "LA")), [0, 100, 255]
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 255], [1, 2, 3, 128]]], np.uint8)
    yield "RGBA", _encode(Image.fromarray(rgba, "RGBA")), None
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 100, 100, 100, 255, 255, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    yield "P", _encode(palette), [0, 100, 255]
    sixteen = np.array([[0, 100 * 257, 65535]], np.uint16)
    yield "I;16", _encode(Image.fromarray(sixteen)), [0, 100, 255]
    wide = np.array([[0, 100 * 257, 65535]], np.int32)
    yield "I", _encode(Image.fromarray(wide, "I"), "TIFF"), [0, 100, 255]
    small_int = np.array([[0, 100, 255]], np.int32)
    yield "I (8-bit values)", _encode(Image.fromarray(small_int, "I"), "TIFF"), [0, 100, 255]
    unit = np.array([[0.0, 100 / 255, 1.0]], np.float32)
    yield "F", _encode(Image.fromarray(unit, "F"), "TIFF"), [0, 100, 255]
    signed = np.array([[-1.0, 1.0, 3.0]], np.float32)
    yield "F (min-max)", _encode(Image.fromarray(signed, "F"), "TIFF"), [0, 128, 255]
    cmyk = Image.new("CMYK", (3, 1), (0, 0, 0, 0))
    yield "CMYK", _encode(cmyk, "TIFF"), [255, 255, 255]
    yield "1", _encode(Image.fromarray(np.array([[0, 1, 1]], bool))), [0, 255, 255]


@pytest.mark.parametrize(("label", "data", "expected_gray"), list(_mode_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_mode_becomes_8bit_rgb(label, data, expected_gray):
    loaded = decode_image(data, f"{label}.img")
    assert loaded.image.mode == "RGB"
    pixels = np.asarray(loaded.image).astype(int)
    assert pixels.shape == (1, 3, 3)
    if expected_gray is None:  # RGBA: alpha dropped, colour kept as stored
        np.testing.assert_array_equal(pixels[0], [[10, 20, 30], [200, 100, 50], [1, 2, 3]])
    else:
        np.testing.assert_allclose(pixels[0, :, 0], expected_gray, atol=1)
        assert (pixels[0, :, 0] == pixels[0, :, 1]).all() and (pixels[0, :, 1] == pixels[0, :, 2]).all()


# ---------------------------------------------------------------------- boxes
def test_pixel_box_crops_exact_pixels():
    array = _random_rgb(60, 40)
    loaded = decode_image(_encode(Image.fromarray(array)), "b.png", box=(10, 5, 30, 20))
    assert loaded.box == (10, 5, 30, 20)
    assert loaded.image.size == (30, 20) and loaded.original_size == (60, 40)
    np.testing.assert_array_equal(np.asarray(loaded.image), array[5:25, 10:40])


def test_fractional_box_uses_width_and_height():
    array = _random_rgb(80, 40)
    loaded = decode_image(_encode(Image.fromarray(array)), "f.png", box=(0.25, 0.5, 0.5, 0.25))
    assert loaded.box == (20, 20, 40, 10)
    np.testing.assert_array_equal(np.asarray(loaded.image), array[20:30, 20:60])


def test_box_partly_outside_is_clipped_when_not_rotated():
    array = _random_rgb(50, 30)
    loaded = decode_image(_encode(Image.fromarray(array)), "c.png", box=(-5, 20, 20, 50))
    assert loaded.box == (0, 20, 15, 10)
    np.testing.assert_array_equal(np.asarray(loaded.image), array[20:30, 0:15])


# ---------------------------------------------------------------------- coordinates
def test_to_original_maps_chip_pixels_to_original_pixels():
    loaded = decode_image(_encode(Image.fromarray(_random_rgb(60, 40))), "m.png", box=(10, 5, 30, 20))
    chip_points = np.array([[0, 0], [29, 19], [7, 3]], float)
    np.testing.assert_allclose(loaded.to_original(chip_points), chip_points + [10, 5])
    # same size model input: identical mapping
    np.testing.assert_allclose(loaded.to_original(chip_points, input_size=(20, 30)), chip_points + [10, 5])


def test_to_original_undoes_the_resize_to_model_input():
    point = (47, 23)  # the marker's centre pixel: continuous centre (47.5, 23.5)
    centre = np.array([point], float) + 0.5
    loaded = decode_image(_marker_image(80, 60, point), "r.png", box=(20, 10, 40, 30))
    input_size = (45, 100)  # (H, W): different aspect ratio, upscaled
    resized = loaded.image.resize((input_size[1], input_size[0]), Image.BILINEAR)  # as Preprocessing does
    expected = loaded.from_original(centre, input_size)[0]
    found = _centroid(resized, expected)
    assert np.abs(found - expected).max() < 0.3
    back = loaded.to_original(found[None], input_size)[0]
    assert np.abs(back - centre[0]).max() < 0.3


def test_resize_is_a_plain_scaling():
    # continuous coordinates: the model input's edges are the chip's edges, whatever the scale
    loaded = decode_image(_encode(Image.fromarray(_random_rgb(60, 40))), "s.png", box=(10, 5, 30, 20))
    corners = np.array([[0.0, 0.0], [300.0, 100.0]])  # model input 100 x 300 (H, W)
    np.testing.assert_allclose(loaded.to_original(corners, (100, 300)), [[10.0, 5.0], [40.0, 25.0]], atol=1e-12)
    np.testing.assert_allclose(loaded.to_original(np.array([[150.0, 50.0]]), (100, 300)), [[25.0, 15.0]])


@pytest.mark.parametrize("theta", [0.5, -1.2, math.pi / 2, 3.0])
def test_rotation_follows_the_box_and_maps_back(theta):
    point = (120, 60)
    centre = np.array([point], float) + 0.5
    loaded = decode_image(_marker_image(200, 150, point), "rot.png", box=(90, 30, 80, 60), theta=theta)
    assert loaded.image.size == (80, 60) and loaded.box == (90, 30, 80, 60) and loaded.theta == theta
    expected = loaded.from_original(centre)[0]
    found = _centroid(loaded.image, expected)
    assert np.abs(found - expected).max() < 0.2  # the chip really shows the point there
    np.testing.assert_allclose(loaded.to_original(found[None])[0], centre[0], atol=0.3)
    input_size = (32, 48)
    model_point = loaded.from_original(centre, input_size)
    np.testing.assert_allclose(loaded.to_original(model_point, input_size)[0], centre[0], atol=1e-9)


def test_rotation_convention_matches_miewid_rotated_box():
    # MiewID: the annotation's corners are (A - C) @ R.T + C, R = [[cos, -sin], [sin, cos]].
    x, y, w, h, theta = 90, 30, 80, 60, 0.7
    loaded = decode_image(_marker_image(200, 150, (100, 100)), "c.png", box=(x, y, w, h), theta=theta)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    centre = np.array([x + w / 2, y + h / 2])
    corners = np.array([[x, y], [x, y + h], [x + w, y + h], [x + w, y]], float)
    miewid_corners = (corners - centre) @ rot.T + centre
    chip_corners = np.array([[0, 0], [0, h], [w, h], [w, 0]], float)  # continuous: the chip's outer corners
    np.testing.assert_allclose(loaded.to_original(chip_corners), miewid_corners, atol=1e-9)


def test_rotation_fills_outside_with_white():
    loaded = decode_image(_encode(Image.new("RGB", (40, 40), (0, 0, 0))), "w.png", box=(0, 0, 40, 40),
                          theta=math.pi / 4)
    pixels = np.asarray(loaded.image)
    assert (pixels[0, 0] == 255).all() and (pixels[20, 20] == 0).all()


# ---------------------------------------------------------------------- bad input
def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_random_rgb(64, 64)), "JPEG")
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = _encode(Image.fromarray(_random_rgb(64, 64)))
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize(
    ("data", "kwargs", "reason"),
    [
        (b"", {}, "empty"),
        (b"this is not an image, just text\n" * 4, {}, "not a recognised image"),
        (_truncated_jpeg(), {}, "truncated"),
        (_truncated_png(), {}, "truncated"),
        (_encode(Image.new("RGB", (20, 20))), {"max_pixels": 399}, "exceeds the limit of 399"),
        (_encode(Image.new("RGB", (20, 20))), {"box": (100, 100, 10, 10)}, "outside"),
        (_encode(Image.new("RGB", (20, 20))), {"box": (-30, 0, 10, 10)}, "outside"),
        (_encode(Image.new("RGB", (20, 20))), {"box": (2, 2, 0, 5)}, "non-positive"),
        (_encode(Image.new("RGB", (20, 20))), {"box": (2, 2, -4, 5)}, "non-positive"),
        (_encode(Image.new("RGB", (20, 20))), {"box": (2, 2, float("nan"), 5)}, "finite"),
        (_encode(Image.new("RGB", (20, 20))), {"box": (1, 2, 3)}, "4 finite numbers"),
    ],
    ids=["zero-byte", "not-image", "truncated-jpeg", "truncated-png", "bomb", "box-outside",
         "box-left", "box-zero", "box-negative", "box-nan", "box-short"],
)
def test_bad_inputs_raise_image_error_naming_the_file(data, kwargs, reason):
    uri = f"s3://bucket/{uuid.uuid4().hex}.jpg"
    with pytest.raises(ImageError) as info:
        decode_image(data, uri, **kwargs)
    assert info.value.uri == uri
    assert uri in str(info.value)
    assert reason in info.value.reason


def test_bomb_guard_does_not_touch_global_pillow_limit():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError):
        decode_image(_encode(Image.new("RGB", (50, 50))), "big.png", max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before
    assert decode_image(_encode(Image.new("RGB", (50, 50))), "ok.png").image.size == (50, 50)
    assert DEFAULT_MAX_PIXELS == 50_000_000


# ---------------------------------------------------------------------- load_image
def test_load_image_from_storage_and_urls(tmp_path):
    data = _encode(Image.fromarray(_random_rgb(30, 20)), "JPEG")
    memory = StorageTarget.from_url(f"memory://img-{uuid.uuid4().hex}")
    memory.write_bytes_atomic("a/cat.jpg", data)
    (tmp_path / "cat.jpg").write_bytes(data)
    via_storage = load_image("a/cat.jpg", storage=memory, box=(0, 0, 10, 10))
    via_url = load_image(memory.join("a/cat.jpg"))
    via_path = load_image(str(tmp_path / "cat.jpg"))
    via_bytes = load_image(data, uri="given-name")
    assert via_storage.uri == via_url.uri == memory.join("a/cat.jpg")
    assert via_path.uri == str(tmp_path / "cat.jpg")
    assert via_bytes.uri == "given-name"
    hashes = {x.content_hash for x in (via_storage, via_url, via_path, via_bytes)}
    assert hashes == {hashlib.sha256(data).hexdigest()}
    assert via_storage.image.size == (10, 10)
    with pytest.raises(StorageError) as info:
        load_image("a/missing.jpg", storage=memory)
    assert info.value.uri == memory.join("a/missing.jpg")
    with pytest.raises(ImageError) as bad:
        memory.write_bytes_atomic("a/empty.jpg", b"")
        load_image("a/empty.jpg", storage=memory)
    assert bad.value.uri == memory.join("a/empty.jpg")
    memory.delete("", recursive=True)


def test_too_small_and_undecodable_errors_carry_the_content_hash():
    """Errors about the file itself name its content (for quarantine); box errors do not."""
    from infra.images import content_hash

    tiny = _encode(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageError, match="too small: 1 x 1 px") as raised:
        decode_image(tiny, "tiny.png", min_side=32)
    assert raised.value.content_hash == content_hash(tiny)
    assert decode_image(tiny, "tiny.png").image.size == (1, 1)  # no minimum unless asked
    with pytest.raises(ImageError) as raised:
        decode_image(b"\xff\xd8\xff\xe0 truncated", "broken.jpg")
    assert raised.value.content_hash == content_hash(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageError) as raised:
        decode_image(_encode(Image.new("RGB", (40, 40))), "ok.png", box=(100, 100, 10, 10))
    assert getattr(raised.value, "content_hash", None) is None
