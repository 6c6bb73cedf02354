"""Maintenance of an activation cache root: what it holds, and pruning (``pairx cache``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .cache import ActivationCache, _batch_time

__all__ = ["CacheModelInfo", "PrunePlan", "cache_info", "damaged_cache_entries", "plan_prune", "prune_model",
           "prune_older_than"]

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


def damaged_cache_entries(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[int, list[str]]:
    """Every cached row of every model checked against its checksum: ``(rows checked, damaged rows)``."""
    checked, damaged = 0, []
    for model in _root(url, storage_options).model_fingerprints():
        for prep in _root(url, storage_options, model).prep_fingerprints():
            rows, bad = _root(url, storage_options, model, prep).verify()
            checked += rows
            damaged += bad
    return checked, damaged


@dataclass(frozen=True)
class PrunePlan:
    """What a prune would delete: committed batches it selects, of all the cache's committed batches."""

    batches: int
    total_batches: int


def plan_prune(url: str, *, model: str | None = None, older_than_days: float | None = None,
               storage_options: Mapping[str, Any] | None = None) -> PrunePlan:
    """Count the batches :func:`prune_model` / :func:`prune_older_than` would delete, deleting nothing."""
    cutoff = (datetime.now(timezone.utc) - timedelta(days=older_than_days)) if older_than_days is not None else None
    selected = total = 0
    for fingerprint in _root(url, storage_options).model_fingerprints():
        for prep in _root(url, storage_options, fingerprint).prep_fingerprints():
            for batch in _root(url, storage_options, fingerprint, prep).batches():
                total += 1
                if model is not None and fingerprint != model:
                    continue
                stamp = _batch_time(batch.batch_id)
                if cutoff is None or (stamp is not None and stamp <= cutoff):
                    selected += 1
    return PrunePlan(selected, total)
