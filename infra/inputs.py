"""What a run reads before any model runs: pairs tables, gallery listings, upload listings.

Pure storage and table parsing (no torch, no Prefect), so the CLI can check a run's inputs in
about a second, before it starts a Prefect server, a cluster or a model. Every problem is an
:class:`InputError` that names the file and says what is wrong with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from pairx_core.errors import ConfigError, StorageError

from .storage import StorageTarget

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageKey",
    "InputError",
    "PairItem",
    "derive_pair_id",
    "list_gallery",
    "list_uploads",
    "parse_angle",
    "parse_box",
    "read_pairs",
    "require_folder",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
PAIRS_COLUMNS = ("image_0", "image_1")
OPTIONAL_PAIRS_COLUMNS = ("pair_id", "box_0", "box_1", "theta_0", "theta_1")


#: one decode of an image: ``(uri, box, theta)``
ImageKey = tuple[str, "tuple[float, float, float, float] | None", float]


class InputError(ConfigError):
    """An input of a run (a folder, a pairs table, a manifest) is missing or unusable."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


@dataclass(frozen=True)
class PairItem:
    """One pair to explain: image URLs and optional crop boxes / rotations."""

    pair_id: str
    image_0: str
    image_1: str
    box_0: tuple[float, float, float, float] | None = None
    box_1: tuple[float, float, float, float] | None = None
    theta_0: float = 0.0
    theta_1: float = 0.0
    #: individual of image_1 when known (gallery candidates): named on the picture
    individual_1: str | None = None

    @property
    def image_keys(self) -> tuple[ImageKey, ImageKey]:
        """``(uri, box, theta)`` of each side: what one decode of an image depends on."""
        return (self.image_0, self.box_0, self.theta_0), (self.image_1, self.box_1, self.theta_1)


def derive_pair_id(image_0: str, image_1: str) -> str:
    """Stable id of a pair from its image URLs (order matters)."""
    return hashlib.sha256(f"{image_0}\n{image_1}".encode()).hexdigest()[:16]


def parse_box(value: Any) -> tuple[float, float, float, float] | None:
    """A crop box ``x, y, w, h`` from a table cell.

    Accepts null / NaN / "" (whole image), ``"x y w h"``, ``"[x, y, w, h]"`` (pairs tables) and a
    sequence (the ``pairs`` output table's list column).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            parts = json.loads(value) if value.strip().startswith("[") else value.split()
        except ValueError:
            raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}") from None
    else:
        parts = list(value)
    if len(parts) != 4:
        raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}")
    try:
        return tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}") from None


def parse_angle(value: Any) -> float:
    """A rotation in radians from a table cell; null / NaN / "" mean no rotation."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    try:
        angle = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"a rotation must be a number of radians, got {value!r}") from None
    return 0.0 if math.isnan(angle) else angle


def require_folder(url: str, what: str, storage_options: Mapping[str, Any] | None = None) -> StorageTarget:
    """The target of ``url``, which must be an existing folder (a missing share is not an empty night)."""
    target = StorageTarget.from_url(url, storage_options)
    if not target.exists():
        raise InputError(target.root, f"the {what} folder does not exist (not mounted? wrong path?)")
    fs = target.filesystem()
    if not target.is_object_store and not fs.isdir(fs._strip_protocol(target.root)):
        raise InputError(target.root, f"the {what} location is a file, not a folder")
    return target


