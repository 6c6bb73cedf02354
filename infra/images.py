"""Decode, validate, crop and rotate images; map model-input coordinates back to the original.

:func:`decode_image` is a pure function of the raw bytes; :func:`load_image` adds the read from
storage. Every failure raises :class:`pairx_core.errors.ImageError` ``(uri, reason)``.

Geometry (all in pixels of the *original* image, i.e. after the EXIF orientation is applied):

- ``box = (x, y, w, h)``: top-left corner and size. If every value is ``<= 1.0`` the box is read
  as fractions of the width/height (so a pixel box ``(0, 0, 1, 1)`` cannot be expressed; use
  ``None`` for the whole image). Corners are rounded to whole pixels. A box partly outside the
  image is clipped to it when ``theta == 0`` (as MiewID's loader does by slicing); a box that does
  not overlap the image at all, has a non-positive or non-finite size, or reaches more than
  ``ABSURD_BOX_FACTOR`` (10) image widths (heights) from the origin (``1e12``: wrong units) is
  an error, and so is a chip whose shorter side is under ``min_side``.
- ``theta`` (radians): as in the published MiewID dataset loader, the annotation is the box rotated
  by ``theta`` about its centre (``R = [[cos, -sin], [sin, cos]]`` applied to image coordinates,
  y down). The chip is the ``w x h`` region sampled along that rotated box, so the animal comes out
  axis-aligned: chip point ``d`` (relative to the chip centre) shows original point
  ``centre + R d``. Samples outside the image are filled with white (MiewID's border value);
  resampling is bilinear. Unlike MiewID we do not ignore ``|theta| < 0.1``: any non-zero theta
  rotates. With ``theta != 0`` the box is not clipped (the rotated region may leave the image).

Coordinates follow :mod:`pairx_core.geometry` (continuous: pixel ``(row i, column j)`` covers
``[j, j + 1) x [i, i + 1)``, its centre is ``(j + 0.5, i + 0.5)``), in the chip, in the model
input and in the original alike. Resizing to the model input (no aspect preservation, see
``pairx_core.preprocess.Preprocessing``) is then a plain scaling, as in Pillow.

Modes: everything becomes 8-bit RGB. Alpha is dropped (not composited), like MiewID's
``cv2.imread``. ``I;16*`` is divided by 257. ``I`` (32-bit int) is used as is when its values fit
0..255, divided by 257 when they fit 0..65535, otherwise min-max scaled. ``F`` (float) is
multiplied by 255 when it fits 0..1, used as is when it fits 0..255, otherwise min-max scaled;
NaN becomes 0.

Reduced-scale decoding: given ``target_size`` (the model input the chip will be resized to), a
JPEG is decoded with DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8 of the stored size, only a
factor that divides both stored dimensions, so that decoded pixel ``j`` is exactly original pixels
``[j s, (j + 1) s)``) when the chip stays at least ``target_size`` AND its long side at least
``PICTURE_FLOOR_SHARE`` (90 %) of ``min(picture_long_side, its full-resolution long side)``
(pictures are drawn from the chip, at most 1024 px long by default: a 12 MP photo's picture is
drawn from a 1000 x 750 decode instead of a 2000 x 1500 one, 2.4 % smaller and about a third
cheaper to decode). The chip's mapping to original pixels is then stored as an affine
(:attr:`LoadedImage.chip_affine`): :meth:`LoadedImage.to_original` keeps answering in coordinates of
the full-resolution, EXIF-upright image, and ``original_size``/``box`` stay full-resolution too.
Other formats, and calls without ``target_size``, decode at full size.

One decode per photo: :func:`decode_photo` decodes a photo once, whole, at the scale every chip a
caller will cut allows (:class:`DecodeNeed`; :func:`decode_need` is the need every consumer of a
run states), and :meth:`DecodedPhoto.chip` cuts chips from it. ``infra.decoded_photos`` keeps
that decode for the run's other consumers in the process.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pairx_core.errors import ImageError, ShapeError
from pairx_core.geometry import as_transform, compose, invert, map_points, rotation, scaling, translation

from .storage import StorageTarget

#: ``(box, theta)`` of one chip cut from a photo (box None: the whole photo)
Chip = tuple[Sequence[float] | None, float]

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "PICTURE_LONG_SIDE",
    "Chip",
    "DecodeNeed",
    "DecodedPhoto",
    "LoadedImage",
    "content_hash",
    "cut_chip",
    "decode_image",
    "decode_need",
    "decode_photo",
    "load_image",
    "to_rgb",
]

#: Default decompression-bomb guard: images with more pixels than this are refused.
DEFAULT_MAX_PIXELS = 50_000_000
#: The pipeline's smallest usable image: shorter side in pixels (a 1 x 1 "photo" is an error, not a
#: match). The decoding functions themselves accept any size unless given ``min_side``.
DEFAULT_MIN_SIDE = 32

#: Pillow formats we try to decode; anything else is "not a recognised image format".
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "WEBP", "AVIF", "BMP", "GIF", "PPM", "JPEG2000")

_WHITE = (255, 255, 255)

#: a box reaching beyond this many image widths (heights) from the origin is refused (wrong units)
ABSURD_BOX_FACTOR = 10

#: Default long side (px) of pictures; a reduced-scale decode keeps the chip's long side at least
#: ``PICTURE_FLOOR_SHARE`` of it (of the chip's full-resolution long side when smaller).
PICTURE_LONG_SIDE = 1024
PICTURE_FLOOR_SHARE = 0.9

#: JPEG DCT scale factors Pillow's draft mode offers (largest first).
_DRAFT_SCALES = (8, 4, 2)

#: EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the raw file bytes: identifies an image whatever its path."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded image, cropped and rotated, with the geometry to map points back.

    Attributes:
        uri: where the bytes came from (``"<bytes>"`` if unknown).
        content_hash: SHA-256 hex of the raw bytes.
        image: RGB ``PIL.Image`` after crop and rotation (the chip the model sees).
        original_size: ``(W, H)`` of the full image after EXIF orientation.
        box: pixel box ``(x, y, w, h)`` used (after rounding, and clipping when theta == 0), or
            None when the whole image was used.
        theta: rotation in radians (see the module docstring).
        decode_scale: original pixels per decoded pixel (1: full decode; 2, 4, 8: JPEG draft).
        chip_affine: ``(2, 3)`` chip -> original affine (continuous coordinates) when the chip
            was not cut at full resolution (reduced-scale decode), else None (computed from
            ``box`` and ``theta``).
    """

    uri: str
    content_hash: str
    image: Image.Image
    original_size: tuple[int, int]
    box: tuple[int, int, int, int] | None
    theta: float
    decode_scale: int = 1
    chip_affine: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(W, H)`` of :attr:`image`."""
        return self.image.size

    def _frame(self) -> tuple[int, int, int, int]:
        if self.box is not None:
            return self.box
        return (0, 0, self.original_size[0], self.original_size[1])

    def chip_to_original(self) -> np.ndarray:
        """``(3, 3)`` transform from chip coordinates to original coordinates (both continuous).

        The crop box rotated by ``theta`` about its centre (module docstring), or the stored
        :attr:`chip_affine` of a reduced-scale decode.
        """
        if self.chip_affine is not None:
            return as_transform(self.chip_affine)
        x0, y0, w, h = self._frame()
        return compose(translation(x0 + w / 2.0, y0 + h / 2.0), rotation(self.theta), translation(-w / 2.0, -h / 2.0))

    def model_to_original(self, input_size: tuple[int, int] | None = None) -> np.ndarray:
        """``(3, 3)`` transform from model-input coordinates to original coordinates.

        ``input_size``: ``(H, W)`` the chip was resized to (no aspect preservation); None means
        model-input coordinates are chip coordinates.
        """
        if input_size is None:
            return self.chip_to_original()
        if len(input_size) != 2 or min(input_size) <= 0:
            raise ShapeError("input_size", tuple(input_size), "(H, W) with H, W > 0")
        (in_h, in_w), (chip_w, chip_h) = input_size, self.image.size
        return compose(self.chip_to_original(), scaling(chip_w / in_w, chip_h / in_h))

    def to_original(self, xy: np.ndarray, input_size: tuple[int, int] | None = None) -> np.ndarray:
        """Map model-input points to the original (EXIF-upright, full-resolution) image.

        Args:
            xy: ``(N, 2)`` points ``(x, y)`` in model-input coordinates (continuous, as the
                engine's cell centres are).
            input_size: ``(H, W)`` the chip was resized to; None means ``xy`` is in chip
                coordinates.

        Returns:
            ``(N, 2)`` float64 ``(x, y)`` in original coordinates: undoes the resize, the
            rotation and the crop offset (and a reduced-scale decode).
        """
        return map_points(self.model_to_original(input_size), _checked_points(xy))

    def from_original(self, xy: np.ndarray, input_size: tuple[int, int] | None = None) -> np.ndarray:
        """Inverse of :meth:`to_original`: ``(N, 2)`` original -> ``(N, 2)`` model input."""
        return map_points(invert(self.model_to_original(input_size)), _checked_points(xy))


def _checked_points(xy: np.ndarray) -> np.ndarray:
    points = np.asarray(xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ShapeError("xy", points.shape, "(N, 2)")
    return points


# ---------------------------------------------------------------------- mode conversion
def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    clipped = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(clipped, mode="L").convert("RGB")


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) * (255.0 / (hi - lo))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return _gray_to_rgb(np.asarray(image).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 255:
            return _gray_to_rgb(values)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(values / 257.0)
        return _gray_to_rgb(_minmax(values) if values.size else values)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1.0:
            return _gray_to_rgb(values * 255.0)
        if values.size and values.min() >= 0 and values.max() <= 255.0:
            return _gray_to_rgb(values)
        return _gray_to_rgb(_minmax(values) if values.size else values)
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------- boxes
def _pixel_box(
    box: Sequence[float], width: int, height: int, uri: str, clip: bool
) -> tuple[int, int, int, int]:
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ImageError(uri, f"box must be 4 numbers (x, y, w, h), got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ImageError(uri, f"box must be 4 finite numbers (x, y, w, h), got {box!r}")
    x, y, w, h = values
    if w <= 0 or h <= 0:
        raise ImageError(uri, f"box {box!r} has a non-positive size")
    if max(values) <= 1.0:
        x, w = x * width, w * width
        y, h = y * height, h * height
    reach = ABSURD_BOX_FACTOR
    if not (-reach * width <= x and x + w <= reach * width and -reach * height <= y and y + h <= reach * height):
        raise ImageError(uri, f"box {box!r} reaches more than {reach} times the size of the {width}x{height} "
                              "image (wrong units?)")
    x1, y1, x2, y2 = round(x), round(y), round(x + w), round(y + h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ImageError(uri, f"box {box!r} is smaller than one pixel")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ImageError(uri, f"box {box!r} lies outside the {width}x{height} image")
    if clip:
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    return (x1, y1, x2 - x1, y2 - y1)


# ---------------------------------------------------------------------- decoding
def _allowed_formats() -> list[str]:
    Image.init()  # registers all plugins once; cheap afterwards
    return [name for name in ALLOWED_FORMATS if name in Image.OPEN]


def _open_checked(data: bytes, uri: str, max_pixels: int, draft=None) -> tuple[Image.Image, int]:
    """Open, check and load ``data``; ``draft(opened) -> scale`` may reduce the decode first."""
    if len(data) == 0:
        raise ImageError(uri, "empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except UnidentifiedImageError:
        raise ImageError(uri, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(uri, f"decompression bomb refused ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageError(uri, f"cannot read image header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(uri, f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            uri,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(decompression bomb guard)",
        )
    scale = draft(image) if draft is not None else 1
    try:
        image.load()  # force a full decode: truncated files fail here, not later
    except Image.DecompressionBombError as exc:
        raise ImageError(uri, f"decompression bomb refused ({exc})") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError(uri, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from None
    return image, scale


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: exif_transpose keeps the stored orientation too
        return 1


def _max_draft_scale(draftable: bool, stored_size: tuple[int, int], upright_size: tuple[int, int],
                     chips: Sequence[Chip], need: DecodeNeed | None, uri: str) -> int:
    """Largest DCT scale (8, 4, 2; 1: none) that divides both stored sides and keeps every chip of
    ``chips`` at least ``need.target_size`` (H, W) and its long side at least
    ``PICTURE_FLOOR_SHARE * min(need.picture_long_side, its full-resolution long side)``.

    A chip whose box is unusable does not bound the scale: it fails when it is cut.
    """
    if not draftable or need is None:
        return 1
    stored_w, stored_h = stored_size
    upright_w, upright_h = upright_size
    target_h, target_w = need.target_size
    limit = math.inf
    for box, theta in chips:
        if box is None:
            chip_w, chip_h = upright_w, upright_h
        else:
            try:
                _, _, chip_w, chip_h = _pixel_box(box, upright_w, upright_h, uri, clip=float(theta) == 0.0)
            except (ImageError, TypeError, ValueError):
                continue
        long_side = max(chip_w, chip_h)
        picture_floor = max(PICTURE_FLOOR_SHARE * min(need.picture_long_side, long_side), 1)
        limit = min(limit, chip_w / max(target_w, 1), chip_h / max(target_h, 1), long_side / picture_floor)
    for scale in _DRAFT_SCALES:
        if scale <= limit and stored_w % scale == 0 and stored_h % scale == 0:
            return scale
    return 1


def _apply_draft(image: Image.Image, scale: int, uri: str) -> int:
    """Ask Pillow to decode ``image`` (a JPEG, not yet loaded) at ``1/scale``; the scale it applied."""
    if scale == 1:
        return 1
    stored_w, stored_h = image.size
    result = image.draft("RGB", (stored_w // scale, stored_h // scale))
    if result is None:
        return 1
    applied = stored_w / result[1][2]
    if abs(applied - scale) > 1e-9 or image.size != (stored_w // scale, stored_h // scale):
        raise ImageError(uri, f"JPEG draft gave scale {applied}, expected {scale}")  # pragma: no cover
    return scale


@dataclass(frozen=True)
class DecodeNeed:
    """What the consumers of a photo need from its decode (the pipeline's one decode policy).

    A JPEG is decoded at the largest DCT scale (1/2, 1/4, 1/8 of the stored size) at which every
    chip asked for stays at least ``target_size`` ``(H, W)`` and its long side at least
    :data:`PICTURE_FLOOR_SHARE` of ``min(picture_long_side, its full-resolution long side)``;
    other formats are decoded at full size.
    """

    target_size: tuple[int, int] = (1, 1)
    picture_long_side: int = PICTURE_LONG_SIDE


def decode_need(model_input: tuple[int, int] | None = None) -> DecodeNeed:
    """The need every consumer of a run states: the model input ``(H, W)`` where it has one
    (embedding, stage 1, explaining) and :data:`PICTURE_LONG_SIDE` for the PAIR-X pictures and the
    report's enlarged photos. A decode for the model also serves the report (its scale is never
    coarser than the report's own need)."""
    if model_input is None:
        return DecodeNeed()
    return DecodeNeed(target_size=(int(model_input[0]), int(model_input[1])))


@dataclass(frozen=True, eq=False)
class DecodedPhoto:
    """One decode of a photo: the whole EXIF-upright RGB image at ``1/scale`` of full resolution.

    Chips are cut from it (:meth:`chip`) without decoding again.

    Attributes:
        uri: where the bytes came from.
        content_hash: SHA-256 hex of the raw bytes.
        pixels: RGB ``PIL.Image`` of the whole upright photo, ``original_size / scale``.
        scale: original pixels per decoded pixel (1: full decode; 2, 4, 8: JPEG draft).
        original_size: ``(W, H)`` at full resolution after EXIF orientation.
        stored_size: ``(W, H)`` as stored (before orientation), full resolution.
        draftable: the format can be decoded at a reduced scale (JPEG).
    """

    uri: str
    content_hash: str
    pixels: Image.Image
    scale: int
    original_size: tuple[int, int]
    stored_size: tuple[int, int]
    draftable: bool

    @property
    def nbytes(self) -> int:
        """Bytes the decoded pixels hold (RGB, one byte per channel)."""
        return self.pixels.width * self.pixels.height * 3

    def max_scale(self, chips: Sequence[Chip], need: DecodeNeed | None) -> int:
        """The coarsest scale at which ``chips`` still meet ``need`` (1: full resolution)."""
        return _max_draft_scale(self.draftable, self.stored_size, self.original_size, chips, need, self.uri)

    def serves(self, chips: Sequence[Chip], need: DecodeNeed | None) -> bool:
        """Whether this decode is fine enough for ``chips`` under ``need``."""
        return self.scale <= self.max_scale(chips, need)

    def chip(self, box: Sequence[float] | None = None, theta: float = 0.0, min_side: int = 1) -> LoadedImage:
        """The chip of ``box`` rotated by ``theta`` (module docstring); None: the whole photo.

        Raises:
            ImageError: the photo's shorter side is under ``min_side`` (about the file: carries
                its content hash), or a bad box or rotation, or a chip shorter than ``min_side``.
        """
        theta = float(theta)
        if not math.isfinite(theta):
            raise ImageError(self.uri, f"theta must be finite, got {theta}")
        width, height = self.original_size
        if min(width, height) < min_side:
            error = ImageError(self.uri, f"too small: {width} x {height} px (the shorter side must be at least "
                                         f"{min_side} px)")
            error.content_hash = self.content_hash  # about the file itself: later nights skip this content
            raise error
        return _cut_chip(self.pixels, self.scale, self.uri, self.content_hash, box, theta, min_side)


def decode_photo(
    data: bytes,
    uri: str = "<bytes>",
    *,
    chips: Sequence[Chip] = ((None, 0.0),),
    need: DecodeNeed | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    digest: str | None = None,
) -> DecodedPhoto:
    """Decode raw bytes once, whole and upright, at the scale ``need`` allows for ``chips``.

    The one place where a photo's bytes become pixels (pure: no I/O). ``chips``: the
    ``(box, theta)`` the caller will cut (:meth:`DecodedPhoto.chip`); ``need``: see
    :class:`DecodeNeed` (None: full resolution). ``digest``: the bytes' content hash when the
    caller has it already.

    Raises:
        ImageError: empty, unrecognised, truncated/corrupt or too large (carries the content
            hash: the file itself is bad).
    """
    data = bytes(data)
    if max_pixels <= 0:
        raise ImageError(uri, f"max_pixels must be positive, got {max_pixels}")
    digest = digest or content_hash(data)
    facts: dict[str, Any] = {}

    def draft(opened: Image.Image) -> int:
        stored = opened.size
        draftable = opened.format in ("JPEG", "MPO")
        transposed = draftable and _orientation(opened) in _TRANSPOSING_ORIENTATIONS
        upright = (stored[1], stored[0]) if transposed else stored
        facts.update(stored=stored, draftable=draftable)
        return _apply_draft(opened, _max_draft_scale(draftable, stored, upright, chips, need, uri), uri)

    try:
        image, scale = _open_checked(data, uri, max_pixels, draft)
    except ImageError as error:
        error.content_hash = digest  # about the file itself: later nights skip this content
        raise
    pixels = to_rgb(_upright(image))
    return DecodedPhoto(uri=uri, content_hash=digest, pixels=pixels, scale=scale,
                        original_size=(pixels.width * scale, pixels.height * scale),
                        stored_size=facts["stored"], draftable=facts["draftable"])


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    *,
    box: Sequence[float] | None = None,
    theta: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    target_size: tuple[int, int] | None = None,
    picture_long_side: int = PICTURE_LONG_SIDE,
) -> LoadedImage:
    """Decode raw bytes into a :class:`LoadedImage` (pure: no I/O).

    Steps: validate and fully decode, apply the EXIF orientation, convert to RGB, then crop
    ``box`` and rotate by ``theta`` (module docstring). ``max_pixels`` bounds ``W * H`` before
    the pixels are decoded (no global Pillow setting is changed). With ``target_size`` ``(H, W)``
    (the model input), a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, never below
    ``target_size`` for the chip nor below ``picture_long_side`` for its long side (module
    docstring); pass a smaller ``picture_long_side`` only when no picture needs the pixels.

    An error about the file itself (empty, unrecognised, corrupt, too large, smaller than
    ``min_side`` on its shorter side) carries the bytes' ``content_hash``, so that a pipeline can
    tell later whether the same content is still there; an error about the box or rotation does
    not (the file is fine).

    Raises:
        ImageError: empty, unrecognised, truncated/corrupt or too large or too small, or a bad
            box/theta.
    """
    theta = float(theta)
    if not math.isfinite(theta):
        raise ImageError(uri, f"theta must be finite, got {theta}")
    need = None if target_size is None else DecodeNeed(tuple(target_size), picture_long_side)
    photo = decode_photo(data, uri, chips=((box, theta),), need=need, max_pixels=max_pixels)
    return photo.chip(box, theta, min_side)


def _upright(image: Image.Image) -> Image.Image:
    """``image`` with its EXIF orientation applied (as stored when the EXIF block is broken)."""
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the stored orientation
        upright = image
    return image if upright is None else upright


def _cut_chip(
    rgb: Image.Image, scale: int, uri: str, digest: str, box: Sequence[float] | None, theta: float,
    min_side: int = 1,
) -> LoadedImage:
    """Crop/rotate the chip from ``rgb``, decoded at ``1/scale`` of the full resolution (1: full).

    Geometry (``original_size``, ``box``, the chip's mapping) stays in full-resolution pixels.
    A box whose chip has a shorter side under ``min_side`` pixels is an error (about the box: no
    content hash).
    """
    width, height = rgb.size[0] * scale, rgb.size[1] * scale  # exact: the scale divides both sides
    pixel_box = None if box is None else _pixel_box(box, width, height, uri, clip=theta == 0.0)
    if pixel_box is not None and min(pixel_box[2], pixel_box[3]) < min_side:
        raise ImageError(uri, f"the crop box {tuple(box)!r} gives a {pixel_box[2]} x {pixel_box[3]} px chip (the "
                              f"shorter side must be at least {min_side} px)")
    full = LoadedImage(uri=uri, content_hash=digest, image=rgb, original_size=(width, height), box=pixel_box,
                       theta=theta)
    if theta == 0.0:
        chip, affine = _crop_chip(rgb, pixel_box, scale)
    else:
        chip, affine = _rotated_chip(rgb, full, scale)
    return LoadedImage(uri=uri, content_hash=digest, image=chip, original_size=(width, height), box=pixel_box,
                       theta=theta, decode_scale=scale, chip_affine=None if scale == 1 else affine[:2])


def cut_chip(whole: LoadedImage, box: Sequence[float] | None = None, theta: float = 0.0,
             min_side: int = 1) -> LoadedImage:
    """Another crop of a photo already decoded whole at full resolution (no second decode).

    ``whole``: a :class:`LoadedImage` of the whole upright photo (no box, no rotation, scale 1),
    e.g. from :func:`load_image` without ``box``. Gives what :func:`decode_image` of the same
    bytes with ``box`` and ``theta`` gives.

    Raises:
        ImageError: a bad box or rotation, or a chip shorter than ``min_side``.
    """
    if whole.box is not None or whole.theta or whole.decode_scale != 1:
        raise ImageError(whole.uri, "cut_chip needs the whole photo decoded at full resolution")
    theta = float(theta)
    if not math.isfinite(theta):
        raise ImageError(whole.uri, f"theta must be finite, got {theta}")
    return _cut_chip(whole.image, 1, whole.uri, whole.content_hash, box, theta, min_side)


def _crop_chip(rgb: Image.Image, pixel_box, scale: int) -> tuple[Image.Image, np.ndarray]:
    """The decoded pixels covering ``pixel_box`` (whole pixels at ``1/scale``) and chip -> original."""
    if pixel_box is None:
        return rgb, scaling(scale)
    x, y, w, h = pixel_box
    left, top = x // scale, y // scale
    right, bottom = -(-(x + w) // scale), -(-(y + h) // scale)
    return rgb.crop((left, top, right, bottom)), compose(translation(left * scale, top * scale), scaling(scale))


def _rotated_chip(rgb: Image.Image, full: LoadedImage, scale: int) -> tuple[Image.Image, np.ndarray]:
    """The rotated box sampled (bilinear, white outside) at ``1/scale``, and chip -> original."""
    _, _, w, h = full._frame()
    chip_w, chip_h = max(1, round(w / scale)), max(1, round(h / scale))
    # chip -> original: the full-resolution mapping with chip pixels stretched to w/chip_w, h/chip_h
    affine = compose(full.chip_to_original(), scaling(w / chip_w, h / chip_h))
    to_decoded = compose(scaling(1.0 / scale), affine)  # chip -> decoded pixels, as Pillow wants it
    chip = rgb.transform(
        (chip_w, chip_h),
        Image.Transform.AFFINE,
        data=tuple(float(v) for v in to_decoded[:2].reshape(-1)),
        resample=Image.Resampling.BILINEAR,
        fillcolor=_WHITE,
    )
    return chip, affine


def load_image(
    source: str | bytes,
    *,
    storage: StorageTarget | None = None,
    box: Sequence[float] | None = None,
    theta: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    target_size: tuple[int, int] | None = None,
    picture_long_side: int = PICTURE_LONG_SIDE,
) -> LoadedImage:
    """Read (if needed) and decode one image.

    Args:
        source: raw bytes, or a URL/path (relative to ``storage``'s root when ``storage`` is
            given, else any fsspec URL).
        storage: where relative paths live; also supplies storage options.
        box, theta, max_pixels, min_side, target_size, picture_long_side: see :func:`decode_image`.
        uri: name used in errors and in the result when ``source`` is bytes.
        storage_options: fsspec options when ``storage`` is None and ``source`` is a URL.

    Raises:
        ImageError: the bytes are not a usable image.
        StorageError: the file cannot be read (missing, permission); transient I/O errors
            propagate unchanged (see ``infra.storage.is_transient``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), uri or "<bytes>", box=box, theta=theta, max_pixels=max_pixels,
                            min_side=min_side, target_size=target_size, picture_long_side=picture_long_side)
    if storage is None:
        storage = StorageTarget.from_url(str(source), storage_options)
        location = storage.root
        data = storage.read_bytes("")
    else:
        location = storage.url(str(source))
        data = storage.read_bytes(str(source))
    return decode_image(data, uri or location, box=box, theta=theta, max_pixels=max_pixels, min_side=min_side,
                        target_size=target_size, picture_long_side=picture_long_side)
