"""Idempotency keys: which pair explanations already exist in ``<OUT>``.

A pair output is identified by everything that determines it: the two images' content hashes
(order matters: image 0 is the query), the model fingerprint, the layer, the rendering parameters
and the engine version. Reruns compute the same key and skip what is already written; any change
to an input gives a new key and a fresh output.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pairx_core.errors import ConfigError

from .inputs import ImageKey, PairItem, listed_sizes
from .storage import StorageTarget
from .tables import read_table

__all__ = ["KEY_VERSION", "OutputSettings", "PairPlan", "PlannedPair", "existing_output_keys", "once_per_content",
           "pair_output_key", "plan_pairs"]

logger = logging.getLogger("pairx.infra")

#: Bumped when the key recipe changes (every key then changes too).
KEY_VERSION = 1


def pair_output_key(
    hash_0: str,
    hash_1: str,
    model_fingerprint: str,
    layer: str,
    k_lines: int,
    k_colors: int,
    engine_version: str,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """SHA-256 hex key of one pair explanation.

    Stable across processes and Python versions (canonical JSON: sorted keys, no whitespace).
    ``(a, b)`` and ``(b, a)`` give different keys. ``extra`` holds any further setting that changes
    the output (must be JSON-serialisable: str, numbers, bools, None, lists, dicts with str keys).

    Raises:
        ConfigError: an empty hash/fingerprint/layer, or a non-serialisable ``extra``.
    """
    for name, value in (
        ("hash_0", hash_0),
        ("hash_1", hash_1),
        ("model_fingerprint", model_fingerprint),
        ("layer", layer),
        ("engine_version", engine_version),
    ):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"pair_output_key: {name} must be a non-empty string, got {value!r}")
    payload = {
        "v": KEY_VERSION,
        "image_0": hash_0,
        "image_1": hash_1,
        "model": model_fingerprint,
        "layer": layer,
        "k_lines": int(k_lines),
        "k_colors": int(k_colors),
        "engine": engine_version,
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pair_output_key: extra must be JSON-serialisable ({exc})") from None
    return hashlib.sha256(text.encode()).hexdigest()


def existing_output_keys(
    out_url: str, model_id: str, storage_options: Mapping[str, Any] | None = None
) -> set[str]:
    """The ``output_key`` values already in ``<OUT>``'s ``pairs`` table for ``model_id``.

    Reads only that column of that model's partitions. Empty set when nothing was written.
    """
    frame = read_table(
        out_url, "pairs", model_id=model_id, columns=["output_key"], storage_options=storage_options
    )
    return {str(k) for k in frame["output_key"].dropna()}


@dataclass(frozen=True)
class OutputSettings:
    """Everything besides the two images that decides a pair's outputs (its key)."""

    model_id: str
    layers: tuple[str, ...]
    k_lines: int
    k_colors: int
    engine_version: str
    #: further settings that change the output (preprocessing, picture layout), JSON-serialisable
    extra: Mapping[str, Any] = field(default_factory=dict)

    def output_keys(self, item: PairItem, hash_0: str, hash_1: str) -> dict[str, str]:
        """Per layer, the output key of ``item`` whose images have contents ``hash_0``, ``hash_1``."""
        extra = {**self.extra, "box_0": item.box_0, "box_1": item.box_1, "theta_0": item.theta_0,
                 "theta_1": item.theta_1}
        return {layer: pair_output_key(hash_0, hash_1, self.model_id, layer, self.k_lines, self.k_colors,
                                       self.engine_version, extra)
                for layer in self.layers}


@dataclass(frozen=True)
class PlannedPair:
    """A pair to compute and, per layer, the output key its rows will carry."""

    item: PairItem
    output_keys: dict[str, str]


@dataclass
class PairPlan:
    """What a batch does with its pairs: compute, skip (all outputs exist) or fail (an image did
    not load)."""

    todo: list[PlannedPair] = field(default_factory=list)
    skipped: list[PairItem] = field(default_factory=list)
    unloadable: list[PairItem] = field(default_factory=list)


def plan_pairs(items: Sequence[PairItem], hashes: Mapping[ImageKey, str], existing: set[str],
               settings: OutputSettings) -> PairPlan:
    """Sort ``items`` by what is left to do.

    Args:
        hashes: content hash of every image decode that succeeded (a side missing here did not load).
        existing: output keys already committed (:func:`existing_output_keys`).

    A pair is skipped when the outputs of every layer exist, or when an earlier item of
    ``items`` has the same keys (two names of one content are one explanation): no key is
    planned twice.
    """
    plan = PairPlan()
    planned: set[str] = set()
    for item in items:
        key_0, key_1 = item.image_keys
        if key_0 not in hashes or key_1 not in hashes:
            plan.unloadable.append(item)
            continue
        keys = settings.output_keys(item, hashes[key_0], hashes[key_1])
        if all(k in existing or k in planned for k in keys.values()):
            plan.skipped.append(item)
        else:
            planned.update(keys.values())
            plan.todo.append(PlannedPair(item, keys))
    return plan


def once_per_content(items: Sequence[PairItem], storage_options: Mapping[str, Any] | None = None,
                     sizes: Mapping[str, int | None] | None = None) -> tuple[list[PairItem], list[PairItem]]:
    """``(items to explain, duplicates)``: an item whose two sides have the contents, boxes and
    angles of an earlier item's is a duplicate (one output key: explained once, whatever batch
    either would land in).

    Only images whose byte size equals another image's can share its content, so only those
    are read and hashed; the sizes come from one listing per folder (``sizes``, when the caller
    listed them already). Images that cannot be listed (``http://``) count by their URL.
    """
    from .images import content_hash

    uris = list(dict.fromkeys(uri for item in items for uri in (item.image_0, item.image_1)))
    if sizes is None:
        try:
            sizes = listed_sizes(uris, storage_options)
        except Exception as error:  # noqa: BLE001 - listing is an optimisation: each batch still skips known keys
            logger.warning("could not list the images' folders to find repeated contents (%s); pairs are planned "
                           "per batch", error)
            return list(items), []
    by_size: dict[int, list[str]] = {}
    for uri in uris:
        if sizes.get(uri) is not None:
            by_size.setdefault(int(sizes[uri]), []).append(uri)
    shared = [uri for group in by_size.values() if len(group) > 1 for uri in group]
    identity = {uri: uri for uri in uris}
    for uri in shared:
        try:
            identity[uri] = "sha256:" + content_hash(StorageTarget.from_url(uri, storage_options).read_bytes(""))
        except Exception:  # noqa: BLE001 - unreadable now: its batch reports it; here it counts by URL
            continue
    unique, duplicates, seen = [], [], set()
    for item in items:
        key = (identity[item.image_0], item.box_0, item.theta_0, identity[item.image_1], item.box_1, item.theta_1)
        if key in seen:
            duplicates.append(item)
        else:
            seen.add(key)
            unique.append(item)
    return unique, duplicates
