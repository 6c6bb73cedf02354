"""Embed images (cache-aware) and retrieve each query's top-k gallery images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.cache import ActivationCache
from infra.images import DEFAULT_MIN_SIDE, load_image
from infra.storage import is_transient
from infra.tables import write_table
from pairx_core import PairXError, embed

from .explain import error_row, image_rows_to_record, retry_transient
from .runtime import get_model

logger = logging.getLogger("pairx.tasks")


@dataclass
class EmbedSummary:
    hashes: dict[str, str]          # image URI -> content hash (only images that loaded)
    errors: int = 0
    computed: int = 0
    cached: int = 0
    damaged: int = 0                # cached entries that failed their checksum: recomputed


def embed_images(uris: Sequence[str], *, model: str, cache_url: str, layers: Sequence[str], run_id: str, out: str,
                 device: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 min_image_side: int = DEFAULT_MIN_SIDE) -> EmbedSummary:
    """Hash every image; embed those missing from the cache (embedding + feature maps) and put them."""
    loaded_model = get_model(model, device, storage_options)
    prep = loaded_model.preprocessing
    cache = ActivationCache(cache_url, loaded_model.fingerprint, prep.fingerprint(), storage_options=storage_options)
    summary = EmbedSummary(hashes={})
    loaded, errors = {}, []
    for uri in uris:
        try:
            image = load_image(uri, min_side=min_image_side, storage_options=storage_options)
        except Exception as error:
            if not isinstance(error, PairXError) and is_transient(error):
                raise
            errors.append(error_row(uri, "load", error, run_id))
            continue
        summary.hashes[uri] = image.content_hash
        loaded.setdefault(image.content_hash, image)
    known = cache.lookup(list(loaded))
    damaged = set(cache.damaged(list(known)))
    if damaged:
        logger.warning("%d damaged activation-cache entr%s (checksum, NaN or zero): recomputing them",
                       len(damaged), "y" if len(damaged) == 1 else "ies")
    missing = [h for h in loaded if h not in known or h in damaged]
    summary.cached = len(loaded) - len(missing)
    summary.damaged = len(damaged)
    if missing:
        tensors = prep.batch([loaded[h].image for h in missing])
        with loaded_model.lock:
            embeddings, features = embed(loaded_model.model, tensors, list(layers), device=loaded_model.device)
        cache.put(missing, embeddings, features)
        summary.computed = len(missing)
    rows = image_rows_to_record(list(loaded.values()), out, loaded_model.model_id, run_id, storage_options)
    if rows:
        write_table(out, "images", rows, loaded_model.model_id, run_id, storage_options)
    if errors:
        write_table(out, "errors", errors, loaded_model.model_id, run_id, storage_options)
    summary.errors = len(errors)
    return summary


@task(name="embed_images", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      persist_result=False, cache_policy=NO_CACHE)
def embed_images_task(uris: list[str], **kwargs) -> EmbedSummary:
    return embed_images(uris, **kwargs)


def top_k(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k: ``query (Q, D)``, ``gallery (G, D)`` -> indices and similarities ``(Q, k')``."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    scores = q @ g.T
    k = min(k, gallery.shape[0])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
