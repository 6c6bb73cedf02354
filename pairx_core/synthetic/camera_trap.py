"""Camera-trap frames: a wide scene with zero or more synthetic animal crops pasted into it.

A real camera-trap upload is a full frame (a meadow, a reef) holding zero, one or several animals,
and a detector (MegaDetector) says where they are. :func:`render_frame` builds such a frame from
photos of :func:`~.photos.render_photo`: each animal photo (the *crop*) is pasted unchanged at a
random place of a larger background, so cutting the frame at the true box gives back exactly the
crop, and each animal keeps its exact canonical -> frame transform. :func:`make_frames` draws a
night of them; :func:`detector_output` writes what a detector would say about them, in the
MegaDetector batch-output format, with one low-confidence false detection and one detector
failure, as real nights have.

Sizes are ``(H, W)`` as everywhere in this package; boxes are ``(x, y, w, h)`` in whole pixels of
the frame (top-left corner and size), or fractions of the frame in the detector format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..geometry import compose, translation
from .photos import SyntheticPhoto, check_size, render_photo
from .scene import background, to_night
from .world import BODY_KINDS, Individual

__all__ = [
    "CLASSIFICATION_CATEGORIES",
    "DETECTION_CATEGORIES",
    "FAILURE_TEXT",
    "CameraTrapFrame",
    "FrameAnimal",
    "detector_output",
    "make_frames",
    "normalised_box",
    "render_frame",
]

#: MegaDetector's categories
DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
#: the "species" a synthetic classifier names: the body kinds
CLASSIFICATION_CATEGORIES = {str(i): kind for i, kind in enumerate(BODY_KINDS)}
#: what the detector writes for a photo it could not read
FAILURE_TEXT = "Failure image access"
#: free pixels kept between two pasted crops
_GAP = 4
_PLACEMENT_TRIES = 500


@dataclass(frozen=True, eq=False)
class FrameAnimal:
    """One animal pasted into a frame.

    Attributes:
        photo: the crop as rendered alone (its ``transform`` is canonical -> crop pixels).
        box: ``(x, y, w, h)`` whole pixels of the frame where the crop lies; the frame cut at
            ``box`` equals ``photo.image``.
        transform: ``(3, 3)`` canonical -> frame pixels.
    """

    photo: SyntheticPhoto
    box: tuple[int, int, int, int]
    transform: np.ndarray

    @property
    def individual_id(self) -> str:
        return self.photo.individual_id


@dataclass(frozen=True, eq=False)
class CameraTrapFrame:
    """A full frame and the animals in it (file order of a detector output: animal ``j`` is
    detection ``j``).

    Attributes:
        image: ``PIL.Image`` RGB of size ``(W, H)``.
        animals: the pasted animals (possibly none: an empty frame).
        seed: what :func:`render_frame` was called with.
    """

    image: Image.Image
    animals: tuple[FrameAnimal, ...]
    seed: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return (self.image.height, self.image.width)


def normalised_box(box: Sequence[float], size: Sequence[int], digits: int = 4) -> list[float]:
    """Pixel ``(x, y, w, h)`` of a frame of ``size = (H, W)`` as detector fractions
    ``[x_min, y_min, width, height]``, rounded to ``digits`` decimals as MegaDetector writes them."""
    height, width = (int(v) for v in size)
    x, y, w, h = (float(v) for v in box)
    return [round(x / width, digits), round(y / height, digits), round(w / width, digits), round(h / height, digits)]


def _overlaps(box: tuple[int, int, int, int], taken: Sequence[tuple[int, int, int, int]], gap: int) -> bool:
    x, y, w, h = box
    return any(x < tx + tw + gap and tx < x + w + gap and y < ty + th + gap and ty < y + h + gap
               for tx, ty, tw, th in taken)


def _free_box(rng: np.random.Generator, size: tuple[int, int], box_size: tuple[int, int],
              taken: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A random ``(x, y, w, h)`` of ``box_size = (h, w)`` inside the frame, clear of ``taken``."""
    height, width = size
    box_h, box_w = box_size
    for _ in range(_PLACEMENT_TRIES):
        box = (int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1)), box_w, box_h)
        if not _overlaps(box, taken, _GAP):
            return box
    raise ConfigError(f"cannot place {len(taken) + 1} boxes of {box_w}x{box_h} px apart in a {width}x{height} frame; "
                      "use a larger frame or fewer animals")


