"""Synthetic animal individuals and camera-trap style photos with known geometry.

Every individual lives in a *canonical frame* of ``256 x 256`` units with the body centred at
``(128, 128)``; ``x`` grows to the right and ``y`` downwards, like image coordinates. An individual
has a body silhouette (ellipse-, manta- or whale-shark-like), a base colour and a unique pattern
of spots and stripes, all given in canonical units.

:func:`render_photo` draws one photo of an individual under a random affine pose with background
clutter, occlusion, lighting change, blur, noise and sometimes a grey night-time (IR) look. The
photo carries the exact 3x3 ``transform`` from canonical coordinates to image pixels, so the true
correspondence between two photos of the same individual is known (:func:`true_mapping`).

Pixel coordinate convention (used everywhere in this module and in
:mod:`pairx_core.ground_truth`): continuous coordinates, pixel ``(row i, column j)`` covers
``[j, j + 1) x [i, i + 1)``, so its centre is ``(x, y) = (j + 0.5, i + 0.5)`` and the pixel holding
a point ``(x, y)`` is ``(floor(y), floor(x))``. This is the convention of PIL's and
``torch``'s ``align_corners=False`` resizing: resizing an image from width ``W`` to ``W'``
multiplies every ``x`` by ``W' / W``.

Everything is deterministic given the seeds: pure numpy and Pillow, no global random state.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import ConfigError

CANONICAL_SIZE = 256.0
CANONICAL_CENTRE = (128.0, 128.0)
BODY_KINDS = ("ellipse", "manta", "shark")
_MAX_BODY_RADIUS = 118.0

Colour = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# individuals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyShape:
    """A star-shaped silhouette around the canonical centre.

    The boundary radius at polar angle ``theta`` is a superellipse with half-axes ``a`` (along
    ``x``) and ``b`` (along ``y``) and exponent ``exponent`` (``2`` is an ellipse, smaller is more
    diamond-like, larger more box-like), multiplied by ``1 + sum(amp * cos(k * theta + phase))``
    over ``harmonics``.
    """

    kind: str
    a: float
    b: float
    exponent: float
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def radius(self, theta: np.ndarray | float) -> np.ndarray:
        """Boundary radius (canonical units) at polar angle(s) ``theta`` (radians)."""
        theta = np.asarray(theta, dtype=np.float64)
        p = self.exponent
        c = np.abs(np.cos(theta)) / self.a
        s = np.abs(np.sin(theta)) / self.b
        r = (c**p + s**p) ** (-1.0 / p)
        if self.harmonics:
            mod = np.ones_like(theta)
            for k, amp, phase in self.harmonics:
                mod = mod + amp * np.cos(k * theta + phase)
            r = r * mod
        return r

    @property
    def max_radius(self) -> float:
        """Largest boundary radius (sampled every half degree)."""
        return _max_radius(self)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean mask: which canonical points ``(x, y)`` lie inside the body.

        Uses a 4096-entry table of :meth:`radius` with linear interpolation (relative error
        below 1e-5 for our shapes), which is much faster than evaluating it per point.
        """
        dx = np.asarray(x, dtype=np.float32) - np.float32(CANONICAL_CENTRE[0])
        dy = np.asarray(y, dtype=np.float32) - np.float32(CANONICAL_CENTRE[1])
        table = _radius_table(self)
        pos = (np.arctan2(dy, dx) + np.float32(math.pi)) * np.float32((len(table) - 1) / (2 * math.pi))
        idx = np.clip(pos.astype(np.int32), 0, len(table) - 2)
        frac = pos - idx
        r_edge = table[idx] * (1 - frac) + table[idx + 1] * frac
        return dx * dx + dy * dy <= r_edge * r_edge


@lru_cache(maxsize=256)
def _radius_table(body: BodyShape) -> np.ndarray:
    return body.radius(np.linspace(-math.pi, math.pi, 4097)).astype(np.float32)


@lru_cache(maxsize=256)
def _max_radius(body: BodyShape) -> float:
    return float(body.radius(np.linspace(0.0, 2 * math.pi, 721)).max())


