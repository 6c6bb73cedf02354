"""Camera-trap style photos of synthetic individuals, with their exact geometry.

:func:`render_photo` draws one photo of an individual under a random affine pose with background
clutter, occlusion, lighting change, blur, noise and sometimes a grey night-time (IR) look. The
photo carries the exact 3x3 ``transform`` from canonical coordinates to image pixels, so the true
correspondence between two photos of the same individual is known (:func:`true_mapping`).

Pixel coordinates follow :mod:`pairx_core.geometry` (continuous: pixel ``(row i, column j)``
covers ``[j, j + 1) x [i, i + 1)``, its centre is ``(j + 0.5, i + 0.5)``).

Everything is deterministic given the seeds: pure numpy and Pillow, no global random state.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..errors import ConfigError
from ..geometry import compose, invert, map_points, rotation, scaling, translation
from .scene import apply_lighting, background, block_mean, occluder, to_night
from .world import CANONICAL_CENTRE, CANONICAL_SIZE, Colour, Individual, make_individuals

#: largest photo side :func:`render_photo` accepts
MAX_SIDE = 4096


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


def true_mapping(photo_a: SyntheticPhoto | np.ndarray, photo_b: SyntheticPhoto | np.ndarray) -> np.ndarray:
    """The 3x3 homography from pixels of ``photo_a`` to pixels of ``photo_b``.

    ``T_b @ inv(T_a)`` with ``T`` the photos' canonical-to-pixel transforms (a photo or its
    transform matrix may be passed). Only meaningful for two photos of the same individual.
    """
    t_a = getattr(photo_a, "transform", photo_a)
    t_b = getattr(photo_b, "transform", photo_b)
    mapping = compose(t_b, invert(t_a))
    return mapping / mapping[2, 2]


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of a synthetic photo: integers from 16 to :data:`MAX_SIDE`, else ConfigError."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"size must be (H, W), got {size!r}") from None
    if height < 16 or width < 16 or height > MAX_SIDE or width > MAX_SIDE:
        raise ConfigError(f"size must be (H, W) with 16 <= H, W <= {MAX_SIDE}, got {size!r}")
    return height, width


def random_pose(rng: np.random.Generator, size: tuple[int, int], difficulty: float) -> np.ndarray:
    """Canonical -> pixel transform ``(3, 3)``: rotation, shear, anisotropic scale, offset."""
    height, width = size
    d = difficulty
    angle = math.radians(rng.uniform(-1, 1) * (15.0 + 60.0 * d))
    scale = min(height, width) / CANONICAL_SIZE * rng.uniform(0.78 - 0.25 * d, 0.97)
    aniso = math.exp(rng.uniform(-1, 1) * 0.15 * d)
    shear = rng.uniform(-1, 1) * 0.15 * d
    tx = rng.uniform(-1, 1) * 0.12 * d * width
    ty = rng.uniform(-1, 1) * 0.12 * d * height
    shear_x = np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return compose(
        translation(width / 2 + tx, height / 2 + ty),
        rotation(angle),
        shear_x,
        scaling(scale * aniso, scale / aniso),
        translation(-CANONICAL_CENTRE[0], -CANONICAL_CENTRE[1]),
    )


# --------------------------------------------------------------------------------------------
# the animal, painted on supersamples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Samples:
    """Supersamples of the photo window ``[c0, c0 + ws / ss) x [r0, r0 + hs / ss)`` and their
    canonical coordinates ``u``, ``v`` (each ``(hs, ws)`` float32)."""

    c0: int
    r0: int
    ss: int
    u: np.ndarray
    v: np.ndarray

    def window(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice]:
        """Rows and columns of the supersamples that cover the pixel box ``low..high`` ``(x, y)``."""
        hs, ws = self.u.shape
        ja, jb = _sample_window(low[0], high[0], self.c0, self.ss, ws)
        ia, ib = _sample_window(low[1], high[1], self.r0, self.ss, hs)
        return slice(ia, max(ia, ib)), slice(ja, max(ja, jb))


def _sample_window(low: float, high: float, origin: int, ss: int, n: int) -> tuple[int, int]:
    """Index range ``[a, b)`` of the supersamples ``j`` (at pixel coordinate
    ``origin + (j + 0.5) / ss``) that cover the pixel interval ``[low, high]``, clipped to ``n``."""
    lo = math.floor((low - origin) * ss - 0.5)
    hi = math.ceil((high - origin) * ss - 0.5) + 1
    return max(lo, 0), min(hi, n)


def _animal_box(individual: Individual, transform: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(c0, c1, r0, r1)`` holding the body's bounding square, clipped to the photo."""
    height, width = size
    r_max = individual.body.max_radius + 1.0
    cx0, cy0 = CANONICAL_CENTRE
    corners = np.array(
        [[cx0 - r_max, cy0 - r_max], [cx0 + r_max, cy0 - r_max], [cx0 - r_max, cy0 + r_max], [cx0 + r_max, cy0 + r_max]]
    )
    px = map_points(transform, corners)
    c0 = max(int(math.floor(px[:, 0].min())), 0)
    c1 = min(int(math.ceil(px[:, 0].max())), width)
    r0 = max(int(math.floor(px[:, 1].min())), 0)
    r1 = min(int(math.ceil(px[:, 1].max())), height)
    return c0, c1, r0, r1


