"""The engine on a CUDA device: same explanations as on the CPU, and host synchronisations per batch
that do not grow with the number of pairs. Skipped without CUDA (CI has none; run on a GPU machine
with ``python -m pytest -m gpu tests/test_gpu.py``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from model_helpers import random_images, tiny_timm_efficientnet
from pairx_core import explain_indexed
from pairx_core.config import ExplainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LAYER = "backbone.blocks.3"


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 off: the CPU comparison is about the engine, not about reduced-precision products."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model():
    return tiny_timm_efficientnet(dtype=torch.float32).eval()


def test_cuda_explanations_match_the_cpu():
    images = random_images(6, size=64, dtype=torch.float32, seed=3)
    pairs = [(0, 1), (2, 3), (4, 5), (0, 5)]
    config = ExplainConfig(k_colors=3, batch_size=4)
    on_cpu = explain_indexed(_model(), images, pairs, LAYER, config, device="cpu")
    on_gpu = explain_indexed(_model(), images, pairs, LAYER, config, device="cuda")
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.similarity == pytest.approx(cpu.similarity, abs=1e-4)
        a, b = cpu.layers[LAYER], gpu.layers[LAYER]
        # the spec's stable quantities: the top match set and the pixel maps' shape
        top = 3
        assert set(zip(a.matches.row_0[:top], a.matches.col_0[:top])) == set(
            zip(b.matches.row_0[:top], b.matches.col_0[:top]))
        for side in ("pixel_relevance_0", "pixel_relevance_1"):
            x, y = getattr(a, side), getattr(b, side)
            assert x.shape == y.shape and x.shape[0] == top
            assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99


def _synchronisations(model, images, pairs) -> int:
    config = ExplainConfig(k_colors=2, batch_size=len(pairs))
    explain_indexed(model, images, pairs, LAYER, config, device="cuda")  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            explain_indexed(model, images, pairs, LAYER, config, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_synchronisations_per_batch_do_not_grow_with_pairs():
    """Per-pair copies to the host (and per-convolution checks) each stall the device; results
    travel once per batch and array."""
    model = _model()
    images = random_images(12, size=64, dtype=torch.float32, seed=4)
    few = _synchronisations(model, images, [(0, 1), (2, 3)])
    many = _synchronisations(model, images, [(i, i + 1) for i in range(0, 12, 2)])
    assert few > 0  # the count is live (results do reach the host)
    assert many <= few + 2, (few, many)