def render_frame(
    individuals: Sequence[Individual],
    seed: int,
    size: Sequence[int] = (360, 480),
    crop_size: Sequence[int] = (128, 128),
    *,
    difficulty: float = 0.3,
    night: bool = False,
    **render_kwargs: Any,
) -> CameraTrapFrame:
    """A frame of ``size = (H, W)`` with one crop of ``crop_size`` per individual, apart from each other.

    Args:
        individuals: the animals in the frame (none: an empty frame), in detection order.
        seed: fixes the background, the places and each crop's photo seed.
        difficulty: of the background and of each crop (see :func:`render_photo`).
        night: a grey night-time (IR) frame: the background and every crop.
        render_kwargs: further arguments of :func:`render_photo` for the crops.

    Raises:
        ConfigError: a crop larger than the frame, or crops that do not fit apart.
    """
    shape = check_size(size)
    crop_shape = check_size(crop_size)
    if crop_shape[0] > shape[0] or crop_shape[1] > shape[1]:
        raise ConfigError(f"render_frame: crop_size {tuple(crop_size)} does not fit in a frame of {tuple(size)}")
    streams = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xCA7]).spawn(3)
    bg_rng, place_rng, night_rng = (np.random.default_rng(s) for s in streams)
    scene = background(bg_rng, shape, difficulty, True)
    if night:
        scene = to_night(night_rng, scene)
    canvas = Image.fromarray(np.clip(np.rint(scene), 0, 255).astype(np.uint8), mode="RGB")
    animals: list[FrameAnimal] = []
    for slot, individual in enumerate(individuals):
        photo_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, slot, 0xC0]).generate_state(1)[0])
        photo = render_photo(individual, photo_seed, crop_shape, difficulty=difficulty, night=bool(night),
                             **render_kwargs)
        box = _free_box(place_rng, shape, crop_shape, [a.box for a in animals])
        canvas.paste(photo.image, (box[0], box[1]))
        transform = compose(translation(box[0], box[1]), photo.transform)
        animals.append(FrameAnimal(photo=photo, box=box, transform=transform))
    return CameraTrapFrame(image=canvas, animals=tuple(animals), seed=int(seed))


def make_frames(
    individuals: Sequence[Individual],
    n_frames: int,
    seed: int,
    size: Sequence[int] = (360, 480),
    crop_size: Sequence[int] = (128, 128),
    *,
    animal_counts: Sequence[int] | None = None,
    max_animals: int = 3,
    **render_kwargs: Any,
) -> list[CameraTrapFrame]:
    """``n_frames`` frames with ``0..max_animals`` animals each, drawn from ``individuals``.

    Args:
        animal_counts: animals per frame (length ``n_frames``); None draws each count uniformly
            from ``0..max_animals`` (a quarter of the frames empty on average with 3).
        render_kwargs: passed to :func:`render_frame`.

    Frame ``i`` holds distinct individuals; one individual may appear in several frames.
    """
    n_frames = int(n_frames)
    if n_frames < 0:
        raise ConfigError(f"make_frames: n_frames must be >= 0, got {n_frames}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xF4A]))
    if animal_counts is None:
        counts = [int(rng.integers(0, int(max_animals) + 1)) for _ in range(n_frames)]
    else:
        counts = [int(c) for c in animal_counts]
        if len(counts) != n_frames:
            raise ConfigError(f"make_frames: animal_counts has {len(counts)} entries for {n_frames} frames")
    if counts and (min(counts) < 0 or max(counts) > len(individuals)):
        raise ConfigError(f"make_frames: animals per frame must be in 0..{len(individuals)} (the individuals given), "
                          f"got {counts}")
    frames = []
    for i, count in enumerate(counts):
        chosen = [individuals[int(k)] for k in rng.choice(len(individuals), size=count, replace=False)]
        frame_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i, 0xF7]).generate_state(1)[0])
        frames.append(render_frame(chosen, frame_seed, size, crop_size, **render_kwargs))
    return frames


