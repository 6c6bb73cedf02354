"""Pixel geometry for the whole project: one coordinate convention, point transforms, cell centres.

Convention (continuous pixel coordinates, used by every module that handles positions):

- ``x`` grows to the right, ``y`` downwards; the image's top-left corner is ``(0, 0)``.
- Pixel ``(row i, column j)`` is the square ``[j, j + 1) x [i, i + 1)``; its centre is
  ``(j + 0.5, i + 0.5)``. An image ``W`` pixels wide spans ``0 <= x < W``, and a point ``(x, y)``
  lies in pixel ``(floor(y), floor(x))``.
- Resizing an image from ``W x H`` to ``W' x H'`` (no aspect preservation; Pillow's ``resize``,
  ``torch``'s ``interpolate(align_corners=False)``) multiplies every ``x`` by ``W' / W`` and every
  ``y`` by ``H' / H``: a resize is the plain :func:`scaling` below, with no half-pixel terms.
  Pillow's ``Image.transform(AFFINE)`` takes its matrix in this convention too.

Transforms are ``(3, 3)`` float64 homogeneous matrices acting on column vectors ``(x, y, 1)``:
``p' = M @ p``. Affine ones have last row ``(0, 0, 1)``; a ``(2, 3)`` affine is accepted wherever
a transform is and promoted. :func:`compose` chains them right to left (``compose(a, b)`` applies
``b`` first), like matrix products.

Everything here is pure numpy; errors are :class:`pairx_core.errors.ConfigError`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import ConfigError

__all__ = [
    "as_transform",
    "cell_centres",
    "cell_index_centres",
    "cell_size",
    "compose",
    "invert",
    "map_homogeneous",
    "map_points",
    "rotation",
    "scaling",
    "size_hw",
    "translation",
]


# ---------------------------------------------------------------------- transforms
def as_transform(matrix, name: str = "mapping") -> np.ndarray:
    """A finite ``(3, 3)`` float64 transform from a ``(3, 3)`` or ``(2, 3)`` (affine) matrix."""
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape == (2, 3):
        array = np.vstack([array, [0.0, 0.0, 1.0]])
    if array.shape != (3, 3):
        raise ConfigError(f"{name} must be a 3x3 (or 2x3 affine) matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{name} contains NaN or infinite values")
    return array


def translation(tx: float, ty: float) -> np.ndarray:
    """``(x, y) -> (x + tx, y + ty)``."""
    return np.array([[1.0, 0.0, float(tx)], [0.0, 1.0, float(ty)], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    """``(x, y) -> (sx x, sy y)`` about the origin (``sy`` defaults to ``sx``)."""
    sy = sx if sy is None else sy
    return np.diag([float(sx), float(sy), 1.0])


def rotation(theta: float) -> np.ndarray:
    """Rotation by ``theta`` radians about the origin: ``R = [[cos, -sin], [sin, cos]]``.

    With ``y`` pointing down, a positive ``theta`` turns clockwise on screen.
    """
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


def compose(*transforms) -> np.ndarray:
    """The product ``transforms[0] @ transforms[1] @ ...``: the LAST one is applied first."""
    result = np.eye(3)
    for transform in transforms:
        result = result @ as_transform(transform)
    return result


def invert(transform) -> np.ndarray:
    """The inverse transform; raises :class:`ConfigError` when it is singular."""
    matrix = as_transform(transform)
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        raise ConfigError("the transform is singular (no inverse)") from None


def _points(xy, name: str = "xy") -> np.ndarray:
    array = np.asarray(xy, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 2)
    if array.shape == (2,):
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 2:
        raise ConfigError(f"{name} must have shape (N, 2), got {array.shape}")
    return array


def map_homogeneous(transform, xy) -> np.ndarray:
    """``(N, 3)`` homogeneous images ``(u, v, w)`` of points ``xy`` ``(N, 2)`` (or ``(2,)``).

    ``w > 0`` means the point stays in front of the target "camera" of a projective mapping.
    """
    matrix = as_transform(transform)
    points = _points(xy)
    return points @ matrix[:, :2].T + matrix[:, 2]


def map_points(transform, xy) -> np.ndarray:
    """Apply ``transform`` to points ``xy`` ``(N, 2)`` (or ``(2,)``); returns ``(N, 2)`` float64.

    Points sent to infinity (homogeneous ``w == 0``) come back as ``inf``/``nan``.
    """
    homog = map_homogeneous(transform, xy)
    with np.errstate(divide="ignore", invalid="ignore"):
        return homog[:, :2] / homog[:, 2:3]


# ---------------------------------------------------------------------- feature cells
def size_hw(value: Sequence[int], name: str = "size") -> tuple[int, int]:
    """A positive ``(H, W)`` pair of integers, or :class:`ConfigError`."""
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be (H, W), got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return h, w


def cell_size(grid: Sequence[int], input_size: Sequence[int]) -> tuple[float, float]:
    """``(sx, sy) = (W / w, H / h)``: the size in pixels of one cell of an ``(h, w)`` feature grid
    over an ``(H, W)`` input."""
    h, w = size_hw(grid, "grid")
    height, width = size_hw(input_size, "input_size")
    return (width / w, height / h)


def cell_centres(cells_xy, grid: Sequence[int], input_size: Sequence[int]) -> np.ndarray:
    """Centres ``(N, 2)`` of cells given as integer ``(x, y)`` = (column, row) rows ``(N, 2)``.

    ``((x + 0.5) W / w, (y + 0.5) H / h)``: cell ``(row r, column c)`` covers input pixels
    ``[c sx, (c + 1) sx) x [r sy, (r + 1) sy)``.
    """
    h, w = size_hw(grid, "grid")
    height, width = size_hw(input_size, "input_size")
    cells = _points(cells_xy, "cells_xy")
    return np.stack([(cells[:, 0] + 0.5) * width / w, (cells[:, 1] + 0.5) * height / h], axis=1)


def cell_index_centres(flat_index, grid: Sequence[int], input_size: Sequence[int]) -> np.ndarray:
    """Centres ``(N, 2)`` of cells given by row-major flat index ``row * w + column``."""
    h, w = size_hw(grid, "grid")
    flat = np.asarray(flat_index, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= h * w):
        raise ConfigError(f"flat cell index out of range for a {h}x{w} grid")
    return cell_centres(np.stack([flat % w, flat // w], axis=1), (h, w), input_size)