def list_uploads(uploads: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Image URLs under the uploads folder (recursive, sorted). The folder must exist."""
    return require_folder(uploads, "uploads", storage_options).list_files("", suffixes=IMAGE_SUFFIXES)


def _read_bytes(url: str, what: str, storage_options: Mapping[str, Any] | None) -> bytes:
    target = StorageTarget.from_url(url, storage_options)
    try:
        data = target.read_bytes("")
    except StorageError as error:
        raise InputError(target.root, f"cannot read the {what}: {error.reason}") from None
    if not data.strip():
        raise InputError(target.root, f"the {what} is empty")
    return data


def _read_frame(url: str, what: str, storage_options: Mapping[str, Any] | None):
    import pandas as pd

    data = _read_bytes(url, what, storage_options)
    if url.endswith((".parquet", ".pq")):
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise InputError(url, f"the {what} is not a readable Parquet file ({type(error).__name__})") from None
    if b"\x00" in data[:4096]:
        raise InputError(url, f"the {what} is not a CSV text file (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(url, f"the {what} is not UTF-8 text (byte {error.start})") from None
    try:
        return pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(url, f"the {what} is not a valid CSV ({str(error).strip().splitlines()[0]})") from None


def read_pairs(url: str, image_root: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> list[PairItem]:
    """Read and check a pairs table (CSV or Parquet); resolve relative paths; derive missing ids.

    Raises:
        InputError: missing, empty, binary or malformed table, missing columns (named), no rows,
            bad boxes or angles (row named), duplicate ``pair_id`` values.
    """
    import pandas as pd

    frame = _read_frame(url, "pairs table", storage_options)
    missing = [c for c in PAIRS_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(url, f"the pairs table lacks column(s) {', '.join(missing)} "
                              f"(has: {', '.join(map(str, frame.columns)) or 'none'}; needs image_0, image_1 "
                              f"and optionally {', '.join(OPTIONAL_PAIRS_COLUMNS)})")
    if frame.empty:
        raise InputError(url, "the pairs table has no rows")
    root = StorageTarget.from_url(image_root, storage_options) if image_root else None
    items = []
    for number, row in enumerate(frame.to_dict("records"), start=2):
        uris = []
        for side in PAIRS_COLUMNS:
            value = row[side]
            if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
                raise InputError(url, f"row {number}: {side} is empty")
            value = str(value).strip()
            relative = root is not None and "://" not in value and not value.startswith("/")
            uris.append(root.join(value) if relative else value)
        pair_id = row.get("pair_id")
        pair_id = str(pair_id) if pair_id is not None and not pd.isna(pair_id) else derive_pair_id(*uris)
        try:
            items.append(PairItem(pair_id, uris[0], uris[1], parse_box(row.get("box_0")), parse_box(row.get("box_1")),
                                  parse_angle(row.get("theta_0")), parse_angle(row.get("theta_1"))))
        except ConfigError as error:
            raise InputError(url, f"row {number}: {error}") from None
    ids = [item.pair_id for item in items]
    if len(ids) != len(set(ids)):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(url, f"duplicate pair_id values: {', '.join(duplicated[:5])}")
    return items


def list_gallery(gallery: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Gallery image URL -> individual, from a manifest CSV or one folder per individual.

    Raises:
        InputError: the folder or manifest is missing, or the manifest lacks its columns.
    """
    if gallery.endswith(".csv"):
        frame = _read_frame(gallery, "gallery manifest", storage_options)
        if not {"image", "individual"} <= set(frame.columns):
            raise InputError(gallery, "the gallery manifest needs columns image, individual "
                                      f"(has: {', '.join(map(str, frame.columns))})")
        if "role" in frame.columns:  # a manifest of a whole dataset: keep the gallery rows
            frame = frame[frame["role"].astype(str) == "gallery"]
        base = StorageTarget.from_url(gallery.rsplit("/", 1)[0], storage_options)
        return {(str(r["image"]) if "://" in str(r["image"]) or str(r["image"]).startswith("/")
                 else base.join(str(r["image"]))): str(r["individual"]) for r in frame.to_dict("records")}
    target = require_folder(gallery, "gallery", storage_options)
    mapping = {}
    for uri in target.list_files("", suffixes=IMAGE_SUFFIXES):
        relative = uri[len(target.url("")):].lstrip("/")
        mapping[uri] = relative.split("/")[0] if "/" in relative else ""
    return mapping