def detector_output(
    frames: Sequence[CameraTrapFrame],
    files: Sequence[str],
    *,
    seed: int = 0,
    threshold: float = 0.2,
    false_detection_frame: int | None = 0,
    failure_file: str | None = "unreadable.jpg",
    format_version: str = "1.4",
) -> dict[str, Any]:
    """What a detector with a classifier would write for ``frames`` (MegaDetector batch format).

    Args:
        frames: the frames, in file order.
        files: each frame's path as the file lists it (relative to the uploads folder).
        seed: fixes the confidences and the false box.
        threshold: written as ``typical_detection_threshold``; true detections score well above
            it (0.55-0.98), the false one below it (0.05 to ``0.75 * threshold``).
        false_detection_frame: the frame that gets one false ``animal`` detection on bare
            background, after its true ones (None: no false detection).
        failure_file: an extra entry the detector failed on (None: none).

    Returns:
        The JSON document as a dict. In frame ``i``, detection ``j < len(frames[i].animals)`` is
        animal ``j`` (category ``"1"``, its box rounded to 4 decimals, classified as its body
        kind); a false detection comes last.
    """
    if len(files) != len(frames):
        raise ConfigError(f"detector_output: {len(files)} file names for {len(frames)} frames")
    if not 0.0 < float(threshold) <= 1.0:
        raise ConfigError(f"detector_output: threshold must be in (0, 1], got {threshold}")
    if false_detection_frame is not None and not 0 <= int(false_detection_frame) < len(frames):
        raise ConfigError(f"detector_output: false_detection_frame {false_detection_frame} is not a frame index")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xDE7]))
    kind_ids = {kind: cid for cid, kind in CLASSIFICATION_CATEGORIES.items()}
    images: list[dict[str, Any]] = []
    for i, (frame, file) in enumerate(zip(frames, files)):
        detections = []
        for animal in frame.animals:
            kind = animal.photo.individual.body.kind if animal.photo.individual is not None else BODY_KINDS[0]
            runner_up = next(cid for k, cid in kind_ids.items() if k != kind)
            top = round(float(rng.uniform(0.7, 0.97)), 3)
            detections.append({
                "category": "1",
                "conf": round(float(rng.uniform(0.55, 0.98)), 3),
                "bbox": normalised_box(animal.box, frame.size),
                "classifications": [[kind_ids[kind], top], [runner_up, round(1.0 - top, 3)]],
            })
        if false_detection_frame is not None and i == int(false_detection_frame):
            height, width = frame.size
            side = (max(8, height // 8), max(8, width // 8))
            box = _free_box(rng, frame.size, side, [a.box for a in frame.animals])
            detections.append({"category": "1", "conf": round(float(rng.uniform(0.05, 0.75 * threshold)), 3),
                               "bbox": normalised_box(box, frame.size)})
        images.append({"file": file, "detections": detections})
    if failure_file is not None:
        images.append({"file": failure_file, "failure": FAILURE_TEXT, "detections": None})
    return {
        "info": {"format_version": format_version, "detector": "synthetic",
                 "detector_metadata": {"typical_detection_threshold": float(threshold),
                                       "conservative_detection_threshold": round(float(threshold) / 2, 3)}},
        "detection_categories": dict(DETECTION_CATEGORIES),
        "classification_categories": dict(CLASSIFICATION_CATEGORIES),
        "images": images,
    }
