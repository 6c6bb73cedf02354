"""Worker-side state: each process loads a model once per (spec, device) and keeps it."""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from pairx_core.models import RandomWeightsWarning, model_fingerprint
from pairx_core.preprocess import Preprocessing
from pairx_core.runtime_settings import keep_freed_memory


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    preprocessing: Preprocessing
    fingerprint: str
    device: torch.device
    #: hooks and canonizers are per model: one engine call at a time per model in a process
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @property
    def model_id(self) -> str:
        """Identifier used in output partitions: the weights+architecture fingerprint."""
        return self.fingerprint


_MODELS: dict[tuple[str, str], LoadedModel] = {}
_LOCK = threading.Lock()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_model(spec: str, device: str | None = None, storage_options: Mapping[str, Any] | None = None) -> LoadedModel:
    """The model for ``spec`` on ``device``, built at most once per process."""
    from infra.model_store import load_model

    target = resolve_device(device)
    key = (spec, str(target))
    with _LOCK:
        if key not in _MODELS:
            _configure_torch(target)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)
                model, prep = load_model(spec, storage_options=storage_options, device=target)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            _MODELS[key] = LoadedModel(model, prep, model_fingerprint(model), target)
        return _MODELS[key]


def _configure_torch(target: torch.device) -> None:
    """Torch settings of a process that runs pipeline tasks, made before its first model load.

    - intra-op threads: ``PAIRX_TORCH_THREADS`` when set (the cluster factory gives each local
      worker cores / workers);
    - on CPU, denormals flushed to zero for the whole process, on purpose and once: LRP's relevance
      products reach denormal magnitudes, which slow CPU arithmetic many times. The engine flushes
      them for its own calls too (``pairx_core.runtime_settings.denormals_flushed``), but that
      reaches only the calling thread: torch's intra-op threads keep the floating-point mode they
      started with, so the mode must be set before the model load starts them;
    - glibc keeps the memory torch frees for reuse instead of faulting it in again on every
      pixel-map pass (``pairx_core.runtime_settings.keep_freed_memory``; it also undoes the
      ``MALLOC_TRIM_THRESHOLD_`` Dask's nanny gives workers, which made them 3x slower).
    """
    keep_freed_memory()
    threads = int(os.environ.get("PAIRX_TORCH_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    if target.type == "cpu":
        torch.set_flush_denormal(True)


def model_identity(spec: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, Preprocessing]:
    """Fingerprint and preprocessing of ``spec`` (loads on CPU in this process)."""
    loaded = get_model(spec, "cpu", storage_options)
    return loaded.fingerprint, loaded.preprocessing
