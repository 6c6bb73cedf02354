"""Camera-trap detector output: read a MegaDetector batch-output file and pick the detections to use.

The format is the JSON that MegaDetector writes for a batch of photos (``info.format_version``
"1.0" to "1.6"; the tools around it write it too)::

    {"info": {"format_version": "1.4",
              "detector_metadata": {"typical_detection_threshold": 0.2}},
     "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
     "classification_categories": {"0": "lion"},          # optional
     "images": [{"file": "cam1/IMG_0001.JPG",
                 "detections": [{"category": "1", "conf": 0.93,
                                 "bbox": [0.12, 0.30, 0.25, 0.41],
                                 "classifications": [["0", 0.88]]}]},   # optional, best first
                {"file": "cam1/IMG_0002.JPG", "detections": []},        # an empty frame
                {"file": "cam1/IMG_0003.JPG", "failure": "Failure image access"}]}

- ``bbox`` is ``[x_min, y_min, width, height]`` as fractions of the upright photo (EXIF
  orientation applied), origin top-left. Values may leave ``[0, 1]`` by rounding only
  (:data:`BBOX_TOLERANCE`); a box must have a positive size.
- ``file`` is relative to the uploads folder (forward or back slashes); absolute paths and URLs
  are used as they are.
- An entry with a ``failure`` string is a photo the detector could not read: it is counted, never
  processed. An entry with ``detections: []`` is an empty frame.

:func:`read_detections` reads the file (any storage URL, with the storage options of the run),
checks it with the typed models below and selects the detections of one category (default
``animal``) at or above a confidence threshold (default: the file's
``typical_detection_threshold``, else :data:`DEFAULT_MIN_CONFIDENCE`), optionally of one species
(top classification). Each kept detection is one :class:`Detection`; :func:`detection_id` gives it
an identity that survives reruns (photo content hash, index in the photo's ``detections`` list,
box).

Every problem with the file is a :class:`DetectionFileError` (an ``InputError``: exit code 2 at the
CLI) that names the file, and the image entry and detection index where it was found.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pairx_core.errors import ConfigError

from .inputs import InputError, read_input_bytes
from .storage import StorageTarget, is_url

__all__ = [
    "BBOX_TOLERANCE",
    "DEFAULT_CATEGORY",
    "DEFAULT_MIN_CONFIDENCE",
    "Detection",
    "DetectionEntry",
    "DetectionFileError",
    "DetectorFailure",
    "DetectorInfo",
    "DetectorMetadata",
    "DetectorOutput",
    "DetectorSelection",
    "FrameCounts",
    "ImageEntry",
    "detection_id",
    "parse_detector_output",
    "read_detections",
    "resolve_photo",
    "select_detections",
    "write_detector_output",
]

#: detections of this category name are kept unless another is asked for
DEFAULT_CATEGORY = "animal"
#: threshold when neither the caller nor the file's ``typical_detection_threshold`` gives one
DEFAULT_MIN_CONFIDENCE = 0.2
#: how far a normalised box coordinate may leave ``[0, 1]`` (detectors round to 3-4 decimals)
BBOX_TOLERANCE = 1e-3

_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


class DetectionFileError(InputError):
    """A detector output file cannot be used.

    Attributes:
        uri: the file.
        reason: what is wrong (one line).
        image: the ``file`` of the first offending image entry, or None when the problem is not
            about one entry.
        detection: index of the offending detection in that entry's ``detections`` list, or None.
    """

    def __init__(self, uri: str, reason: str, image: str | None = None, detection: int | None = None):
        self.image = image
        self.detection = detection
        where = ""
        if image is not None:
            where = f"image {image!r}"
            if detection is not None:
                where += f", detection {detection}"
            where += ": "
        super().__init__(uri, where + reason)
        self.reason = reason


# ------------------------------------------------------------------------------ the file, typed
def _id_text(value: Any) -> Any:
    """Category ids are strings of integers ("1"); an integer id is taken as its string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


