"""pairx_core: the PAIR-X engine (batched, model-agnostic), visualisations and metrics.

Pure compute: torch, zennit, numpy, Pillow, OpenCV (homography only). No storage or
orchestration imports; ``infra``, ``tasks`` and ``flows`` build on this package.
"""

from .engine import EngineStats, ExplainConfig, embed, explain, explain_indexed
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
from .preprocess import Preprocessing
from .results import LayerExplanation, PairExplanation

ENGINE_VERSION = "1"

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