@dataclass(frozen=True)
class Spot:
    """A filled disc: centre ``(x, y)`` and ``radius`` in canonical units, RGB ``colour``."""

    x: float
    y: float
    radius: float
    colour: Colour


@dataclass(frozen=True)
class Stripe:
    """A thick line segment from ``(x0, y0)`` to ``(x1, y1)`` (canonical units), full ``width``."""

    x0: float
    y0: float
    x1: float
    y1: float
    width: float
    colour: Colour


@dataclass(frozen=True)
class Individual:
    """One synthetic animal: silhouette, base colour and its unique spot/stripe pattern.

    Spots never overlap each other and are drawn above the stripes, so the pixel at a spot's
    centre always shows the spot's colour (in a clean render). Stripes are clipped to the body.
    """

    id: str
    body: BodyShape
    base_colour: Colour
    spots: tuple[Spot, ...]
    stripes: tuple[Stripe, ...] = ()

    @property
    def spot_centres(self) -> np.ndarray:
        """``(K, 2)`` float64 canonical ``(x, y)`` of the spot centres."""
        return np.array([(s.x, s.y) for s in self.spots], dtype=np.float64).reshape(-1, 2)

    @property
    def spot_radii(self) -> np.ndarray:
        return np.array([s.radius for s in self.spots], dtype=np.float64)

    @property
    def spot_colours(self) -> np.ndarray:
        """``(K, 3)`` uint8."""
        return np.array([s.colour for s in self.spots], dtype=np.uint8).reshape(-1, 3)


def _clip_colour(rgb: Sequence[float]) -> Colour:
    return tuple(int(np.clip(round(float(v)), 0, 255)) for v in rgb)  # type: ignore[return-value]


def _tinted(rng: np.random.Generator, grey: float, tint: float) -> Colour:
    return _clip_colour(grey + rng.uniform(-tint, tint, size=3))


def _make_body(rng: np.random.Generator) -> BodyShape:
    kind = BODY_KINDS[int(rng.integers(len(BODY_KINDS)))]
    harmonics: list[tuple[int, float, float]] = []
    if kind == "ellipse":
        a, b, p = rng.uniform(88, 108), rng.uniform(58, 82), rng.uniform(1.9, 2.4)
    elif kind == "manta":  # wide, pointed wing tips
        a, b, p = rng.uniform(108, 118), rng.uniform(55, 72), rng.uniform(1.25, 1.55)
        harmonics.append((2, rng.uniform(0.03, 0.08), 0.0))
    else:  # "shark": long, blocky, one end broader (head) than the other (tail)
        a, b, p = rng.uniform(108, 118), rng.uniform(36, 52), rng.uniform(2.2, 3.0)
        harmonics.append((1, rng.uniform(0.05, 0.10), 0.0 if rng.random() < 0.5 else math.pi))
    for k in rng.choice([3, 4, 5, 6], size=2, replace=False):
        harmonics.append((int(k), rng.uniform(0.01, 0.035), rng.uniform(0, 2 * math.pi)))
    body = BodyShape(kind, float(a), float(b), float(p), tuple((k, float(m), float(f)) for k, m, f in harmonics))
    r_max = body.max_radius
    if r_max > _MAX_BODY_RADIUS:
        shrink = _MAX_BODY_RADIUS / r_max
        body = BodyShape(kind, body.a * shrink, body.b * shrink, body.exponent, body.harmonics)
    return body