CategoryId = Annotated[str, BeforeValidator(_id_text)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class DetectorMetadata(_Model):
    """``info.detector_metadata``: the thresholds the detector's authors recommend."""

    typical_detection_threshold: float | None = Field(None, ge=0.0, le=1.0)
    conservative_detection_threshold: float | None = Field(None, ge=0.0, le=1.0)


class DetectorInfo(_Model):
    """``info``: the format version (any 1.x) and what produced the file."""

    format_version: str
    detector: str | None = None
    detector_metadata: DetectorMetadata | None = None

    @field_validator("format_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{float(value):.1f}" if float(value).is_integer() else str(value)
        if not isinstance(value, str) or not re.fullmatch(r"1(\.\d+)*", value.strip()):
            raise ValueError(f"format_version {value!r} is not a MegaDetector batch-output version "
                             "(1.0 to 1.6 are known)")
        return value.strip()


def _bbox(value: Any) -> tuple[float, float, float, float]:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"bbox must be 4 numbers [x_min, y_min, width, height], got {shown}")
    x, y, w, h = (float(v) for v in value)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {shown} has a zero or negative size")
    low, high = -BBOX_TOLERANCE, 1.0 + BBOX_TOLERANCE
    if not (low <= x and low <= y and x + w <= high and y + h <= high):
        raise ValueError(f"bbox {shown} leaves the photo: [x_min, y_min, width, height] are fractions "
                         "of the photo, so 0 <= x_min and x_min + width <= 1 (same for y)")
    return (x, y, w, h)


class DetectionEntry(_Model):
    """One element of an image's ``detections`` list."""

    category: CategoryId
    conf: float = Field(ge=0.0, le=1.0)
    #: ``(x_min, y_min, width, height)``, fractions of the upright photo, origin top-left
    bbox: tuple[float, float, float, float]
    #: ``(class id, confidence)`` pairs, best first; None without a classifier
    classifications: list[tuple[CategoryId, float]] | None = None
    #: videos only: the frame the detection is in
    frame_number: int | None = None

    @field_validator("bbox", mode="before")
    @classmethod
    def _check_bbox(cls, value: Any) -> tuple[float, float, float, float]:
        return _bbox(value)

    @property
    def top_classification(self) -> tuple[str, float] | None:
        """The best ``(class id, confidence)``, or None without classifications."""
        if not self.classifications:
            return None
        return max(self.classifications, key=lambda pair: pair[1])


class ImageEntry(_Model):
    """One element of ``images``: a photo, its detections (``[]``: empty frame) or a failure."""

    file: str = Field(min_length=1)
    detections: list[DetectionEntry] | None = None
    failure: str | None = None

    @model_validator(mode="after")
    def _detections_or_failure(self) -> "ImageEntry":
        if self.failure is None and self.detections is None:
            raise ValueError("the entry has neither a `detections` list nor a `failure` string")
        return self


class DetectorOutput(_Model):
    """A whole batch-output file."""

    info: DetectorInfo | None = None
    #: category id -> name (MegaDetector: 1 animal, 2 person, 3 vehicle)
    detection_categories: dict[CategoryId, str] = Field(default_factory=dict)
    #: class id -> name (species or taxon), when a classifier ran
    classification_categories: dict[CategoryId, str] = Field(default_factory=dict)
    classification_category_descriptions: dict[CategoryId, str] = Field(default_factory=dict)
    images: list[ImageEntry]

    @property
    def typical_threshold(self) -> float | None:
        """``info.detector_metadata.typical_detection_threshold`` when the file gives it."""
        if self.info is None or self.info.detector_metadata is None:
            return None
        return self.info.detector_metadata.typical_detection_threshold


# ------------------------------------------------------------------------------ parsing
def _entry_file(document: Mapping[str, Any], index: int) -> str:
    """The ``file`` of image entry ``index`` as written (or a stand-in when it has none)."""
    entry = document["images"][index]
    file = entry.get("file") if isinstance(entry, dict) else None
    return file if isinstance(file, str) and file else f"<images[{index}]>"


def _located(url: str, document: Mapping[str, Any], error: ValidationError) -> DetectionFileError:
    """The first pydantic problem as one line naming the image entry and detection index."""
    first = error.errors()[0]
    loc = list(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    image = detection = None
    if len(loc) >= 2 and loc[0] == "images" and isinstance(loc[1], int):
        image = _entry_file(document, loc[1])
        loc = loc[2:]
        if len(loc) >= 2 and loc[0] == "detections" and isinstance(loc[1], int):
            detection = loc[1]
            loc = loc[2:]
    field = ".".join(map(str, loc))
    if field and not message.startswith(field.rsplit(".", 1)[-1]):
        message = f"{field}: {message}"
    return DetectionFileError(url, message, image, detection)


def parse_detector_output(data: bytes | str, url: str) -> DetectorOutput:
    """Check the text of a batch-output file and return it typed.

    Raises:
        DetectionFileError: not JSON, not an object, no ``images`` list, a field of the wrong type
            or range (a bbox that is not 4 numbers, leaves ``[0, 1]`` beyond rounding or has no
            area; a confidence outside ``[0, 1]``), an entry with neither detections nor failure,
            a detection or classification category id the file does not list, a photo listed
            twice. The first offending entry is named.
    """
    try:
        document = json.loads(data)
    except json.JSONDecodeError as error:
        raise DetectionFileError(
            url, f"not a JSON file (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except ValueError as error:  # undecodable bytes
        raise DetectionFileError(url, f"not a JSON text file ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise DetectionFileError(
            url, f"a detector output is a JSON object, this file holds a {type(document).__name__}")
    if "images" not in document:
        raise DetectionFileError(url, "no `images` list: not a MegaDetector batch-output file "
                                      f"(top-level keys: {', '.join(map(str, document)) or 'none'})")
    if not isinstance(document["images"], list):
        raise DetectionFileError(url, f"`images` must be a list, got {type(document['images']).__name__}")
    try:
        output = DetectorOutput.model_validate(document)
    except ValidationError as error:
        located = _located(url, document, error)
        loc = error.errors()[0]["loc"]
        if len(loc) >= 2 and loc[0] == "images" and isinstance(loc[1], int):
            # the entries before the first malformed one are well-formed: a wrong reference
            # among them comes first
            head = DetectorOutput.model_validate({**document, "images": document["images"][:loc[1]]})
            _check_references(url, head)
        raise located from None
    _check_references(url, output)
    return output


def _check_references(url: str, output: DetectorOutput) -> None:
    """Every category id used is listed; no photo is listed twice (first offending entry raised)."""
    seen: dict[str, int] = {}
    for number, entry in enumerate(output.images):
        key = entry.file.replace("\\", "/")
        if key in seen:
            raise DetectionFileError(url, f"listed twice (image entries {seen[key]} and {number})", entry.file)
        seen[key] = number
        for index, detection in enumerate(entry.detections or []):
            if detection.category not in output.detection_categories:
                listed = ", ".join(f"{k} {v}" for k, v in output.detection_categories.items()) or "none"
                raise DetectionFileError(url, f"unknown category id {detection.category!r} "
                                              f"(detection_categories: {listed})", entry.file, index)
            for class_id, _ in detection.classifications or []:
                if class_id not in output.classification_categories:
                    raise DetectionFileError(url, f"unknown classification category id {class_id!r} "
                                                  f"({len(output.classification_categories)} listed in "
                                                  "classification_categories)", entry.file, index)


# ------------------------------------------------------------------------------ selection
def detection_id(content_hash: str, index: int, bbox: Sequence[float]) -> str:
    """Stable identity of one detection: 16 hex characters.

    Depends on the photo's content (``content_hash``, e.g. :func:`infra.images.content_hash`), the
    detection's index in the photo's ``detections`` list and its box (rounded to 1e-6, so the same
    numbers written again give the same id). Its confidence, category and classification do not
    count: a rerun on the same JSON gives the same ids; a moved box gives a new id for that
    detection only.
    """
    if not isinstance(content_hash, str) or not content_hash:
        raise ConfigError(f"detection_id: content_hash must be a non-empty string, got {content_hash!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"detection_id: index must be an integer >= 0, got {index!r}")
    box = [round(float(v), 6) + 0.0 for v in bbox]
    if len(box) != 4:
        raise ConfigError(f"detection_id: bbox must hold 4 numbers, got {bbox!r}")
    payload = json.dumps([content_hash, index, box], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Detection:
    """One kept detection: a (photo, box) upload item.

    Attributes:
        uri: the photo's full URL (``file`` resolved against the uploads folder).
        file: the photo as written in the detector file.
        index: the detection's position in the photo's ``detections`` list (dropped detections
            keep their places, so the index is the same whatever the selection).
        bbox: ``(x_min, y_min, width, height)``, fractions of the upright photo.
        conf: detector confidence.
        category: the category's name (``animal``).
        species: name of the top classification, None without classifications.
        species_conf: its confidence.
    """

    uri: str
    file: str
    index: int
    bbox: tuple[float, float, float, float]
    conf: float
    category: str
    species: str | None = None
    species_conf: float | None = None

    def pixel_box(self, size: Sequence[int]) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` in whole pixels of the upright photo of ``size = (W, H)``.

        Corners are rounded (as :mod:`infra.images` rounds a box) and clipped to the photo; the
        box keeps at least one pixel on each side.
        """
        width, height = (int(v) for v in size)
        if width < 1 or height < 1:
            raise ConfigError(f"pixel_box: size must be (W, H) >= 1, got {tuple(size)!r}")
        x, y, w, h = self.bbox
        (left, box_width), (top, box_height) = _pixel_span(x, w, width), _pixel_span(y, h, height)
        return (left, top, box_width, box_height)

    def identity(self, content_hash: str) -> str:
        """:func:`detection_id` of this detection, given the photo's content hash."""
        return detection_id(content_hash, self.index, self.bbox)


def _pixel_span(start: float, length: float, extent: int) -> tuple[int, int]:
    """Whole-pixel ``(first, size)`` of the fraction interval ``[start, start + length]``, clipped."""
    low = min(max(round(start * extent), 0), extent - 1)
    high = min(max(round((start + length) * extent), low + 1), extent)
    return low, high - low


@dataclass(frozen=True)
class DetectorFailure:
    """A photo the detector could not process (``failure`` in the file): counted, never used."""

    uri: str
    file: str
    failure: str


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(frozen=True)
class FrameCounts:
    """What a detector file holds for a night.

    ``n_frames = n_with_detections + n_empty + n_failures``.
    """

    n_frames: int
    n_empty: int
    n_detections: int
    n_failures: int

    @property
    def n_with_detections(self) -> int:
        """Frames with at least one kept detection."""
        return self.n_frames - self.n_empty - self.n_failures

    def summary(self, label: str = "animals") -> str:
        """One line, e.g. ``412 frames: 37 with animals (52 detections), 370 empty, 5 detector failures``."""
        return (f"{_plural(self.n_frames, 'frame')}: {self.n_with_detections} with {label} "
                f"({_plural(self.n_detections, 'detection')}), {self.n_empty} empty, "
                f"{_plural(self.n_failures, 'detector failure')}")


@dataclass(frozen=True)
class DetectorSelection:
    """The detections a night uses, and what the rest of the file holds.

    Attributes:
        source: the detector file's URL.
        detections: kept detections in file order (photo by photo, by index).
        failures: entries the detector could not process.
        empty: URLs of frames with no kept detection (file order).
        counts: frame and detection counts.
        category, min_confidence, species: the selection applied (``min_confidence`` as used,
            after the file's default).
    """

    source: str
    detections: tuple[Detection, ...]
    failures: tuple[DetectorFailure, ...]
    empty: tuple[str, ...]
    counts: FrameCounts
    category: str
    min_confidence: float
    species: str | None = None

    @property
    def summary(self) -> str:
        """The counts as one line (see :meth:`FrameCounts.summary`)."""
        plural = self.category if self.category.endswith("s") else self.category + "s"
        label = self.species if self.species else plural
        return self.counts.summary(label)

    def by_photo(self) -> dict[str, list[Detection]]:
        """Kept detections grouped by photo URL (file order): each photo is decoded once."""
        grouped: dict[str, list[Detection]] = {}
        for detection in self.detections:
            grouped.setdefault(detection.uri, []).append(detection)
        return grouped


def resolve_photo(file: str, uploads: StorageTarget) -> str:
    """Full URL of an entry's ``file``: URLs and absolute paths as they are, the rest under ``uploads``.

    Back slashes become forward slashes in relative paths (files written on Windows).

    Raises:
        ValueError: a Windows absolute path (``C:\\...``, ``\\\\server\\...``), or a relative path
            that leaves the uploads folder (``../``).
    """
    text = file.strip()
    if is_url(text):
        return text
    if _WINDOWS_ABSOLUTE.match(text):
        raise ValueError("a Windows absolute path cannot be read here: write paths relative to the uploads folder")
    text = text.replace("\\", "/")
    if text.startswith("/"):
        return text
    normal = posixpath.normpath(text)
    if normal == ".." or normal.startswith("../"):
        raise ValueError("the path leaves the uploads folder")
    return uploads.join(normal)


def _threshold(output: DetectorOutput, min_confidence: float | None) -> float:
    if min_confidence is None:
        typical = output.typical_threshold
        return DEFAULT_MIN_CONFIDENCE if typical is None else float(typical)
    value = float(min_confidence)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
    return value


def _named(names: Mapping[str, str], wanted: str) -> set[str]:
    """Ids whose name is ``wanted`` (case and surrounding spaces ignored)."""
    key = wanted.strip().casefold()
    return {cid for cid, name in names.items() if name.strip().casefold() == key}


def select_detections(
    output: DetectorOutput,
    url: str,
    uploads: str,
    *,
    category: str = DEFAULT_CATEGORY,
    min_confidence: float | None = None,
    species: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DetectorSelection:
    """Keep the detections of ``category`` with ``conf >= min_confidence`` (and of ``species``).

    Args:
        output: the parsed file (:func:`parse_detector_output`).
        url: the file's URL (named in errors).
        uploads: the folder relative ``file`` paths start from.
        category: a detection category name (``animal``, ``person``, ``vehicle`` for MegaDetector).
        min_confidence: threshold in ``[0, 1]``; None: the file's ``typical_detection_threshold``,
            else :data:`DEFAULT_MIN_CONFIDENCE`.
        species: keep only detections whose top classification has this name.

    Raises:
        DetectionFileError: ``category`` or ``species`` is not named by the file's categories, a
            path cannot be resolved.
        ConfigError: ``min_confidence`` outside ``[0, 1]``.
    """
    threshold = _threshold(output, min_confidence)
    category_ids = _named(output.detection_categories, category)
    if not category_ids and output.detection_categories:
        raise DetectionFileError(url, f"no detection category is named {category!r} (detection_categories: "
                                      f"{', '.join(sorted(set(output.detection_categories.values())))})")
    species_ids: set[str] | None = None
    if species is not None:
        species_ids = _named(output.classification_categories, species)
        if not species_ids:
            known = sorted(set(output.classification_categories.values()))
            listed = (f"{', '.join(known[:12])}{' ...' if len(known) > 12 else ''}" if known
                      else "the file has no classification_categories")
            raise DetectionFileError(url, f"no classification category is named {species!r} ({listed})")
    root = StorageTarget.from_url(uploads, storage_options)
    kept: list[Detection] = []
    failures: list[DetectorFailure] = []
    empty: list[str] = []
    for entry in output.images:
        try:
            uri = resolve_photo(entry.file, root)
        except ValueError as error:
            raise DetectionFileError(url, str(error), entry.file) from None
        if entry.failure is not None:
            failures.append(DetectorFailure(uri, entry.file, entry.failure))
            continue
        found = 0
        for index, detection in enumerate(entry.detections or []):
            if detection.category not in category_ids or detection.conf < threshold:
                continue
            top = detection.top_classification
            if species_ids is not None and (top is None or top[0] not in species_ids):
                continue
            kept.append(Detection(
                uri=uri, file=entry.file, index=index, bbox=detection.bbox, conf=detection.conf,
                category=output.detection_categories[detection.category],
                species=output.classification_categories[top[0]] if top else None,
                species_conf=top[1] if top else None))
            found += 1
        if not found:
            empty.append(uri)
    counts = FrameCounts(n_frames=len(output.images), n_empty=len(empty), n_detections=len(kept),
                         n_failures=len(failures))
    return DetectorSelection(source=url, detections=tuple(kept), failures=tuple(failures), empty=tuple(empty),
                             counts=counts, category=category, min_confidence=threshold, species=species)


def read_detections(
    url: str,
    uploads: str,
    *,
    category: str = DEFAULT_CATEGORY,
    min_confidence: float | None = None,
    species: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DetectorSelection:
    """Read a batch-output file from storage, check it and select its detections.

    ``url`` is any storage URL (local path, ``s3://``, ``memory://``); ``storage_options`` serve
    both the file and the uploads folder. See :func:`select_detections` for the selection.

    Raises:
        DetectionFileError: the file is missing, empty or fails :func:`parse_detector_output` or
            :func:`select_detections`.
    """
    root = StorageTarget.from_url(url, storage_options).root
    data = read_input_bytes(url, "detector output", storage_options, error=DetectionFileError)
    output = parse_detector_output(data, root)
    return select_detections(output, root, uploads, category=category, min_confidence=min_confidence,
                             species=species, storage_options=storage_options)


def write_detector_output(url: str, document: Mapping[str, Any],
                          storage_options: Mapping[str, Any] | None = None) -> str:
    """Write a batch-output document (a dict, e.g. from the synthetic camera-trap frames) atomically.

    Returns the full URL written.
    """
    data = json.dumps(document, indent=1).encode()
    return StorageTarget.from_url(url, storage_options).write_bytes_atomic("", data)
