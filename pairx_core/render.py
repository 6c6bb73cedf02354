"""The PAIR-X picture of one pair at one layer (spec step 6), drawn with Pillow and numpy.

Top panel: both images side by side, each under its intermediate relevance (jet colour map,
about 40 % opacity), with the top ``k_lines`` matches as lines between cell centres. Bottom
panel: the ``k_colors`` pixel maps, each in its own colour, accumulated on white. Optional
caption strip with similarity, layer and IRM. ``compact=True`` draws the top panel only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .results import LayerExplanation

LINE_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230)]
#: grey, purple, blue, green, orange, red (the spec's cycle for pixel maps)
REGION_COLOURS = [(128, 128, 128), (128, 0, 160), (0, 90, 230), (0, 160, 60), (255, 140, 0), (220, 20, 20)]
OVERLAY_OPACITY = 0.4
CAPTION_HEIGHT = 22


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


def _overlay(image: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """Blend the jet map of ``relevance`` ``(h, w)``, resized to the image ``(H, W, 3)``."""
    height, width = image.shape[:2]
    heat = Image.fromarray(jet(_normalise(relevance))).resize((width, height), Image.BILINEAR)
    blended = (1 - OVERLAY_OPACITY) * image.astype(np.float64) + OVERLAY_OPACITY * np.asarray(heat, np.float64)
    return blended.astype(np.uint8)


def _regions(pixel_maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Accumulate ``(k, H, W)`` pixel maps on white, one colour each (rank order, cycling)."""
    canvas = np.full((*shape, 3), 255.0)
    for j, pixel_map in enumerate(pixel_maps):
        alpha = np.sqrt(_normalise(pixel_map))[..., None]  # sqrt: faint support stays visible
        colour = np.asarray(REGION_COLOURS[j % len(REGION_COLOURS)], dtype=np.float64)
        canvas = canvas * (1 - alpha) + colour * alpha
    return canvas.astype(np.uint8)


def display_scale(input_size: tuple[int, int], min_side: int = 224) -> int:
    """Smallest integer enlargement that makes the shorter input side at least ``min_side``."""
    return max(1, -(-min_side // min(input_size)))


def render(
    layer: LayerExplanation,
    image_0: np.ndarray,
    image_1: np.ndarray,
    *,
    similarity: float | None = None,
    irm: float | None = None,
    caption: bool = True,
    compact: bool = False,
    line_width: int = 2,
    scale: int = 1,
) -> Image.Image:
    """Draw the explanation. ``image_0``, ``image_1``: ``(H, W, 3)`` uint8 at the model input size.

    ``scale`` enlarges the panels (bilinear) before the lines are drawn, so explanations of small
    inputs (e.g. 96 px) stay readable; :func:`display_scale` picks one.
    Returns an RGB image of width ``2 W scale`` and height ``2 H scale`` (``H scale`` when
    compact), plus the caption.
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    height, width = layer.input_size
    for name, image in (("image_0", image_0), ("image_1", image_1)):
        if image.shape != (height, width, 3):
            raise ValueError(f"{name} must be ({height}, {width}, 3) uint8, got {image.shape}")
    top = np.concatenate([_overlay(image_0, layer.relevance_0), _overlay(image_1, layer.relevance_1)], axis=1)
    panels = [top]
    if not compact:
        bottom = np.concatenate(
            [_regions(layer.pixel_relevance_0, (height, width)), _regions(layer.pixel_relevance_1, (height, width))],
            axis=1,
        )
        panels.append(bottom)
    picture = Image.fromarray(np.concatenate(panels, axis=0))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    for j, row in enumerate(layer.matches.head(layer.k_lines).itertuples(index=False)):
        colour = LINE_COLOURS[j % len(LINE_COLOURS)]
        start, end = (row.x_0 * scale, row.y_0 * scale), ((row.x_1 + width) * scale, row.y_1 * scale)
        draw.line([start, end], fill=colour, width=line_width)
        for cx, cy in (start, end):
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], outline=colour)
    if not caption:
        return picture
    captioned = Image.new("RGB", (picture.width, picture.height + CAPTION_HEIGHT), "white")
    captioned.paste(picture, (0, 0))
    parts = [f"layer {layer.layer}"]
    if similarity is not None:
        parts.insert(0, f"similarity {similarity:.3f}")
    if irm is not None:
        parts.append(f"IRM {irm:.3f}")
    parts.append(f"{layer.n_matches} matches")
    ImageDraw.Draw(captioned).text((4, picture.height + 4), " | ".join(parts), fill=(0, 0, 0),
                                   font=ImageFont.load_default())
    return captioned