def _samples(transform: np.ndarray, c0: int, c1: int, r0: int, r1: int, ss: int) -> _Samples:
    ws, hs = (c1 - c0) * ss, (r1 - r0) * ss
    xs = c0 + (np.arange(ws) + 0.5) / ss
    ys = r0 + (np.arange(hs) + 0.5) / ss
    inv = np.linalg.inv(transform)
    # canonical coordinates of every supersample; float32 is exact to ~1e-5 units here
    u = ((inv[0, 0] * xs + inv[0, 2]).astype(np.float32)[None, :]
         + (inv[0, 1] * ys).astype(np.float32)[:, None])
    v = ((inv[1, 0] * xs + inv[1, 2]).astype(np.float32)[None, :]
         + (inv[1, 1] * ys).astype(np.float32)[:, None])
    return _Samples(c0, r0, ss, u, v)


def _paint_pattern(colour: np.ndarray, samples: _Samples, individual: Individual, transform: np.ndarray) -> None:
    """Stripes, then spots (above them), into ``colour`` ``(hs, ws, 3)`` in place."""
    stretch = float(np.linalg.norm(transform[:2, :2], 2))  # largest singular value
    for stripe in individual.stripes:
        p0 = map_points(transform, [[stripe.x0, stripe.y0]])[0]
        p1 = map_points(transform, [[stripe.x1, stripe.y1]])[0]
        reach = stripe.width * stretch / 2 + 1.0
        rows, cols = samples.window(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
        uu, vv = samples.u[rows, cols], samples.v[rows, cols]
        if uu.size == 0:
            continue
        dx, dy = stripe.x1 - stripe.x0, stripe.y1 - stripe.y0
        t = ((uu - stripe.x0) * dx + (vv - stripe.y0) * dy) / max(dx * dx + dy * dy, 1e-12)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (uu - stripe.x0 - t * dx) ** 2 + (vv - stripe.y0 - t * dy) ** 2
        colour[rows, cols][dist2 <= (stripe.width / 2) ** 2] = stripe.colour
    for spot in individual.spots:
        centre = map_points(transform, [[spot.x, spot.y]])[0]
        reach = spot.radius * stretch + 1.0
        rows, cols = samples.window(centre - reach, centre + reach)
        uu, vv = samples.u[rows, cols], samples.v[rows, cols]
        if uu.size == 0:
            continue
        colour[rows, cols][(uu - spot.x) ** 2 + (vv - spot.y) ** 2 <= spot.radius**2] = spot.colour


def paint_animal(
    individual: Individual, transform: np.ndarray, size: tuple[int, int], bg: np.ndarray, ss: int
) -> tuple[np.ndarray, np.ndarray]:
    """Composite the animal over ``bg`` ``(H, W, 3)`` in place, anti-aliased with ``ss x ss``
    samples per pixel. Returns ``(image, body coverage (H, W))``."""
    height, width = size
    coverage = np.zeros((height, width), dtype=np.float32)
    c0, c1, r0, r1 = _animal_box(individual, transform, size)
    if c1 <= c0 or r1 <= r0:
        return bg, coverage
    samples = _samples(transform, c0, c1, r0, r1, ss)
    mask = individual.body.contains(samples.u, samples.v)
    colour = np.empty((*samples.u.shape, 3), dtype=np.float32)
    colour[...] = np.asarray(individual.base_colour, dtype=np.float32)
    _paint_pattern(colour, samples, individual, transform)
    alpha = block_mean(mask.astype(np.float32), ss)
    premultiplied = block_mean(colour * mask[..., None], ss)
    region = bg[r0:r1, c0:c1]
    bg[r0:r1, c0:c1] = premultiplied + (1.0 - alpha[..., None]) * region
    coverage[r0:r1, c0:c1] = alpha
    return bg, coverage


# --------------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------------

#: one independent random stream per degradation (switching one off changes nothing else)
_STREAMS = ("pose", "background", "occluder", "lighting", "night", "sensor")


def _streams(individual: Individual, seed: int) -> dict[str, np.random.Generator]:
    root = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(individual.id.encode("utf-8"))])
    return dict(zip(_STREAMS, (np.random.default_rng(s) for s in root.spawn(len(_STREAMS)))))


