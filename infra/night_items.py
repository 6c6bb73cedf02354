"""The items of a night: one upload or gallery entry each, a photo and the part of it that counts.

A night works on items, not on file names: a camera-trap frame with three animals is three upload
items (one per detection), a gallery photo with two annotated animals two gallery items. Each item
has a ``name`` unique within the night (the photo's URL for a whole photo, the URL with a
``#...`` suffix for a crop), which keys the night's dictionaries, and the ``(uri, box, theta)`` that
one decode of it depends on.

The activation cache keys an item by :func:`crop_key`: the photo's content hash for a whole photo
(as before crops existed), else a digest of content hash, box and rotation, so that two crops of
one photo never share an entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .inputs import ImageKey, PairItem, derive_pair_id, list_gallery, manifest_rows

__all__ = ["CONFIRMING", "DECIDED", "NightItem", "confirmed_items", "crop_key", "gallery_items", "gallery_source",
           "latest_verdicts", "pair_item", "whole_items"]

#: latest decisions that put an upload into the gallery, labelled with the decided individual
CONFIRMING = ("match", "new_individual")
#: latest decisions that make an upload no query any more
DECIDED = ("match", "new_individual", "no_match")


def _rounded_box(box: Sequence[float] | None) -> list[float] | None:
    return None if box is None else [round(float(v), 6) + 0.0 for v in box]


def crop_key(content_hash: str, box: Sequence[float] | None = None, theta: float = 0.0) -> str:
    """Activation-cache key of one crop of a photo: the content hash itself for the whole upright
    photo, else a SHA-256 of ``[content hash, box, theta]`` (box rounded to 1e-6)."""
    if box is None and not theta:
        return content_hash
    payload = json.dumps([content_hash, _rounded_box(box), round(float(theta), 9) + 0.0], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class NightItem:
    """One upload or gallery entry of a night.

    Attributes:
        uri: the photo's full URL.
        box: crop ``(x, y, w, h)`` as given (fractions of the upright photo, or pixels), None: the
            whole photo.
        theta: rotation in radians, applied after the crop.
        detection: index of the detection in the detector file's list for this photo (uploads of
            a camera-trap night), else None.
        detection_id: stable identity of that detection (:func:`infra.detections.detection_id`),
            known once the photo's content hash is.
        conf: detector confidence; species: top classification's name (when the file has one).
        individual: the individual of a gallery entry (None or "" when unknown).
        tag: what tells apart two boxes of one photo in :attr:`name` (detection index or box).
        source: ``gallery`` or ``confirmed`` (gallery items only).
    """

    uri: str
    box: tuple[float, float, float, float] | None = None
    theta: float = 0.0
    detection: int | None = None
    detection_id: str | None = None
    conf: float | None = None
    species: str | None = None
    individual: str | None = None
    tag: str | None = None
    #: where a gallery item came from: ``gallery`` (folder or manifest) or ``confirmed`` (an upload
    #: of an earlier night that a reviewer confirmed)
    source: str = "gallery"

    @property
    def name(self) -> str:
        """Unique within a night: the URL for a whole photo, ``URL#tag`` for a crop."""
        if self.tag:
            return f"{self.uri}#{self.tag}"
        if self.box is None and not self.theta:
            return self.uri
        box = ",".join(f"{v:g}" for v in self.box) if self.box is not None else "full"
        return f"{self.uri}#box={box}" + (f",theta={self.theta:g}" if self.theta else "")

    @property
    def image_key(self) -> ImageKey:
        """``(uri, box, theta)``: what one decode of the item depends on."""
        return (self.uri, self.box, float(self.theta))

    @property
    def is_crop(self) -> bool:
        return self.box is not None or bool(self.theta)


def whole_items(uris: Sequence[str], individuals: dict[str, str | None] | None = None) -> list[NightItem]:
    """One whole-photo item per URL (a folder of uploads, a gallery without annotations)."""
    return [NightItem(uri, individual=(individuals or {}).get(uri)) for uri in uris]


