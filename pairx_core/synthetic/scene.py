"""What surrounds the animal in a synthetic photo: background and clutter, occluders, lighting,
night-time (IR) frames, and the box filter that turns supersamples into anti-aliased pixels.

Arrays are ``(H, W)`` or ``(H, W, 3)`` float32 in 0..255, in the pixel convention of
:mod:`pairx_core.geometry`. Every function draws only from the generator it is given.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..geometry import map_points
from .world import CANONICAL_CENTRE


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in ``[-1, 1]``, ``(H, W)`` float32."""
    height, width = size
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


_BACKGROUND_PALETTE = np.array(
    [
        (86, 110, 60), (120, 135, 75), (60, 80, 45),  # vegetation
        (130, 110, 80), (95, 80, 60), (160, 145, 115),  # soil, sand, rock
        (40, 80, 110), (30, 60, 90), (60, 110, 130),  # water
        (110, 110, 105), (150, 150, 140),  # grey rock, sky
    ],
    dtype=np.float32,
)


def background(rng: np.random.Generator, size: tuple[int, int], difficulty: float, clutter: bool) -> np.ndarray:
    """Textured gradient plus (optionally) random clutter shapes. ``(H, W, 3)`` float32 0..255."""
    height, width = size
    c0, c1 = _BACKGROUND_PALETTE[rng.choice(len(_BACKGROUND_PALETTE), size=2, replace=False)]
    c0 = c0 + rng.uniform(-15, 15, 3).astype(np.float32)
    c1 = c1 + rng.uniform(-15, 15, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle)
    ramp = np.clip(ramp + 0.5, 0.0, 1.0)[..., None]
    bg = c0 * (1 - ramp) + c1 * ramp
    texture = _smooth_noise(rng, size, int(rng.integers(4, 9)))
    bg = bg * (1.0 + 0.18 * texture[..., None])
    if not clutter:
        return bg
    fine = _smooth_noise(rng, size, max(8, min(height, width) // 6))
    bg = bg * (1.0 + 0.10 * fine[..., None])
    pil = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(pil)
    n_shapes = int(rng.integers(3, 6 + int(14 * difficulty) + 1))
    scale = min(height, width)
    for _ in range(n_shapes):
        colour = tuple(int(v) for v in np.clip(
            _BACKGROUND_PALETTE[rng.integers(len(_BACKGROUND_PALETTE))] * rng.uniform(0.6, 1.5)
            + rng.uniform(-25, 25, 3), 0, 255))
        kind = rng.random()
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if kind < 0.45:  # rocks, leaves, spot-like distractors
            rx, ry = rng.uniform(0.01, 0.12, size=2) * scale
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind < 0.75:  # grass blades, twigs
            length = rng.uniform(0.1, 0.5) * scale
            ang = rng.uniform(0, math.pi)
            draw.line(
                [cx, cy, cx + length * math.cos(ang), cy + length * math.sin(ang)],
                fill=colour, width=int(rng.integers(1, 4)),
            )
        else:  # irregular polygons
            n_vertices = int(rng.integers(3, 7))
            radius = rng.uniform(0.03, 0.15) * scale
            angles = np.sort(rng.uniform(0, 2 * math.pi, n_vertices))
            rr = radius * rng.uniform(0.5, 1.0, n_vertices)
            draw.polygon(
                [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, rr)],
                fill=colour,
            )
    return np.asarray(pil, dtype=np.float32)



def block_mean(array: np.ndarray, ss: int) -> np.ndarray:
    """Average ``ss x ss`` blocks of the first two axes."""
    if ss == 1:
        return array.astype(np.float32, copy=False)
    total = np.zeros((array.shape[0] // ss, array.shape[1] // ss, *array.shape[2:]), dtype=np.float32)
    for i in range(ss):
        for j in range(ss):
            total += array[i::ss, j::ss]
    return total * np.float32(1.0 / (ss * ss))



def occluder(
    rng: np.random.Generator, size: tuple[int, int], transform: np.ndarray, difficulty: float, ss: int
) -> tuple[np.ndarray, np.ndarray]:
    """A random branch (thick line) or blob near the body. Returns ``(alpha, colour image)``."""
    height, width = size
    scale = min(height, width)
    canvas = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(canvas)
    centre = map_points(transform, [CANONICAL_CENTRE])[0]
    # aim somewhere over the body
    aim = centre + rng.uniform(-0.3, 0.3, size=2) * scale
    if rng.random() < 0.6:  # branch crossing the frame
        ang = rng.uniform(0, math.pi)
        half = 1.5 * max(height, width)
        thick = (0.04 + 0.10 * difficulty) * scale * rng.uniform(0.6, 1.2)
        direction = np.array([math.cos(ang), math.sin(ang)])
        normal = np.array([-direction[1], direction[0]])
        pts = [aim - half * direction + s * thick / 2 * normal for s in (-1, 1)]
        pts += [aim + half * direction + s * thick / 2 * normal for s in (1, -1)]
        draw.polygon([(float(p[0] * ss), float(p[1] * ss)) for p in pts], fill=255)
        # a twig
        t_ang = ang + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        t_len = rng.uniform(0.15, 0.35) * scale
        start = aim + rng.uniform(-0.3, 0.3) * scale * direction
        end = start + t_len * np.array([math.cos(t_ang), math.sin(t_ang)])
        draw.line([float(start[0] * ss), float(start[1] * ss), float(end[0] * ss), float(end[1] * ss)],
                  fill=255, width=max(1, int(thick * ss * 0.4)))
        base = np.array([95, 70, 45], dtype=np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
    else:  # blob: leaf cluster, rock, another animal's body part
        n_vertices = 9
        radius = (0.08 + 0.14 * difficulty) * scale * rng.uniform(0.7, 1.2)
        angles = np.sort(rng.uniform(0, 2 * math.pi, n_vertices))
        rr = radius * rng.uniform(0.6, 1.0, n_vertices)
        draw.polygon(
            [(float((aim[0] + r * math.cos(a)) * ss), float((aim[1] + r * math.sin(a)) * ss))
             for a, r in zip(angles, rr)],
            fill=255,
        )
        base = _BACKGROUND_PALETTE[rng.integers(len(_BACKGROUND_PALETTE))] * rng.uniform(0.6, 1.1)
    alpha = block_mean(np.asarray(canvas, dtype=np.float32) / 255.0, ss)
    texture = _smooth_noise(rng, size, max(4, scale // 12))
    occ_colour = base[None, None, :] * (1.0 + 0.25 * texture[..., None])
    return alpha, occ_colour


def apply_lighting(rng: np.random.Generator, image: np.ndarray, difficulty: float) -> np.ndarray:
    height, width = image.shape[:2]
    d = difficulty
    gain = math.exp(rng.uniform(-1, 1) * (0.1 + 0.35 * d))
    gamma = math.exp(rng.uniform(-1, 1) * (0.1 + 0.3 * d))
    cast = 1.0 + rng.uniform(-1, 1, 3).astype(np.float32) * (0.03 + 0.1 * d)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle)
    shade = 1.0 + (0.1 + 0.4 * d) * rng.uniform(0, 1) * ramp
    out = 255.0 * np.power(np.clip(image, 0, 255) / 255.0, gamma)
    return out * (gain * shade)[..., None] * cast


def to_night(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Grey, IR-like: luminance weighted towards red/green, brightened, low contrast."""
    grey = image[..., 0] * 0.40 + image[..., 1] * 0.45 + image[..., 2] * 0.15
    grey = 255.0 * np.power(np.clip(grey, 0, 255) / 255.0, rng.uniform(0.55, 0.8))
    grey = grey * rng.uniform(0.85, 1.1) + rng.uniform(0, 20)
    return np.repeat(grey[..., None], 3, axis=2)
