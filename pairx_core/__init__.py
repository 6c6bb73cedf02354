"""pairx_core: the PAIR-X engine (batched, model-agnostic), visualisations and metrics.

Pure compute: torch, zennit, numpy, Pillow, OpenCV (homography only). No storage or
orchestration imports; ``infra``, ``tasks`` and ``flows`` build on this package.

The engine and its torch/zennit imports load on first use of an engine name (``explain``,
``ExplainConfig``, ...), so that ``pairx_core.errors`` and friends import in milliseconds: the
CLI checks a run's inputs before it pays for torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    ImageError,
    LayerError,
    ModelLoadError,
    NumericalError,
    PairXError,
    RandomWeightsError,
    ShapeError,
    StorageError,
    UnsupportedModelError,
)

if TYPE_CHECKING:  # pragma: no cover
    from .config import EngineStats, ExplainConfig
    from .engine import embed, explain, explain_indexed
    from .preprocess import Preprocessing
    from .results import LayerExplanation, PairExplanation

ENGINE_VERSION = "1"

_LAZY = {
    "EngineStats": "config", "ExplainConfig": "config", "embed": "engine", "explain": "engine",
    "explain_indexed": "engine", "Preprocessing": "preprocess", "LayerExplanation": "results",
    "PairExplanation": "results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ENGINE_VERSION",
    "ConfigError",
    "EngineStats",
    "ExplainConfig",
    "ImageError",
    "LayerError",
    "LayerExplanation",
    "ModelLoadError",
    "NumericalError",
    "PairExplanation",
    "PairXError",
    "RandomWeightsError",
    "Preprocessing",
    "ShapeError",
    "StorageError",
    "UnsupportedModelError",
    "embed",
    "explain",
    "explain_indexed",
]
