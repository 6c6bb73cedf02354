"""Windowed z+ (pixel passes computed on the seed cell's receptive field): same numbers as the full pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_helpers import random_images, tiny_timm_efficientnet, traced_layer
from pairx_core import explain, lrp
from pairx_core.lrp import EngineEpsilonPlus


def _edge_case_stack() -> nn.Module:
    """Strided, padded, dilated, depthwise and asymmetric-kernel convolutions, signed activations."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), nn.SiLU(),
        nn.Conv2d(6, 8, (1, 3), padding=(0, 1)), nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2), nn.SiLU(),
        nn.Conv2d(8, 4, 1),
    ).double().eval()


def _pixel_maps(model, x, layer, cells, share):
    """Input relevance for a seed at ``cells[b]`` of image b (one backward), windowed or not."""
    calls = []
    original = lrp._RuleState._windowed_zplus

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    previous = lrp.WINDOW_MAX_SHARE
    lrp.WINDOW_MAX_SHARE, lrp._RuleState._windowed_zplus = share, counted
    try:
        with traced_layer(model, EngineEpsilonPlus(canonizers=[]), x, layer) as (x, out):
            seed = torch.zeros_like(out)
            for b, (row, col) in enumerate(cells):
                if row is not None:
                    seed[b, :, row, col] = out[b, :, row, col].detach()
            with lrp.windowed_relevance():
                (grad,) = torch.autograd.grad(out, x, seed)
    finally:
        lrp.WINDOW_MAX_SHARE, lrp._RuleState._windowed_zplus = previous, original
    return grad, len(calls)


@pytest.mark.parametrize("cells", [[(0, 0), (7, 7)], [(3, 4), (None, None)], [(7, 0), (0, 7)], [(0, 3), (5, 5)]],
                         ids=["corners", "one-image-empty", "other-corners", "edge-and-inside"])
def test_windowed_equals_full_on_edge_cases(cells):
    model = _edge_case_stack()
    x = random_images(2, size=32, seed=4)
    full, full_calls = _pixel_maps(model, x, "8", cells, share=0.0)
    windowed, windowed_calls = _pixel_maps(model, x, "8", cells, share=0.5)
    assert full_calls == 0 and windowed_calls >= 3  # the deep convolutions at least ran windowed
    assert full.abs().sum() > 0
    torch.testing.assert_close(windowed, full, rtol=1e-12, atol=1e-14 * float(full.abs().max()))
    if cells[1][0] is None:
        assert windowed[1].abs().max() == 0


@pytest.mark.slow
def test_engine_windowed_equals_full_float64():
    model = tiny_timm_efficientnet()
    x0, x1 = random_images(2, seed=5), random_images(2, seed=6)
    previous = lrp.WINDOW_MAX_SHARE
    try:
        lrp.WINDOW_MAX_SHARE = 0.0
        full = explain(model, x0, x1, "backbone.blocks.3", k_colors=3, batch_size=2)
    finally:
        lrp.WINDOW_MAX_SHARE = previous
    windowed = explain(model, x0, x1, "backbone.blocks.3", k_colors=3, batch_size=2)
    for a, b in zip(windowed, full):
        la, lb = a.layers["backbone.blocks.3"], b.layers["backbone.blocks.3"]
        for side in (0, 1):
            want = getattr(lb, f"pixel_relevance_{side}")
            torch.testing.assert_close(torch.from_numpy(getattr(la, f"pixel_relevance_{side}")), torch.from_numpy(want),
                                       rtol=1e-10, atol=1e-13 * float(abs(want).max()))


def test_only_pixel_passes_look_for_windows(monkeypatch):
    """Dense passes (the relevance above the layer, stage 1) never pay for the search; pixel passes
    use windows where they pay, and not when grouped (batched tensors)."""
    model = tiny_timm_efficientnet()
    x0, x1 = random_images(1, seed=5), random_images(1, seed=6)
    searched, windowed = [], []
    find, compute = lrp._relevance_windows, lrp._RuleState._windowed_zplus
    monkeypatch.setattr(lrp, "_relevance_windows", lambda r: searched.append(1) or find(r))
    monkeypatch.setattr(lrp._RuleState, "_windowed_zplus", lambda self, *a: windowed.append(1) or compute(self, *a))
    explain(model, x0, x1, "backbone.blocks.3", k_colors=0)
    assert searched == [] and windowed == []
    explain(model, x0, x1, "backbone.blocks.3", k_colors=2, pixel_pass_group=2)
    assert searched == [] and windowed == []
    explain(model, x0, x1, "backbone.blocks.3", k_colors=2)
    assert len(searched) > 0 and len(windowed) > 0
