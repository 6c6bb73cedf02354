"""Stage 1 of re-ranking as a Prefect task: plausibility of many pairs from cached activations.

Reads the layer's feature maps of a batch's unique images from the activation cache and runs
:func:`pairx_core.stage1.stage1` (no image decoded, nothing below the layer run). A model that
cannot be split at the layer takes the full path instead: the images are decoded and the engine
runs with ``k_colors=0`` (same metrics, slower).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.cache import CacheIntegrityError, activation_cache
from infra.compute_thread import on_compute_thread
from infra.decoded_photos import load_photo
from infra.images import DEFAULT_MIN_SIDE, decode_need
from infra.model_runtime import get_model
from infra.storage import retry_transient
from pairx_core import ExplainConfig
from pairx_core.metrics import plausibility
from pairx_core.stage1 import SplitUnsupportedError, stage1, stage1_from_images

logger = logging.getLogger("pairx.tasks")


@dataclass(frozen=True)
class Stage1Pair:
    """One (upload, candidate) pair to judge; hashes key the activation cache."""

    pair_id: str
    query: str
    query_hash: str
    candidate: str
    candidate_hash: str
    #: crops of the two photos (``(x, y, w, h)``, None: whole) and rotations: a damaged cache
    #: entry is embedded again from them
    query_box: tuple[float, float, float, float] | None = None
    candidate_box: tuple[float, float, float, float] | None = None
    query_theta: float = 0.0
    candidate_theta: float = 0.0


@dataclass(frozen=True)
class Stage1Settings:
    model: str
    cache_url: str
    layer: str
    k_lines: int = 20
    device: str | None = None
    storage_options: Mapping[str, Any] | None = None
    min_image_side: int = DEFAULT_MIN_SIDE


@dataclass
class Stage1Summary:
    #: pair id -> similarity and plausibility metrics (``PlausibilityMetrics`` fields)
    metrics: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "engine": 0.0})
    images_decoded: int = 0
    full_path: bool = False
    #: damaged cache entries (checksum, missing or garbled chunk) embedded again by this batch
    cache_damaged: int = 0


def _load(key: tuple, settings: Stage1Settings, model_input: tuple[int, int]):
    uri, box, theta = key
    photo = load_photo(uri, [(box, theta)], decode_need(model_input), storage_options=settings.storage_options)
    return photo.chip(box, theta, settings.min_image_side)


def _recompute(loaded, cache, entries: Sequence[tuple[str, tuple]], settings: Stage1Settings) -> int:
    """Embed the ``(cache key, (uri, box, theta))`` crops again and cache them under their keys
    (embedding and ``settings.layer``): a newer batch wins."""
    images = [_load(key, settings, loaded.preprocessing.size) for _, key in entries]
    embeddings, features = loaded.embed([image.image for image in images], [settings.layer])
    cache.put([cache_key for cache_key, _ in entries], embeddings, features)
    logger.warning("%d damaged activation-cache entr%s recomputed for stage 1", len(images),
                   "y" if len(images) == 1 else "ies")
    return len(images)


def stage1_pairs(pairs: Sequence[Stage1Pair], settings: Stage1Settings) -> Stage1Summary:
    """Similarity and plausibility metrics of ``pairs`` at ``settings.layer`` (one engine call)."""
    summary = Stage1Summary()
    if not pairs:
        return summary
    loaded = get_model(settings.model, settings.device, settings.storage_options)
    prep = loaded.preprocessing
    hashes = list(dict.fromkeys(h for p in pairs for h in (p.query_hash, p.candidate_hash)))
    position = {h: i for i, h in enumerate(hashes)}
    index = np.array([[position[p.query_hash], position[p.candidate_hash]] for p in pairs], dtype=np.int64)
    config = ExplainConfig(k_lines=settings.k_lines, k_colors=0)
    started = time.perf_counter()
    cache = activation_cache(settings.cache_url, loaded.fingerprint, prep.fingerprint(), [settings.layer],
                             settings.storage_options)
    uris = ({p.query_hash: (p.query, p.query_box, p.query_theta) for p in pairs}
            | {p.candidate_hash: (p.candidate, p.candidate_box, p.candidate_theta) for p in pairs})
    try:
        features = cache.get_features(hashes, settings.layer)
    except CacheIntegrityError as error:  # damaged entries: embedded again now, then read
        summary.cache_damaged = _recompute(loaded, cache, [(h, uris[h]) for h in error.hashes], settings)
        features = cache.get_features(hashes, settings.layer)
    activations = torch.from_numpy(features)
    summary.seconds["read"] += time.perf_counter() - started
    started = time.perf_counter()
    try:
        results = on_compute_thread(stage1, loaded.model, activations, index, settings.layer, prep.size, config,
                                    device=loaded.device)
    except SplitUnsupportedError:
        images = [_load(uris[h], settings, prep.size) for h in hashes]
        summary.images_decoded = len(images)
        summary.full_path = True

        def full_path():
            tensors = prep.batch([image.image for image in images])
            return stage1_from_images(loaded.model, tensors, index, settings.layer, config, device=loaded.device)

        results = on_compute_thread(full_path)
    summary.seconds["engine"] += time.perf_counter() - started
    for pair, result in zip(pairs, results):
        metrics = plausibility(result.layers[settings.layer]).as_dict()
        summary.metrics[pair.pair_id] = {"similarity": result.similarity, **metrics}
    return summary


@task(name="stage1_batch", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      persist_result=False, cache_policy=NO_CACHE)
def stage1_batch_task(pairs: list[Stage1Pair], settings: Stage1Settings) -> Stage1Summary:
    """Prefect task: stage 1 for one batch of pairs (see :func:`stage1_pairs`)."""
    return stage1_pairs(pairs, settings)