def _check_render(individual, size, difficulty, night_prob, supersample) -> tuple[int, int]:
    height, width = check_size(size)
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ConfigError(f"render_photo: difficulty must be in [0, 1], got {difficulty}")
    if not 0.0 <= float(night_prob) <= 1.0:
        raise ConfigError(f"render_photo: night_prob must be in [0, 1], got {night_prob}")
    if int(supersample) < 1 or int(supersample) > 8:
        raise ConfigError(f"render_photo: supersample must be in 1..8, got {supersample}")
    if not isinstance(individual, Individual):
        raise ConfigError(f"render_photo: expected an Individual, got {type(individual).__name__}")
    return height, width


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def _sensor(pil: Image.Image, rng: np.random.Generator, difficulty: float, night: bool, blur: bool,
            noise: bool) -> Image.Image:
    """Lens blur and sensor grain (grey grain on night frames). Both draws happen either way."""
    blur_radius = rng.uniform(0.3, 0.4 + 1.2 * difficulty)
    sigma = rng.uniform(1.0, 2.0 + 8.0 * difficulty) * (1.5 if night else 1.0)
    if blur:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=blur_radius))
    if noise:
        grain = rng.normal(0.0, sigma, size=(pil.height, pil.width, 1 if night else 3)).astype(np.float32)
        pil = _to_pil(np.asarray(pil, dtype=np.float32) + grain)
    return pil


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
    shape = _check_render(individual, size, difficulty, night_prob, supersample)
    difficulty, ss = float(difficulty), int(supersample)
    if clean:
        occlusion = clutter = lighting = blur = noise = False
        night = False if night is None else night
    rng = _streams(individual, seed)
    transform = random_pose(rng["pose"], shape, difficulty)
    night_draw = bool(rng["night"].random() < night_prob)
    is_night = night_draw if night is None else bool(night)

    image = background(rng["background"], shape, difficulty, clutter)
    image, coverage = paint_animal(individual, transform, shape, image, ss)
    occ_alpha = np.zeros(shape, dtype=np.float32)
    if occlusion:
        occ_alpha, occ_colour = occluder(rng["occluder"], shape, transform, difficulty, ss)
        image = occ_alpha[..., None] * occ_colour + (1.0 - occ_alpha[..., None]) * image
    if lighting:
        image = apply_lighting(rng["lighting"], image, difficulty)
    if is_night:
        image = to_night(rng["night"], image)
    pil = _sensor(_to_pil(image), rng["sensor"], difficulty, is_night, blur, noise)

    body_mask = coverage > 0.5
    occluder_mask = occ_alpha >= 0.5
    return SyntheticPhoto(image=pil, transform=transform, individual_id=individual.id, night=is_night,
                          visible_mask=body_mask & ~occluder_mask, body_mask=body_mask,
                          occluder_mask=occluder_mask, individual=individual, seed=int(seed),
                          difficulty=difficulty)


def render_canonical(individual: Individual, size: int = 128, background: Colour = (128, 128, 128)) -> SyntheticPhoto:
    """The individual in its canonical pose (no rotation, centred, ``size / 256`` pixels per
    unit) on a flat ``background``, without any degradation: a reference "template" view."""
    height, width = check_size((size, size))
    transform = scaling(width / CANONICAL_SIZE, height / CANONICAL_SIZE)
    bg = np.empty((height, width, 3), dtype=np.float32)
    bg[...] = np.asarray(background, dtype=np.float32)
    image, coverage = paint_animal(individual, transform, (height, width), bg, 2)
    body_mask = coverage > 0.5
    return SyntheticPhoto(image=_to_pil(image), transform=transform, individual_id=individual.id, night=False,
                          visible_mask=body_mask, body_mask=body_mask, occluder_mask=np.zeros_like(body_mask),
                          individual=individual)


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
    size = check_size(size)
    photos = []
    for i, individual in enumerate(make_individuals(n_individuals, seed)):
        for j in range(int(photos_per_individual)):
            photo_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i, j, 0xF0]).generate_state(1)[0])
            photos.append(render_photo(individual, photo_seed, size, **render_kwargs))
    return photos