def pair_item(query: NightItem, gallery: NightItem, pixel_boxes: dict[str, tuple[int, int, int, int] | None],
              individual: str | None = None) -> PairItem:
    """The pair to explain for (``query``, ``gallery``), boxes in original pixels.

    ``pixel_boxes``: per item name, the whole-pixel box its decode used (None: the whole photo).
    The pair id is :func:`infra.inputs.derive_pair_id` of the two names (the URLs for whole
    photos, as before crops existed).
    """
    def box(item: NightItem):
        found = pixel_boxes.get(item.name, item.box)
        return None if found is None else tuple(float(v) for v in found)

    return PairItem(derive_pair_id(query.name, gallery.name), query.uri, gallery.uri, box_0=box(query),
                    box_1=box(gallery), theta_0=float(query.theta), theta_1=float(gallery.theta),
                    individual_1=individual if individual is not None else gallery.individual)


def gallery_items(gallery: str, storage_options: Mapping[str, Any] | None = None, *, unlabelled: bool = False,
                  allow_outside_root: bool = False, exclude: str | None = None) -> list[NightItem]:
    """The gallery as items: one per manifest row (a ``box`` / ``theta`` column crops the photo;
    several rows may name one photo), or one whole photo per file of a gallery folder
    (:func:`infra.inputs.list_gallery`)."""
    if gallery.endswith(".csv"):
        rows = manifest_rows(gallery, storage_options, allow_outside_root=allow_outside_root)
        return list({item.name: item for item in (NightItem(row.uri, box=row.box, theta=row.theta,
                                                            individual=row.individual) for row in rows)}.values())
    listed = list_gallery(gallery, storage_options, unlabelled=unlabelled, allow_outside_root=allow_outside_root,
                          exclude=exclude)
    return whole_items(list(listed), listed)


def latest_verdicts(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[tuple, dict]:
    """The latest standing decision per upload of ``out`` (an ``undo`` as the latest row: none),
    keyed by ``(query, content hash, detection id)`` (:func:`infra.decisions.decision_key`)."""
    from .decisions import latest_by_upload, read_decisions

    latest = latest_by_upload(read_decisions(out, storage_options))
    return {key: row for key, row in latest.items() if row["decision"] != "undo"}


def confirmed_items(verdicts: Mapping[tuple, Mapping[str, Any]]) -> list[NightItem]:
    """Gallery items of the uploads confirmed by ``verdicts`` (:func:`latest_verdicts`): latest
    decision ``match`` or ``new_individual``, labelled with the decided individual, cropped to the
    box the upload was explained with (original pixels; the photo is read where it is): a decided
    detection joins as its own crop, two decided detections of one frame as two items."""
    items = []
    for row in verdicts.values():
        if row["decision"] not in CONFIRMING or not row.get("individual"):
            continue
        box = row.get("box")
        box = None if box is None or len(box) != 4 else tuple(float(v) for v in box)
        items.append(NightItem(row["query"], box=box, individual=str(row["individual"]), source="confirmed"))
    return items


def gallery_source(gallery: str, out: str | None = None, storage_options: Mapping[str, Any] | None = None, *,
                   confirmed: bool = True, unlabelled: bool = False, allow_outside_root: bool = False,
                   exclude: str | None = None,
                   verdicts: Mapping[tuple, Mapping[str, Any]] | None = None) -> list[NightItem]:
    """Every gallery item of a night: the gallery folder or manifest (:func:`gallery_items`) and,
    with ``confirmed``, the uploads confirmed on earlier nights in ``out`` (:func:`confirmed_items`;
    ``verdicts`` when already read). An item listed by both keeps the gallery's."""
    items = gallery_items(gallery, storage_options, unlabelled=unlabelled, allow_outside_root=allow_outside_root,
                          exclude=exclude)
    if confirmed and out is not None:
        known = {item.name for item in items}
        verdicts = latest_verdicts(out, storage_options) if verdicts is None else verdicts
        items += [item for item in confirmed_items(verdicts) if item.name not in known]
    return items
