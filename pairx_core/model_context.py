"""Running a model for a while under settings of our own, and putting everything back afterwards.

The engine and stage 1 change the model (eval mode, frozen parameters, device, weight layout) and
the calling thread's denormal flushing on CPU (:mod:`pairx_core.runtime_settings`). Both are
scoped here: whatever was in place before a call is in place after it, errors included.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .runtime_settings import denormals_flushed


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else where the model's first parameter lives (CPU for none)."""
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def prepared_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> Iterator[None]:
    """Eval mode, no parameter gradients, on ``device``, 4-D weights channels-last if asked, and
    denormals flushed on CPU; everything restored on exit (errors too)."""
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    original_device = resolve_device(model, None)
    original_layout: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if original_device != device:
            model.to(device)
        if channels_last:
            for parameter in model.parameters():
                if parameter.ndim == 4:
                    original_layout.append((parameter, parameter.data))
                    parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
        with denormals_flushed(device):
            yield
    finally:
        for parameter, data in original_layout:
            parameter.data = data
        if original_device != device:
            model.to(original_device)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
