"""Synthetic re-ID world with known geometry: individuals, their photos, and ground-truth scoring.

Serves the demo, the benchmarks and the tests (never the production path):

- :mod:`.world`: individuals (body silhouette, base colour, unique spots and stripes) in a
  ``256 x 256`` canonical frame;
- :mod:`.scene`: background clutter, occluders, lighting, night frames;
- :mod:`.photos`: :func:`render_photo` and friends; each photo carries its exact
  canonical -> pixel transform, so :func:`true_mapping` between two photos is known;
- :mod:`.ground_truth`: how many of a matcher's matches land where the true mapping says.

Pixel coordinates follow :mod:`pairx_core.geometry` everywhere.
"""

from .photos import SyntheticPhoto, make_dataset, render_canonical, render_photo, true_mapping
from .world import (
    BODY_KINDS,
    CANONICAL_CENTRE,
    CANONICAL_SIZE,
    BodyShape,
    Individual,
    Spot,
    Stripe,
    make_individuals,
)

__all__ = [
    "BODY_KINDS",
    "CANONICAL_CENTRE",
    "CANONICAL_SIZE",
    "BodyShape",
    "Individual",
    "Spot",
    "Stripe",
    "SyntheticPhoto",
    "make_dataset",
    "make_individuals",
    "render_canonical",
    "render_photo",
    "true_mapping",
]
