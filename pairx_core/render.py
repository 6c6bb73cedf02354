"""The PAIR-X picture of one pair at one layer (spec step 6), drawn with Pillow and numpy.

Layout (the published one, made legible for a reviewer):

- a label strip naming the two sides (``label_0`` e.g. "upload: IMG_0412.jpg", ``label_1`` e.g.
  "candidate: #412 (IMG_0077.jpg)");
- top panel: both photos side by side at their display resolution, each under its intermediate
  relevance (jet colour map, :data:`OVERLAY_OPACITY`), with the top ``k_lines`` matches drawn as
  lines between cell centres;
- bottom panel: the ``k_colors`` pixel maps, each in its own colour (cycling grey, purple, blue,
  green, orange, red), drawn over a faded copy of each photo so that a coloured region can be
  read against the animal's markings;
- a caption strip (similarity, IRM, number of matches, layer), wrapped onto more lines when
  the picture is narrow.

Photos are drawn at their own resolution: :func:`fit_display` caps the long side (default
:data:`DISPLAY_MAX_SIDE`, 1024 px) and enlarges tiny inputs to :data:`DISPLAY_MIN_SIDE`. The two
sides are brought to a common height. Text is at least :data:`MIN_FONT_PX` (14 px) and grows
with the picture. ``compact=True`` draws the top panel only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .geometry import map_points, scaling
from .results import LayerExplanation

LINE_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230)]
#: grey, purple, blue, green, orange, red (the spec's cycle for pixel maps)
REGION_COLOURS = [(128, 128, 128), (128, 0, 160), (0, 90, 230), (0, 160, 60), (255, 140, 0), (220, 20, 20)]
#: jet heatmap opacity over the photo (lighter than the published 0.4, so markings stay visible)
OVERLAY_OPACITY = 0.3
#: how much of the photo shows under the pixel-relevance colours (the rest is white)
FADED_PHOTO = 0.35
#: strongest opacity of a pixel-relevance colour
REGION_OPACITY = 0.85
DISPLAY_MAX_SIDE = 1024
DISPLAY_MIN_SIDE = 320
MIN_FONT_PX = 14


def jet(values: np.ndarray) -> np.ndarray:
    """Jet colour map of values in [0, 1]: ``(...)`` -> ``(..., 3)`` uint8."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _normalise(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    top = values.max() if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def display_size(size: tuple[int, int], max_side: int = DISPLAY_MAX_SIDE,
                 min_side: int = DISPLAY_MIN_SIDE) -> tuple[int, int]:
    """``(W, H)`` to draw an image of ``size`` ``(W, H)``: long side capped at ``max_side``,
    enlarged so the long side reaches ``min_side`` (never above ``max_side``); aspect kept."""
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1 or max_side < 1:
        raise ValueError(f"display_size: bad size {size} or max_side {max_side}")
    long_side = max(width, height)
    target = min(max(long_side, min(min_side, max_side)), max_side)
    factor = target / long_side
    return max(1, round(width * factor)), max(1, round(height * factor))


def fit_display(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE, min_side: int = DISPLAY_MIN_SIDE) -> np.ndarray:
    """An RGB photo (the chip the model saw, before its resize) at display size: ``(H, W, 3)`` uint8."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = display_size(image.size, max_side, min_side)
    if size != image.size:
        image = image.resize(size, Image.LANCZOS if size[0] < image.size[0] else Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def display_scale(input_size: tuple[int, int], min_side: int = 224) -> int:
    """Smallest integer enlargement that makes the shorter input side at least ``min_side``."""
    return max(1, -(-min_side // min(input_size)))


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``size`` ``(W, H)``."""
    field = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(field.resize(size, Image.BILINEAR), dtype=np.float64)


def _overlay(image: np.ndarray, relevance: np.ndarray, opacity: float) -> np.ndarray:
    """Blend the jet map of ``relevance`` ``(h, w)``, resized to the image ``(H, W, 3)``."""
    height, width = image.shape[:2]
    heat = jet(np.clip(_resize_map(_normalise(relevance), (width, height)), 0.0, 1.0))
    blended = (1 - opacity) * image.astype(np.float64) + opacity * heat.astype(np.float64)
    return (blended + 0.5).astype(np.uint8)


