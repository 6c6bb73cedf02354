"""Synthetic individuals: silhouettes, base colours and unique spot/stripe patterns.

Every individual lives in a *canonical frame* of ``256 x 256`` units with the body centred at
``(128, 128)``; ``x`` grows to the right and ``y`` downwards, like image coordinates. An individual
has a body silhouette (ellipse-, manta- or whale-shark-like), a base colour and a unique pattern
of spots and stripes, all given in canonical units. Deterministic given the seed (pure numpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import ConfigError

CANONICAL_SIZE = 256.0
CANONICAL_CENTRE = (128.0, 128.0)
BODY_KINDS = ("ellipse", "manta", "shark")
_MAX_BODY_RADIUS = 118.0

Colour = tuple[int, int, int]


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
