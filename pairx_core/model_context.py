"""Running a model for a while under settings of our own, and putting everything back afterwards.

The engine and stage 1 change the model (eval mode, frozen parameters, device, weight layout) and
one process-wide switch (flushing denormal floats on CPU: LRP produces denormals, which slow
x86 CPUs badly). Both are scoped here: whatever was in place before a call is in place after it,
errors included.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else where the model's first parameter lives (CPU for none)."""
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def flush_denormals(device: torch.device | str = "cpu") -> Iterator[None]:
    """Flush denormal floats to zero within the block when computing on CPU; restore on exit.

    ``torch.set_flush_denormal`` is process-wide and has no getter; the previous state is read
    by setting it and looking at what a denormal becomes.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def _flushing_denormals() -> bool:
    tiny = torch.tensor([1e-310], dtype=torch.float64)  # a denormal double
    return bool((tiny * 1.0).item() == 0.0)


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
        with flush_denormals(device):
            yield
    finally:
        for parameter, data in original_layout:
            parameter.data = data
        if original_device != device:
            model.to(original_device)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
