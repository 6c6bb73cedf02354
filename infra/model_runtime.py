"""Per-process model cache: each process builds a model once per (spec, device) and keeps the
few it used last. Models are built on the process's compute thread
(:mod:`infra.compute_thread`), where every computation with them runs too.

Loading a model changes nothing else in the process: torch thread counts, denormal flushing and
the allocator are set where a task process starts (:func:`pairx_core.runtime_settings.
configure_task_process`, called by the Dask worker preload and the CLI entry).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from infra.compute_thread import on_compute_thread
from pairx_core.models import RandomWeightsWarning, model_fingerprint
from pairx_core.preprocess import Preprocessing

#: models a process keeps (least recently used dropped first); ``PAIRX_MODELS_KEPT`` overrides it
DEFAULT_MODELS_KEPT = 2


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    preprocessing: Preprocessing
    fingerprint: str
    device: torch.device

    @property
    def model_id(self) -> str:
        """Identifier used in output partitions: the weights+architecture fingerprint."""
        return self.fingerprint

    def embed(self, images: Sequence[Image.Image], layers: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Embeddings ``(N, D)`` and ``layers``' feature maps of decoded ``images``, preprocessed and
        computed on the compute thread (:func:`pairx_core.embed`)."""
        from pairx_core import embed

        def compute():
            return embed(self.model, self.preprocessing.batch(images), list(layers), device=self.device)

        return on_compute_thread(compute)


def models_kept() -> int:
    """How many models a process keeps: ``PAIRX_MODELS_KEPT`` when set to a positive integer."""
    raw = os.environ.get("PAIRX_MODELS_KEPT", "").strip()
    return max(1, int(raw)) if raw.isdigit() else DEFAULT_MODELS_KEPT


#: (spec, device) -> model, least recently used first
_MODELS: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
_LOCK = threading.Lock()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_model(spec: str, device: str | None = None, storage_options: Mapping[str, Any] | None = None) -> LoadedModel:
    """The model for ``spec`` on ``device``: built on first use (on the compute thread), then kept
    while it is among the :func:`models_kept` most recently used of this process.

    A caller keeps using the model it was given even if the cache drops it meanwhile. Engine calls
    with it go through :func:`infra.compute_thread.on_compute_thread` (one at a time per process:
    hooks and canonizers are attached to the model while a call runs).
    """
    target = resolve_device(device)
    key = (spec, str(target))
    return _kept(key) or on_compute_thread(_build_once, key, spec, target, storage_options)


def _kept(key: tuple[str, str]) -> LoadedModel | None:
    """The kept model of ``key`` (marked most recently used), or None."""
    with _LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
    return None


def _build_once(key: tuple[str, str], spec: str, target: torch.device,
                storage_options: Mapping[str, Any] | None) -> LoadedModel:
    """Build and keep ``key``'s model unless a call queued before this one did (compute thread only)."""
    from infra.model_store import load_model

    kept = _kept(key)
    if kept is not None:
        return kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, prep = load_model(spec, storage_options=storage_options, device=target)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    loaded = LoadedModel(model, prep, model_fingerprint(model), target)
    with _LOCK:
        _MODELS[key] = loaded
        while len(_MODELS) > models_kept():
            _MODELS.popitem(last=False)
    return loaded


def model_identity(spec: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, Preprocessing]:
    """Fingerprint and preprocessing of ``spec`` (loads on CPU in this process)."""
    loaded = get_model(spec, "cpu", storage_options)
    return loaded.fingerprint, loaded.preprocessing
