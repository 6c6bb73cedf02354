"""Tiny models and inputs shared by the engine tests (CPU, seconds)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from pairx_core.models import MiewIdNet, seeded


def tiny_timm_efficientnet(dtype=torch.float64, seed: int = 0) -> MiewIdNet:
    """MiewID-shaped model (timm EfficientNet backbone, GeM, BatchNorm1d neck), random weights."""
    return seeded(lambda: _randomise_batch_norms(MiewIdNet("efficientnet_b0")), seed).to(dtype).eval()


def tiny_timm_resnet(dtype=torch.float64, seed: int = 0) -> MiewIdNet:
    return seeded(lambda: _randomise_batch_norms(MiewIdNet("resnet18")), seed).to(dtype).eval()


class PlainStack(nn.Module):
    """A plain conv/BN/ReLU stack with a linear embedding head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(16, 12)

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.features(x))))


def plain_stack(dtype=torch.float64, seed: int = 0) -> PlainStack:
    return seeded(lambda: _randomise_batch_norms(PlainStack()), seed).to(dtype).eval()


def _randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so batch-norm merging is really exercised."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            if module.weight is not None:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return model


def random_images(n: int, size: int = 64, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator, dtype=dtype)


def quiet():
    return warnings.catch_warnings()


@contextlib.contextmanager
def traced_layer(model: nn.Module, composite, x: torch.Tensor, layer: str):
    """Inside: ``(x, out)``, the input with its gradient switched on and ``layer``'s output, of one
    forward of ``model`` under ``composite`` (whose context stays open for backward passes)."""
    store = {}
    with composite.context(model) as modified, torch.enable_grad():
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(out=o))
        try:
            x = x.clone().requires_grad_(True)
            modified(x)
        finally:
            handle.remove()
        yield x, store["out"]
