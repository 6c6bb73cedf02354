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
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from pairx_core.errors import ConfigError, StorageError

from .storage import StorageTarget, is_url

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageKey",
    "InputError",
    "ManifestRow",
    "PairItem",
    "derive_pair_id",
    "list_gallery",
    "PathRules",
    "UploadListing",
    "list_uploads",
    "list_uploads_counted",
    "manifest_rows",
    "listed_sizes",
    "missing_paths",
    "parse_angle",
    "parse_box",
    "read_pairs",
    "require_folder",
]

#: files read as photos (case-insensitive); a GIF is read as its first frame. Anything else in an
#: uploads folder (HEIC, RAW, videos, sidecar files) is counted as unsupported, never read.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
PAIRS_COLUMNS = ("image_0", "image_1")
#: cell texts that mean "no value" in tables written by other tools (R writes NA); an empty cell too
MISSING_MARKERS = ("na", "n/a", "null", "none")
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
    #: why this row is refused without being read (a URL or a path outside the image root), else None
    refusal: str | None = None

    @property
    def image_keys(self) -> tuple[ImageKey, ImageKey]:
        """``(uri, box, theta)`` of each side: what one decode of an image depends on."""
        return (self.image_0, self.box_0, self.theta_0), (self.image_1, self.box_1, self.theta_1)


def derive_pair_id(image_0: str, image_1: str) -> str:
    """Stable id of a pair from its image URLs (order matters)."""
    return hashlib.sha256(f"{image_0}\n{image_1}".encode()).hexdigest()[:16]


def parse_box(value: Any) -> tuple[float, float, float, float] | None:
    """A crop box ``x, y, w, h`` from a table cell.

    Accepts null / NaN / "" / "NA" (whole image), ``"x y w h"``, ``"[x, y, w, h]"`` (pairs tables) and a
    sequence (the ``pairs`` output table's list column).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip() or value.strip().lower() in MISSING_MARKERS or value.strip().lower() == "nan":
            return None
        try:
            parts = json.loads(value) if value.strip().startswith("[") else value.split()
        except ValueError:
            raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}") from None
    elif isinstance(value, (int, float, bool)):
        raise ConfigError(f"a box needs 4 numbers x y w h, got the single value {value!r}")
    else:
        try:
            parts = list(value)
        except TypeError:
            raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}") from None
    if len(parts) != 4:
        raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}")
    try:
        return tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}") from None


def parse_angle(value: Any) -> float:
    """A rotation in radians from a table cell; an empty cell (null, "", "NA") means no rotation.

    A value that is written but not finite (``nan``, ``inf``, a Parquet NaN) is returned as is:
    that pair gets an ``errors`` row when its image is cut (never a silent 0.0).

    Raises:
        ConfigError: text that is not a number.
    """
    if value is None or (isinstance(value, str) and (not value.strip() or value.strip().lower() in MISSING_MARKERS)):
        return 0.0
    if isinstance(value, bool):
        raise ConfigError(f"a rotation must be a number of radians, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"a rotation must be a number of radians, got {value!r}") from None


def require_folder(url: str, what: str, storage_options: Mapping[str, Any] | None = None) -> StorageTarget:
    """The target of ``url``, which must be an existing folder (a missing share is not an empty night)."""
    target = StorageTarget.from_url(url, storage_options)
    if not target.exists():
        raise InputError(target.root, f"the {what} folder does not exist (not mounted? wrong path?)")
    fs = target.filesystem()
    if not target.is_object_store and not fs.isdir(target.raw_path()):
        raise InputError(target.root, f"the {what} location is a file, not a folder")
    return target


@dataclass(frozen=True)
class UploadListing:
    """An uploads folder's files: the photos, and how many others there are by suffix."""

    images: list[str]
    #: files that are not read (HEIC, RAW, videos, sidecars...), counted by lower-case suffix
    #: ("" for a name without one)
    unsupported: dict[str, int]


