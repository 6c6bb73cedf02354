"""Idempotency keys: which pair explanations already exist in ``<OUT>``.

A pair output is identified by everything that determines it: the two images' content hashes
(order matters: image 0 is the query), the model fingerprint, the layer, the rendering parameters
and the engine version. Reruns compute the same key and skip what is already written; any change
to an input gives a new key and a fresh output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pairx_core.errors import ConfigError

from .tables import read_table

__all__ = ["KEY_VERSION", "existing_output_keys", "pair_output_key"]

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