def _make_individual(index: int, seed_seq: np.random.SeedSequence) -> Individual:
    rng = np.random.default_rng(seed_seq)
    body = _make_body(rng)
    dark_body = rng.random() < 0.6
    if dark_body:
        base = _tinted(rng, rng.uniform(40, 95), 22)
        palette = [_tinted(rng, rng.uniform(185, 240), 18) for _ in range(int(rng.integers(1, 4)))]
    else:
        base = _tinted(rng, rng.uniform(165, 215), 22)
        palette = [_tinted(rng, rng.uniform(15, 65), 18) for _ in range(int(rng.integers(1, 4)))]

    spots: list[Spot] = []
    n_spots = int(rng.integers(14, 36))
    centres = np.empty((0, 2))
    radii = np.empty(0)
    for _ in range(n_spots * 30):
        if len(spots) >= n_spots:
            break
        radius = float(np.exp(rng.uniform(math.log(5.0), math.log(12.0))))
        theta = rng.uniform(0, 2 * math.pi)
        r_edge = float(body.radius(theta))
        rho = math.sqrt(rng.random()) * r_edge
        if rho + 1.2 * radius > r_edge:
            continue
        cx = CANONICAL_CENTRE[0] + rho * math.cos(theta)
        cy = CANONICAL_CENTRE[1] + rho * math.sin(theta)
        if len(spots):
            gaps = np.hypot(centres[:, 0] - cx, centres[:, 1] - cy) - radii - radius
            if gaps.min() < 4.0:
                continue
        colour = palette[int(rng.integers(len(palette)))]
        spots.append(Spot(float(cx), float(cy), radius, colour))
        centres = np.vstack([centres, [cx, cy]])
        radii = np.append(radii, radius)

    stripes: list[Stripe] = []
    stripe_prob = 0.8 if body.kind == "shark" else 0.35
    if rng.random() < stripe_prob:
        for _ in range(int(rng.integers(1, 5))):
            x_mid = CANONICAL_CENTRE[0] + rng.uniform(-0.7, 0.7) * body.a
            half = body.b * rng.uniform(0.5, 0.9)
            tilt = rng.uniform(-0.35, 0.35) * half
            stripes.append(
                Stripe(
                    float(x_mid - tilt), float(CANONICAL_CENTRE[1] - half),
                    float(x_mid + tilt), float(CANONICAL_CENTRE[1] + half),
                    float(rng.uniform(2.5, 5.0)), palette[int(rng.integers(len(palette)))],
                )
            )
    return Individual(f"ind-{index:04d}", body, base, tuple(spots), tuple(stripes))


def make_individuals(n: int, seed: int) -> list[Individual]:
    """``n`` synthetic individuals, ids ``"ind-0000"``, ``"ind-0001"``, ...

    Deterministic per ``seed``; individual ``i`` does not depend on ``n`` (a longer list extends a
    shorter one).
    """
    if int(n) < 0:
        raise ConfigError(f"make_individuals: n must be >= 0, got {n}")
    children = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x1D1]).spawn(int(n))
    return [_make_individual(i, ss) for i, ss in enumerate(children)]


# --------------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SyntheticPhoto:
    """One rendered photo and its exact geometry.

    Attributes:
        image: ``PIL.Image`` in mode ``"RGB"`` of size ``(W, H)`` (grey in all three channels when
            ``night``).
        transform: ``(3, 3)`` float64 homogeneous matrix mapping canonical ``(x, y, 1)`` to image
            pixel coordinates (module docstring gives the pixel convention). Always affine here.
        individual_id: the :attr:`Individual.id`.
        night: whether this is a grey night-time (IR) frame.
        visible_mask: ``(H, W)`` bool, True where the animal's body covers the pixel (coverage
            > 50 %) and no occluder covers it (occluder coverage < 50 %).
        body_mask: ``(H, W)`` bool, body coverage > 50 %, ignoring occluders.
        occluder_mask: ``(H, W)`` bool, occluder coverage >= 50 %.
        individual: the rendered :class:`Individual` (its spots give keypoints).
        seed, difficulty: what :func:`render_photo` was called with.
    """

    image: Image.Image
    transform: np.ndarray
    individual_id: str
    night: bool
    visible_mask: np.ndarray
    body_mask: np.ndarray
    occluder_mask: np.ndarray
    individual: Individual | None = field(default=None, repr=False)
    seed: int = 0
    difficulty: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return (self.image.height, self.image.width)

    def to_pixels(self, canonical_xy: np.ndarray) -> np.ndarray:
        """Map canonical ``(N, 2)`` points to this photo's pixel coordinates."""
        return map_points(self.transform, canonical_xy)

    def spot_pixels(self) -> np.ndarray:
        """``(K, 2)`` pixel ``(x, y)`` of the individual's spot centres (may lie outside)."""
        if self.individual is None:
            raise ConfigError("spot_pixels: this photo carries no Individual")
        return self.to_pixels(self.individual.spot_centres)


