"""Maintenance of an activation cache root: what it holds, and pruning (``pairx cache``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .cache import ActivationCache

__all__ = ["CacheModelInfo", "cache_info", "prune_model", "prune_older_than"]

#: placeholder preprocessing fingerprint for root-level operations (never used as a path)
_ANY_PREP = "any"


@dataclass
class CacheModelInfo:
    """One model's subtree of a cache root."""

    model: str
    preps: list[str] = field(default_factory=list)
    images: int = 0
    batches: int = 0
    bytes: int = 0
    layers: list[str] = field(default_factory=list)


def _root(url: str, storage_options: Mapping[str, Any] | None, model: str = "root",
          prep: str = _ANY_PREP) -> ActivationCache:
    return ActivationCache(url, model, prep, storage_options=storage_options)


def cache_info(url: str, storage_options: Mapping[str, Any] | None = None) -> list[CacheModelInfo]:
    """Per model fingerprint: preprocessings, distinct cached images, committed batches, bytes."""
    infos = []
    for model in sorted(_root(url, storage_options).model_fingerprints()):
        info = CacheModelInfo(model=model)
        info.bytes = _root(url, storage_options).size_bytes(model)
        info.preps = sorted(_root(url, storage_options, model).prep_fingerprints())
        layers: set[str] = set()
        for prep in info.preps:
            batches = _root(url, storage_options, model, prep).batches()
            info.batches += len(batches)
            info.images += len({h for batch in batches for h in batch.hashes})
            layers.update(name for batch in batches for name in batch.layers)
        info.layers = sorted(layers)
        infos.append(info)
    return infos


def prune_model(url: str, model: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Delete every entry of one model fingerprint. Returns the bytes freed."""
    return _root(url, storage_options, model).prune(model)


def prune_older_than(url: str, days: float, storage_options: Mapping[str, Any] | None = None,
                     model: str | None = None) -> tuple[int, int]:
    """Delete batches written more than ``days`` ago (all models, or one), and uncommitted ones
    as old. Returns ``(batches removed, bytes freed)``."""
    age_s = days * 24 * 3600.0
    root = _root(url, storage_options)
    before = root.size_bytes()
    removed = 0
    models = [model] if model else root.model_fingerprints()
    for fingerprint in models:
        for prep in _root(url, storage_options, fingerprint).prep_fingerprints():
            cache = _root(url, storage_options, fingerprint, prep)
            removed += len(cache.prune_older_than(age_s))
            removed += len(cache.collect_garbage(min_age_s=age_s))
    return removed, max(0, before - root.size_bytes())