def _regions(image: np.ndarray, pixel_maps: np.ndarray) -> np.ndarray:
    """Pixel maps ``(k, h, w)`` in their colours (rank order, cycling) over a faded ``image``."""
    height, width = image.shape[:2]
    canvas = FADED_PHOTO * image.astype(np.float64) + (1 - FADED_PHOTO) * 255.0
    for j, pixel_map in enumerate(pixel_maps):
        resized = np.clip(_resize_map(_normalise(pixel_map), (width, height)), 0.0, 1.0)
        alpha = REGION_OPACITY * np.sqrt(resized)[..., None]  # sqrt: faint support stays visible
        colour = np.asarray(REGION_COLOURS[j % len(REGION_COLOURS)], dtype=np.float64)
        canvas = canvas * (1 - alpha) + colour * alpha
    return (canvas + 0.5).astype(np.uint8)


def _to_height(image: np.ndarray, height: int) -> np.ndarray:
    if image.shape[0] == height:
        return image
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS), dtype=np.uint8)


#: ``Image.info`` key of a rendered picture: ``"top,bottom"`` rows of its panels (between the strips)
PANELS_INFO_KEY = "pairx-panels"


def font_px(picture_side: int) -> int:
    """Text size for a picture whose photos have ``picture_side`` px: >= 14, 18 px at 1024."""
    return max(MIN_FONT_PX, round(18 * picture_side / 1024))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, else without its trailing ``" (...)"`` part, else cut with an ellipsis, to fit ``width``."""
    if draw.textlength(text, font=font) <= width:
        return text
    if text.endswith(")") and " (" in text:
        return _fit_text(draw, text[: text.rindex(" (")], font, width)
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, parts: list[str], font, width: int, separator: str = " | ") -> list[str]:
    """Join ``parts`` into as few lines as fit ``width`` (a part longer than a line is cut)."""
    lines: list[str] = []
    for part in parts:
        if lines and draw.textlength(lines[-1] + separator + part, font=font) <= width:
            lines[-1] += separator + part
        else:
            lines.append(_fit_text(draw, part, font, width))
    return lines


def render(
    layer: LayerExplanation,
    image_0: np.ndarray,
    image_1: np.ndarray,
    *,
    similarity: float | None = None,
    irm: float | None = None,
    caption: bool = True,
    compact: bool = False,
    line_width: int | None = None,
    label_0: str | None = None,
    label_1: str | None = None,
    opacity: float = OVERLAY_OPACITY,
) -> Image.Image:
    """Draw the explanation.

    Args:
        layer: the explanation; match positions are in model-input coordinates
            (``layer.input_size``, :mod:`pairx_core.geometry`'s convention) and are scaled to each
            photo's display size (the model resized without keeping the aspect ratio, so x and y
            scale independently).
        image_0, image_1: ``(H, W, 3)`` uint8 photos at display resolution (:func:`fit_display`
            of the chip), any size and aspect; the model-input size works too.
        label_0, label_1: names of the two sides (a label strip is drawn when either is given).
        caption: add the similarity / IRM / layer strip below.
        compact: top panel only.

    Returns:
        RGB image ``W0' + W1'`` wide, where both photos are brought to the smaller of their two
        heights ``H`` (aspect kept); height ``2 H`` (``H`` when compact) plus the text strips.
    """
    for name, image in (("image_0", image_0), ("image_1", image_1)):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise ValueError(f"{name} must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    height = min(image_0.shape[0], image_1.shape[0])
    photo_0, photo_1 = _to_height(image_0, height), _to_height(image_1, height)
    body = Image.fromarray(_panels(layer, photo_0, photo_1, opacity, compact))
    widths = (photo_0.shape[1], photo_1.shape[1])
    side = max(height, *widths)
    size = font_px(side)
    font, pad = _font(size), max(4, size // 3)
    label_height = size + 2 * pad if (label_0 is not None or label_1 is not None) else 0
    lines = _wrap(ImageDraw.Draw(body), _caption_parts(layer, similarity, irm), font, body.width - 2 * pad) \
        if caption else []
    line_height = size + pad
    caption_height = len(lines) * line_height + pad if lines else 0
    picture = Image.new("RGB", (body.width, label_height + body.height + caption_height), "white")
    picture.paste(body, (0, label_height))
    draw = ImageDraw.Draw(picture)
    _draw_matches(draw, layer, widths, height, label_height, line_width or max(2, round(side / 400)))
    if label_height:
        _draw_labels(draw, (label_0, label_1), widths, label_height, font, pad)
    for number, line in enumerate(lines):
        draw.text((pad, label_height + body.height + pad + number * line_height), line, fill=(0, 0, 0), font=font)
    # where the panels are, for previews that show them without the text strips (saved as PNG text)
    picture.info[PANELS_INFO_KEY] = f"{label_height},{label_height + body.height}"
    return picture


def _panels(layer: LayerExplanation, photo_0: np.ndarray, photo_1: np.ndarray, opacity: float,
            compact: bool) -> np.ndarray:
    """Top panel (relevance overlays) and, unless ``compact``, the pixel-map panel: ``(H', W', 3)``."""
    panels = [np.concatenate([_overlay(photo_0, layer.relevance_0, opacity),
                              _overlay(photo_1, layer.relevance_1, opacity)], axis=1)]
    if not compact:
        panels.append(np.concatenate([_regions(photo_0, layer.pixel_relevance_0),
                                      _regions(photo_1, layer.pixel_relevance_1)], axis=1))
    return np.concatenate(panels, axis=0)


def _caption_parts(layer: LayerExplanation, similarity: float | None, irm: float | None) -> list[str]:
    parts = [] if similarity is None else [f"similarity {similarity:.3f}"]
    parts.append("IRM n/a" if irm is None or not np.isfinite(irm) else f"IRM {irm:.3f}")
    return parts + [f"{layer.n_matches} matches", f"layer {layer.layer}"]


def _draw_matches(draw: ImageDraw.ImageDraw, layer: LayerExplanation, widths: tuple[int, int], height: int,
                  top: int, width: int) -> None:
    """The top ``k_lines`` matches as lines between the photos (drawn ``top`` px below the edge)."""
    in_h, in_w = layer.input_size
    matches = layer.matches.head(layer.k_lines)
    # model input -> display (continuous), then to Pillow's drawing grid (integers at pixel centres)
    ends_0 = map_points(scaling(widths[0] / in_w, height / in_h), matches[["x_0", "y_0"]].to_numpy()) - 0.5
    ends_1 = map_points(scaling(widths[1] / in_w, height / in_h), matches[["x_1", "y_1"]].to_numpy()) - 0.5
    dot = width + 1
    for j, (end_0, end_1) in enumerate(zip(ends_0, ends_1)):
        colour = LINE_COLOURS[j % len(LINE_COLOURS)]
        start = (float(end_0[0]), float(end_0[1]) + top)
        end = (widths[0] + float(end_1[0]), float(end_1[1]) + top)
        draw.line([start, end], fill=colour, width=width)
        for cx, cy in (start, end):
            draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], outline=colour, width=max(1, width // 2))


def _draw_labels(draw: ImageDraw.ImageDraw, labels: tuple[str | None, str | None], widths: tuple[int, int],
                 label_height: int, font, pad: int) -> None:
    for text, x0, span in ((labels[0], 0, widths[0]), (labels[1], widths[0], widths[1])):
        if text:
            draw.text((x0 + pad, pad), _fit_text(draw, text, font, span - 2 * pad), fill=(0, 0, 0), font=font)
    draw.line([(widths[0], 0), (widths[0], label_height)], fill=(160, 160, 160), width=1)