def map_points(mapping: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3x3 homogeneous ``mapping`` to points ``xy`` of shape ``(N, 2)`` (or ``(2,)``).

    Returns ``(N, 2)`` float64. Points sent to infinity (homogeneous ``w == 0``) come back as
    ``inf``/``nan``.
    """
    mapping = np.asarray(mapping, dtype=np.float64)
    if mapping.shape != (3, 3):
        raise ConfigError(f"map_points: mapping must be 3x3, got shape {mapping.shape}")
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim == 1 and pts.shape == (2,):
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ConfigError(f"map_points: xy must have shape (N, 2), got {pts.shape}")
    homog = pts @ mapping[:, :2].T + mapping[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return homog[:, :2] / homog[:, 2:3]


def true_mapping(photo_a: SyntheticPhoto | np.ndarray, photo_b: SyntheticPhoto | np.ndarray) -> np.ndarray:
    """The 3x3 homography from pixels of ``photo_a`` to pixels of ``photo_b``.

    ``T_b @ inv(T_a)`` with ``T`` the photos' canonical-to-pixel transforms (a photo or its
    transform matrix may be passed). Only meaningful for two photos of the same individual.
    """
    t_a = np.asarray(getattr(photo_a, "transform", photo_a), dtype=np.float64)
    t_b = np.asarray(getattr(photo_b, "transform", photo_b), dtype=np.float64)
    if t_a.shape != (3, 3) or t_b.shape != (3, 3):
        raise ConfigError("true_mapping: transforms must be 3x3")
    mapping = t_b @ np.linalg.inv(t_a)
    return mapping / mapping[2, 2]


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"size must be (H, W), got {size!r}") from None
    if height < 16 or width < 16 or height > 4096 or width > 4096:
        raise ConfigError(f"size must be (H, W) with 16 <= H, W <= 4096, got {size!r}")
    return height, width


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _random_pose(rng: np.random.Generator, size: tuple[int, int], difficulty: float) -> np.ndarray:
    height, width = size
    d = difficulty
    angle = math.radians(rng.uniform(-1, 1) * (15.0 + 60.0 * d))
    scale = min(height, width) / CANONICAL_SIZE * rng.uniform(0.78 - 0.25 * d, 0.97)
    aniso = math.exp(rng.uniform(-1, 1) * 0.15 * d)
    shear = rng.uniform(-1, 1) * 0.15 * d
    tx = rng.uniform(-1, 1) * 0.12 * d * width
    ty = rng.uniform(-1, 1) * 0.12 * d * height
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rot = np.array([[cos_a, -sin_a, 0.0], [sin_a, cos_a, 0.0], [0.0, 0.0, 1.0]])
    shr = np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    scl = np.diag([scale * aniso, scale / aniso, 1.0])
    return (
        _translate(width / 2 + tx, height / 2 + ty)
        @ rot
        @ shr
        @ scl
        @ _translate(-CANONICAL_CENTRE[0], -CANONICAL_CENTRE[1])
    )


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


def _background(rng: np.random.Generator, size: tuple[int, int], difficulty: float, clutter: bool) -> np.ndarray:
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


def _block_mean(array: np.ndarray, ss: int) -> np.ndarray:
    """Average ``ss x ss`` blocks of the first two axes."""
    if ss == 1:
        return array.astype(np.float32, copy=False)
    total = np.zeros((array.shape[0] // ss, array.shape[1] // ss, *array.shape[2:]), dtype=np.float32)
    for i in range(ss):
        for j in range(ss):
            total += array[i::ss, j::ss]
    return total * np.float32(1.0 / (ss * ss))


def _sample_window(low: float, high: float, origin: int, ss: int, n: int) -> tuple[int, int]:
    """Index range ``[a, b)`` of the supersamples ``j`` (at pixel coordinate
    ``origin + (j + 0.5) / ss``) that cover the pixel interval ``[low, high]``, clipped to ``n``."""
    lo = math.floor((low - origin) * ss - 0.5)
    hi = math.ceil((high - origin) * ss - 0.5) + 1
    return max(lo, 0), min(hi, n)


def _paint_animal(
    individual: Individual, transform: np.ndarray, size: tuple[int, int], bg: np.ndarray, ss: int
) -> tuple[np.ndarray, np.ndarray]:
    """Composite the animal over ``bg`` in place. Returns ``(image, body coverage (H, W))``."""
    height, width = size
    coverage = np.zeros((height, width), dtype=np.float32)
    body = individual.body
    r_max = body.max_radius + 1.0
    cx0, cy0 = CANONICAL_CENTRE
    corners = np.array(
        [[cx0 - r_max, cy0 - r_max], [cx0 + r_max, cy0 - r_max], [cx0 - r_max, cy0 + r_max], [cx0 + r_max, cy0 + r_max]]
    )
    px = map_points(transform, corners)
    c0 = max(int(math.floor(px[:, 0].min())), 0)
    c1 = min(int(math.ceil(px[:, 0].max())), width)
    r0 = max(int(math.floor(px[:, 1].min())), 0)
    r1 = min(int(math.ceil(px[:, 1].max())), height)
    if c1 <= c0 or r1 <= r0:
        return bg, coverage

    ws, hs = (c1 - c0) * ss, (r1 - r0) * ss
    xs = c0 + (np.arange(ws) + 0.5) / ss
    ys = r0 + (np.arange(hs) + 0.5) / ss
    inv = np.linalg.inv(transform)
    # canonical coordinates of every supersample; float32 is exact to ~1e-5 units here
    u = ((inv[0, 0] * xs + inv[0, 2]).astype(np.float32)[None, :]
         + (inv[0, 1] * ys).astype(np.float32)[:, None])
    v = ((inv[1, 0] * xs + inv[1, 2]).astype(np.float32)[None, :]
         + (inv[1, 1] * ys).astype(np.float32)[:, None])
    mask = body.contains(u, v)

    colour = np.empty((hs, ws, 3), dtype=np.float32)
    colour[...] = np.asarray(individual.base_colour, dtype=np.float32)
    stretch = float(np.linalg.norm(transform[:2, :2], 2))  # largest singular value

    for stripe in individual.stripes:
        p0 = map_points(transform, [[stripe.x0, stripe.y0]])[0]
        p1 = map_points(transform, [[stripe.x1, stripe.y1]])[0]
        reach = stripe.width * stretch / 2 + 1.0
        ja, jb = _sample_window(min(p0[0], p1[0]) - reach, max(p0[0], p1[0]) + reach, c0, ss, ws)
        ia, ib = _sample_window(min(p0[1], p1[1]) - reach, max(p0[1], p1[1]) + reach, r0, ss, hs)
        if jb <= ja or ib <= ia:
            continue
        uu, vv = u[ia:ib, ja:jb], v[ia:ib, ja:jb]
        dx, dy = stripe.x1 - stripe.x0, stripe.y1 - stripe.y0
        t = ((uu - stripe.x0) * dx + (vv - stripe.y0) * dy) / max(dx * dx + dy * dy, 1e-12)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (uu - stripe.x0 - t * dx) ** 2 + (vv - stripe.y0 - t * dy) ** 2
        colour[ia:ib, ja:jb][dist2 <= (stripe.width / 2) ** 2] = stripe.colour

    for spot in individual.spots:
        centre = map_points(transform, [[spot.x, spot.y]])[0]
        reach = spot.radius * stretch + 1.0
        ja, jb = _sample_window(centre[0] - reach, centre[0] + reach, c0, ss, ws)
        ia, ib = _sample_window(centre[1] - reach, centre[1] + reach, r0, ss, hs)
        if jb <= ja or ib <= ia:
            continue
        inside = (u[ia:ib, ja:jb] - spot.x) ** 2 + (v[ia:ib, ja:jb] - spot.y) ** 2 <= spot.radius**2
        colour[ia:ib, ja:jb][inside] = spot.colour

    alpha = _block_mean(mask.astype(np.float32), ss)
    premultiplied = _block_mean(colour * mask[..., None], ss)
    region = bg[r0:r1, c0:c1]
    bg[r0:r1, c0:c1] = premultiplied + (1.0 - alpha[..., None]) * region
    coverage[r0:r1, c0:c1] = alpha
    return bg, coverage


def _occluder(
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
            [(float((aim[0] + r * math.cos(a)) * ss), float((aim[1] + r * math.sin(a)) * ss)) for a, r in zip(angles, rr)],
            fill=255,
        )
        base = _BACKGROUND_PALETTE[rng.integers(len(_BACKGROUND_PALETTE))] * rng.uniform(0.6, 1.1)
    alpha = _block_mean(np.asarray(canvas, dtype=np.float32) / 255.0, ss)
    texture = _smooth_noise(rng, size, max(4, scale // 12))
    occ_colour = base[None, None, :] * (1.0 + 0.25 * texture[..., None])
    return alpha, occ_colour


def _apply_lighting(rng: np.random.Generator, image: np.ndarray, difficulty: float) -> np.ndarray:
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


def _to_night(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Grey, IR-like: luminance weighted towards red/green, brightened, low contrast."""
    grey = image[..., 0] * 0.40 + image[..., 1] * 0.45 + image[..., 2] * 0.15
    grey = 255.0 * np.power(np.clip(grey, 0, 255) / 255.0, rng.uniform(0.55, 0.8))
    grey = grey * rng.uniform(0.85, 1.1) + rng.uniform(0, 20)
    return np.repeat(grey[..., None], 3, axis=2)


