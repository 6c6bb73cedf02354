"""Embed images (cache-aware): embeddings and the explained layers' feature maps.

The explained layers are cached float32 (``EXACT_FEATURE_DTYPE``): re-ranking runs PAIR-X's
stage 1 from them, and only exact activations give the full path's matches and relevance. An
entry cached earlier in a narrower dtype is embedded again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.cache import EXACT_FEATURE_DTYPE, ActivationCache, activation_cache
from infra.decoded_photos import load_photo
from infra.images import DEFAULT_MIN_SIDE, DecodeNeed, LoadedImage, decode_need
from infra.model_runtime import get_model
from infra.night_items import NightItem, crop_key
from infra.records import error_row, new_image_rows
from infra.storage import is_transient, retry_transient
from infra.tables import write_table
from pairx_core import PairXError

logger = logging.getLogger("pairx.tasks")


@dataclass
class EmbedSummary:
    hashes: dict[str, str]          # item name -> activation-cache key (only items that loaded)
    errors: int = 0
    computed: int = 0
    cached: int = 0
    damaged: int = 0                # cached entries that failed their checksum: recomputed
    #: item name -> content hash of its photo (only items that loaded)
    contents: dict[str, str] = field(default_factory=dict)
    #: item name -> whole-pixel crop box its decode used (None: the whole photo)
    boxes: dict[str, tuple[int, int, int, int] | None] = field(default_factory=dict)
    #: photos decoded (one per photo however many items it holds)
    decoded: int = 0


def embed_images(items: Sequence[NightItem | str], *, model: str, cache_url: str, layers: Sequence[str], run_id: str,
                 out: str, device: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 min_image_side: int = DEFAULT_MIN_SIDE) -> EmbedSummary:
    """Hash every item's photo; embed the crops missing from the cache (embedding + feature maps)
    and put them, keyed by :func:`infra.night_items.crop_key`.

    ``items``: night items (a plain URL is a whole photo). Each photo is decoded once, however
    many items (detections, annotated animals) it holds.
    """
    loaded_model = get_model(model, device, storage_options)
    prep = loaded_model.preprocessing
    cache = activation_cache(cache_url, loaded_model.fingerprint, prep.fingerprint(), layers, storage_options)
    items = [NightItem(item) if isinstance(item, str) else item for item in items]
    loaded, chips, photos, errors = _load_all(items, decode_need(prep.size), min_image_side, storage_options, run_id)
    summary = EmbedSummary(hashes={name: key for name, (key, _) in loaded.items()}, errors=len(errors),
                           contents={name: chip.content_hash for name, (_, chip) in loaded.items()},
                           boxes={name: chip.box for name, (_, chip) in loaded.items()}, decoded=len(photos))
    missing, damaged = _to_embed(cache, list(chips), layers)
    summary.cached, summary.damaged = len(chips) - len(missing), len(damaged)
    if missing:
        embeddings, features = loaded_model.embed([chips[key].image for key in missing], layers)
        cache.put(missing, embeddings, features)
        summary.computed = len(missing)
    rows = new_image_rows(photos, out, loaded_model.model_id, run_id, storage_options)
    if rows:
        write_table(out, "images", rows, loaded_model.model_id, run_id, storage_options)
    if errors:
        write_table(out, "errors", errors, loaded_model.model_id, run_id, storage_options)
    return summary


def _load_all(items: Sequence[NightItem], need: DecodeNeed, min_side: int, storage_options: Mapping[str, Any] | None,
              run_id: str) -> tuple[dict[str, tuple[str, LoadedImage]], dict[str, LoadedImage], list[LoadedImage],
                                    list[dict]]:
    """``(cache key and chip by item name, one chip per cache key, one whole image per photo, errors
    rows)``; each photo is decoded once, at the scale ``need`` allows for all its items, and that
    decode stays in this process for the run's later consumers
    (:func:`infra.decoded_photos.load_photo`); transient errors raise."""
    by_photo: dict[str, list[NightItem]] = {}
    for item in items:
        by_photo.setdefault(item.uri, []).append(item)
    loaded, chips, photos, errors = {}, {}, [], []
    for uri, photo_items in by_photo.items():
        try:
            photo = load_photo(uri, [(item.box, item.theta) for item in photo_items], need,
                               storage_options=storage_options, run_id=run_id)
            whole = photo.chip(min_side=min_side)
        except Exception as error:
            if not isinstance(error, PairXError) and is_transient(error):
                raise
            errors.append(error_row(uri, "load", error, run_id))
            continue
        photos.append(whole)
        for item in photo_items:
            try:
                chip = whole if not item.is_crop else photo.chip(item.box, item.theta, min_side)
            except PairXError as error:  # about the box: the photo itself is fine
                errors.append(error_row(item.name, "load", error, run_id))
                continue
            key = crop_key(whole.content_hash, chip.box, item.theta)  # one key however the box was written
            loaded[item.name] = (key, chip)
            chips.setdefault(key, chip)
    return loaded, chips, photos, errors


def _to_embed(cache: ActivationCache, hashes: list[str], layers: Sequence[str]) -> tuple[list[str], set[str]]:
    """``(contents to embed, damaged cache entries)``: contents not cached, cached damaged
    (checksum, NaN or zero), or cached in a narrower dtype than :data:`EXACT_FEATURE_DTYPE`."""
    known = cache.lookup(hashes)
    damaged = set(cache.damaged(list(known)))
    if damaged:
        logger.warning("%d damaged activation-cache entr%s (checksum, NaN or zero): recomputing them",
                       len(damaged), "y" if len(damaged) == 1 else "ies")
    narrow = set()
    for layer in layers:
        stored = cache.stored_layer_dtypes(list(known), layer)
        narrow |= {h for h in known if h not in stored or
                   np.dtype(stored[h]).itemsize < np.dtype(EXACT_FEATURE_DTYPE).itemsize}
    return [h for h in hashes if h not in known or h in damaged or h in narrow], damaged


@task(name="embed_images", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      persist_result=False, cache_policy=NO_CACHE)
def embed_images_task(items: list[NightItem | str], **kwargs) -> EmbedSummary:
    return embed_images(items, **kwargs)