def _suffix(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return posixpath.splitext(name)[1].lower()


def _folder_prefix(folder: str | None, storage_options: Mapping[str, Any] | None) -> str | None:
    """``folder``'s canonical URL with a trailing slash (what its files' URLs start with)."""
    return StorageTarget.from_url(folder, storage_options).url("").rstrip("/") + "/" if folder else None


def list_uploads_counted(uploads: str, storage_options: Mapping[str, Any] | None = None,
                         exclude: str | None = None) -> UploadListing:
    """Every file under the uploads folder (recursive, one listing): photos by suffix
    (:data:`IMAGE_SUFFIXES`), the rest counted. Files under ``exclude`` (an output root inside
    the folder) are left out. The folder must exist."""
    target = require_folder(uploads, "uploads", storage_options)
    prefix = _folder_prefix(exclude, storage_options)
    images, unsupported = [], {}
    for uri in target.list_files(""):
        if prefix and uri.startswith(prefix):
            continue
        if uri.lower().endswith(IMAGE_SUFFIXES):
            images.append(uri)
        else:
            unsupported[_suffix(uri)] = unsupported.get(_suffix(uri), 0) + 1
    return UploadListing(images, dict(sorted(unsupported.items())))


def list_uploads(uploads: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Image URLs under the uploads folder (recursive, sorted). The folder must exist."""
    return list_uploads_counted(uploads, storage_options).images


def read_input_bytes(url: str, what: str, storage_options: Mapping[str, Any] | None,
                     error: type[InputError] = InputError) -> bytes:
    """The bytes of an input file (pairs table, manifest, detector output); ``error`` (an
    :class:`InputError` class, given the file and the reason) when it cannot be read or is empty."""
    target = StorageTarget.from_url(url, storage_options)
    try:
        data = target.read_bytes("")
    except StorageError as failure:
        raise error(target.root, f"cannot read the {what}: {failure.reason}") from None
    if not data.strip():
        raise error(target.root, f"the {what} is empty")
    return data


def _read_frame(url: str, what: str, storage_options: Mapping[str, Any] | None):
    """The table as a DataFrame of Python values: a CSV's cells as text ("" when empty), a
    Parquet file's as stored (null as None, so that null and NaN stay apart)."""
    import pandas as pd

    data = read_input_bytes(url, what, storage_options)
    if url.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise InputError(url, f"the {what} is not a readable Parquet file ({type(error).__name__})") from None
        return pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object)
                             for name in table.column_names})
    if b"\x00" in data[:4096]:
        raise InputError(url, f"the {what} is not a CSV text file (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(url, f"the {what} is not UTF-8 text (byte {error.start})") from None
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(url, f"the {what} is not a valid CSV ({str(error).strip().splitlines()[0]})") from None


@dataclass(frozen=True)
class PathRules:
    """Which entries of a table may leave its root (``--image-root``, a manifest's folder)."""

    #: URL entries (``http://``, ``file://``, ``s3://``...) are read as written
    allow_urls: bool = False
    #: absolute paths and ``..`` paths that leave the root are read
    allow_outside_root: bool = False

    def resolve(self, root: StorageTarget, value: str) -> tuple[str, str | None]:
        """``(uri, refusal)`` of an entry relative to ``root``; ``refusal`` is None when allowed."""
        if is_url(value):
            if self.allow_urls:
                return value, None
            return value, "a URL entry under --image-root is not read (pass --allow-urls to read URLs)"
        if value.startswith("/") or value.startswith("\\"):
            if self.allow_outside_root:
                return value, None
            return value, ("an absolute path lies outside --image-root (pass --allow-outside-root "
                           "to read it)")
        normal = posixpath.normpath(value.replace("\\", "/"))
        if normal == ".." or normal.startswith("../"):
            if self.allow_outside_root:
                return root.join(value), None
            return value, f"the path leaves --image-root ({value}; pass --allow-outside-root to read it)"
        return root.join(value), None


def _text_cell(url: str, number: int, column: str, value: Any) -> str:
    """An image path cell: non-empty text, else the file, row and column are named."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or \
            (isinstance(value, str) and not value.strip()):
        raise InputError(url, f"row {number}: {column} is empty")
    if not isinstance(value, str):
        raise InputError(url, f"column {column} must hold text (image paths), row {number} holds "
                              f"{type(value).__name__} {value!r}")
    return value.strip()


def read_pairs(url: str, image_root: str | None = None, storage_options: Mapping[str, Any] | None = None,
               rules: PathRules = PathRules()) -> list[PairItem]:
    """Read and check a pairs table (CSV or Parquet); resolve relative paths; derive missing ids.

    With ``image_root``, relative paths are joined to it; URL entries, absolute paths and paths
    that leave the root are kept as items with a ``refusal`` (not read, an ``errors`` row each)
    unless ``rules`` allow them. Without it, every path is used as written.

    Raises:
        InputError: missing, empty, binary or malformed table, missing columns (named), no rows,
            image cells that are not text, boxes that are not 4 numbers or angles that are not
            numbers (file, row and column named), duplicate ``pair_id`` values.
    """
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
        uris, refusals = [], []
        for side in PAIRS_COLUMNS:
            value = _text_cell(url, number, side, row[side])
            uri, refusal = rules.resolve(root, value) if root is not None else (value, None)
            uris.append(uri)
            refusals += [f"{side}: {refusal}"] if refusal else []
        pair_id = row.get("pair_id")
        empty_id = pair_id is None or (isinstance(pair_id, float) and math.isnan(pair_id)) or str(pair_id) == ""
        pair_id = derive_pair_id(*uris) if empty_id else str(pair_id)
        cells = {}
        for column, parse in (("box_0", parse_box), ("box_1", parse_box), ("theta_0", parse_angle),
                              ("theta_1", parse_angle)):
            try:
                cells[column] = parse(row.get(column))
            except ConfigError as error:
                raise InputError(url, f"row {number}, column {column}: {error}") from None
        items.append(PairItem(pair_id, uris[0], uris[1], cells["box_0"], cells["box_1"], cells["theta_0"],
                              cells["theta_1"], refusal="; ".join(refusals) or None))
    ids = [item.pair_id for item in items]
    if len(ids) != len(set(ids)):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(url, f"duplicate pair_id values: {', '.join(duplicated[:5])}")
    return items


def listed_sizes(uris: list[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, int | None]:
    """Byte size of each of ``uris`` (None: it does not exist), from one listing per folder (not a
    stat per file). ``http(s)://`` URLs are left out (nothing to list)."""
    by_folder: dict[str, list[str]] = {}
    for uri in dict.fromkeys(uris):
        if uri.startswith(("http://", "https://")):
            continue
        by_folder.setdefault(uri.rsplit("/", 1)[0] if "/" in uri else ".", []).append(uri)
    sizes: dict[str, int | None] = {}
    for folder, members in by_folder.items():
        target = StorageTarget.from_url(folder, storage_options)
        fs = target.filesystem()
        path = target.raw_path()
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        present = {str(e["name"]).rstrip("/"): e.get("size") for e in entries if e.get("type") != "directory"}
        for uri in members:
            sizes[uri] = present.get(target.raw_path(uri).rstrip("/"))
    return sizes


def missing_paths(uris: list[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Those of ``uris`` that do not exist, found with one listing per folder (not a stat per file).

    URLs other than storage URLs (``http://``...) are not checked.
    """
    return [uri for uri, size in listed_sizes(uris, storage_options).items() if size is None]


#: what a gallery may look like (named when a gallery is refused)
GALLERY_LAYOUTS = ("a folder with one sub-folder per individual (GALLERY/<individual>/<photo>)",
                   "a manifest CSV with columns image, individual")


@dataclass(frozen=True)
class ManifestRow:
    """One row of a gallery manifest: a photo, its individual, and the animal's box and rotation."""

    uri: str
    individual: str
    #: ``(x, y, w, h)`` pixels or fractions (column ``box``), None: the whole photo
    box: tuple[float, float, float, float] | None = None
    #: radians (column ``theta``), applied after the crop
    theta: float = 0.0


def manifest_rows(gallery: str, storage_options: Mapping[str, Any] | None = None, *,
                  allow_outside_root: bool = False) -> list[ManifestRow]:
    """The gallery rows of a manifest CSV ``image, individual[, box, theta, role]``.

    Several rows may name one photo (one per animal, each with its ``box``). Relative entries are
    relative to the manifest's folder and must stay inside it (unless ``allow_outside_root``).

    Raises:
        InputError: missing columns, an empty image cell, an entry leaving the folder, a box that is
            not 4 numbers or an angle that is not a number (file, row and column named).
    """
    frame = _read_frame(gallery, "gallery manifest", storage_options)
    if not {"image", "individual"} <= set(frame.columns):
        raise InputError(gallery, "the gallery manifest needs columns image, individual "
                                  f"(has: {', '.join(map(str, frame.columns))})")
    if "role" in frame.columns:  # a manifest of a whole dataset: keep the gallery rows
        frame = frame[frame["role"].astype(str) == "gallery"]
    base = StorageTarget.from_url(gallery.rsplit("/", 1)[0], storage_options)
    rows = []
    for number, row in zip(frame.index, frame.to_dict("records")):
        line = int(number) + 2
        image = _text_cell(gallery, line, "image", row["image"])
        if not is_url(image) and not image.startswith("/"):
            normal = posixpath.normpath(image)
            if (normal == ".." or normal.startswith("../")) and not allow_outside_root:
                raise InputError(gallery, f"row {line}: image {image} leaves the manifest's folder "
                                          "(pass --allow-outside-root to read it)")
            image = base.join(image)
        try:
            box = parse_box(row.get("box"))
            theta = parse_angle(row.get("theta"))
        except ConfigError as error:
            raise InputError(gallery, f"row {line}: {error}") from None
        rows.append(ManifestRow(image, str(row["individual"]), box, theta))
    return rows


def list_gallery(gallery: str, storage_options: Mapping[str, Any] | None = None, *,
                 unlabelled: bool = False, allow_outside_root: bool = False,
                 exclude: str | None = None) -> dict[str, str]:
    """Gallery image URL -> individual, from a manifest CSV or one folder per individual.

    A manifest's relative entries are relative to its folder and must stay inside it (unless
    ``allow_outside_root``); absolute paths and URLs in a manifest are read as written. A folder
    whose images all lie at its top level (no individual folders) is refused unless
    ``unlabelled`` (every individual then unknown). Files under ``exclude`` (an output root inside
    the folder) are left out.

    Raises:
        InputError: the folder or manifest is missing, the manifest lacks its columns or has an
            entry leaving its folder (row named), or the folder has no individual folders.
    """
    if gallery.endswith(".csv"):
        return {row.uri: row.individual for row in manifest_rows(gallery, storage_options,
                                                                 allow_outside_root=allow_outside_root)}
    target = require_folder(gallery, "gallery", storage_options)
    prefix = _folder_prefix(exclude, storage_options)
    mapping = {}
    for uri in target.list_files("", suffixes=IMAGE_SUFFIXES):
        if prefix and uri.startswith(prefix):
            continue
        relative = uri[len(target.url("")):].lstrip("/")
        mapping[uri] = relative.split("/")[0] if "/" in relative else ""
    if mapping and not any(mapping.values()) and not unlabelled:
        raise InputError(target.root, f"the gallery's {len(mapping)} images lie at its top level, with no folder per "
                                      f"individual; a gallery is {GALLERY_LAYOUTS[0]}, or {GALLERY_LAYOUTS[1]}. "
                                      "To run with every individual unknown, pass --unlabelled-gallery")
    return mapping