def render_photo(
    individual: Individual,
    seed: int,
    size: Sequence[int] = (128, 128),
    *,
    night: bool | None = None,
    difficulty: float = 0.5,
    night_prob: float = 0.25,
    occlusion: bool = True,
    clutter: bool = True,
    lighting: bool = True,
    blur: bool = True,
    noise: bool = True,
    clean: bool = False,
    supersample: int = 2,
) -> SyntheticPhoto:
    """Render one camera-trap style photo of ``individual``.

    Args:
        individual: what to draw.
        seed: photo seed; together with ``individual.id`` it fixes every random choice, so the
            same arguments give identical pixels.
        size: ``(H, W)`` of the photo.
        night: force a night (grey IR) frame (True) or a day frame (False); ``None`` draws it
            with probability ``night_prob``.
        difficulty: ``0..1``; scales the pose range (rotation up to ``15 + 60 * d`` degrees,
            smaller scale, anisotropy, shear, off-centre translation), occluder size, number of
            clutter shapes, lighting change, blur and noise.
        occlusion, clutter, lighting, blur, noise: switch single degradations off. Each one
            draws from its own random stream, so switching one off changes nothing else (the
            ``transform`` in particular depends only on ``individual``, ``seed``, ``size``,
            ``difficulty``).
        clean: shorthand for all five switches off and ``night`` defaulting to False.
        supersample: anti-aliasing factor for the animal and the occluder (``ss x ss`` samples
            per pixel).
    """
    height, width = _check_size(size)
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ConfigError(f"render_photo: difficulty must be in [0, 1], got {difficulty}")
    if not 0.0 <= float(night_prob) <= 1.0:
        raise ConfigError(f"render_photo: night_prob must be in [0, 1], got {night_prob}")
    if int(supersample) < 1 or int(supersample) > 8:
        raise ConfigError(f"render_photo: supersample must be in 1..8, got {supersample}")
    if not isinstance(individual, Individual):
        raise ConfigError(f"render_photo: expected an Individual, got {type(individual).__name__}")
    difficulty = float(difficulty)
    ss = int(supersample)
    if clean:
        occlusion = clutter = lighting = blur = noise = False
        if night is None:
            night = False

    root = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(individual.id.encode("utf-8"))])
    pose_rng, bg_rng, occ_rng, light_rng, night_rng, sensor_rng = (
        np.random.default_rng(s) for s in root.spawn(6)
    )
    transform = _random_pose(pose_rng, (height, width), difficulty)
    night_draw = bool(night_rng.random() < night_prob)
    is_night = night_draw if night is None else bool(night)

    image = _background(bg_rng, (height, width), difficulty, clutter)
    image, coverage = _paint_animal(individual, transform, (height, width), image, ss)
    occ_alpha = np.zeros((height, width), dtype=np.float32)
    if occlusion:
        occ_alpha, occ_colour = _occluder(occ_rng, (height, width), transform, difficulty, ss)
        image = occ_alpha[..., None] * occ_colour + (1.0 - occ_alpha[..., None]) * image
    if lighting:
        image = _apply_lighting(light_rng, image, difficulty)
    if is_night:
        image = _to_night(night_rng, image)

    pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")
    blur_radius = sensor_rng.uniform(0.3, 0.4 + 1.2 * difficulty)
    sigma = sensor_rng.uniform(1.0, 2.0 + 8.0 * difficulty) * (1.5 if is_night else 1.0)
    if blur:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=blur_radius))
    if noise:
        channels = 1 if is_night else 3
        grain = sensor_rng.normal(0.0, sigma, size=(height, width, channels)).astype(np.float32)
        noisy = np.asarray(pil, dtype=np.float32) + grain
        pil = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")

    body_mask = coverage > 0.5
    occluder_mask = occ_alpha >= 0.5
    return SyntheticPhoto(
        image=pil,
        transform=transform,
        individual_id=individual.id,
        night=is_night,
        visible_mask=body_mask & ~occluder_mask,
        body_mask=body_mask,
        occluder_mask=occluder_mask,
        individual=individual,
        seed=int(seed),
        difficulty=difficulty,
    )


def render_canonical(individual: Individual, size: int = 128, background: Colour = (128, 128, 128)) -> SyntheticPhoto:
    """The individual in its canonical pose (no rotation, centred, ``size / 256`` pixels per
    unit) on a flat ``background``, without any degradation: a reference "template" view."""
    height, width = _check_size((size, size))
    transform = np.diag([width / CANONICAL_SIZE, height / CANONICAL_SIZE, 1.0])
    bg = np.empty((height, width, 3), dtype=np.float32)
    bg[...] = np.asarray(background, dtype=np.float32)
    image, coverage = _paint_animal(individual, transform, (height, width), bg, 2)
    body_mask = coverage > 0.5
    return SyntheticPhoto(
        image=Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB"),
        transform=transform,
        individual_id=individual.id,
        night=False,
        visible_mask=body_mask,
        body_mask=body_mask,
        occluder_mask=np.zeros_like(body_mask),
        individual=individual,
    )


def make_dataset(
    n_individuals: int,
    photos_per_individual: int,
    seed: int,
    size: Sequence[int] = (128, 128),
    **render_kwargs,
) -> list[SyntheticPhoto]:
    """``n_individuals * photos_per_individual`` photos, grouped by individual in order.

    The individuals are ``make_individuals(n_individuals, seed)`` (each photo also carries its
    :class:`Individual`). Photo ``j`` of individual ``i`` is rendered with a seed derived from
    ``(seed, i, j)``; ``render_kwargs`` go to :func:`render_photo` (``night``, ``difficulty``,
    ``night_prob``, the degradation switches...).
    """
    if int(photos_per_individual) < 0:
        raise ConfigError(f"make_dataset: photos_per_individual must be >= 0, got {photos_per_individual}")
    size = _check_size(size)
    photos = []
    for i, individual in enumerate(make_individuals(n_individuals, seed)):
        for j in range(int(photos_per_individual)):
            photo_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i, j, 0xF0]).generate_state(1)[0])
            photos.append(render_photo(individual, photo_seed, size, **render_kwargs))
    return photos
