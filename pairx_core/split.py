"""Run a model from a layer's activations upward, without running anything below the layer.

The model's forward trace (:mod:`.forward_trace`) records when each module starts and ends. The
modules that finish before the layer starts (and do not contain it) form the *lower network*;
during a split forward the outermost of them are swapped for identity stubs and the layer itself
for a stub that returns the given activations, and the model is fed a tiny dummy input. Code in
the parents' ``forward`` between the lower modules sees the dummy input only; its result is
thrown away by the layer stub.

A split is checked once per (model, layer, input shape, dtype): started from the trace's
activations of the layer on its probe image, the split forward must give the traced embedding
(float tolerance). A model whose structure defeats this (a module used below and above the
layer, a skip connection around the layer, shape checks on the input) fails the check;
:func:`can_split` then returns None, with one warning per (model, layer), and callers use the
full path. The model is restored exactly after every split forward, errors included.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError
from .forward_trace import ForwardTrace, forward_trace, model_memo

#: relative tolerance of the split check (embeddings compared by max abs difference / max abs value)
SPLIT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
#: side of the dummy image fed to a split model (the stubs ignore it)
DUMMY_SIDE = 16


class SplitWarning(UserWarning):
    """A model could not be split at a layer: stage 1 uses the full network for it."""


@dataclass(frozen=True)
class SplitPlan:
    """Where to cut: ``below`` are the outermost module names that run before ``layer``."""

    layer: str
    below: tuple[str, ...]


class _LayerStub(nn.Module):
    """Stands in for the layer: returns the activations it holds, ignoring its input."""

    def __init__(self, activations: torch.Tensor):
        super().__init__()
        self.activations = activations

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.activations


def plan_split(model: nn.Module, layer: str, probe: torch.Tensor) -> SplitPlan:
    """Find the lower network of ``layer`` from the forward trace at the size of ``probe (1, 3, H, W)``.

    Raises:
        ConfigError: the layer never runs, runs twice, or a lower module also runs above it.
    """
    return _plan_from_trace(forward_trace(model, tuple(probe.shape[-2:])), layer)


def _plan_from_trace(trace: ForwardTrace, layer: str) -> SplitPlan:
    target = trace.module(layer)
    calls = target.calls if target is not None else 0
    if calls != 1:
        raise ConfigError(f"layer {layer!r} runs {calls} times in a forward; cannot split there")
    layer_start = target.spans[0][0]
    lower = []
    for record in trace.ran:
        name = record.name
        if name == layer or layer.startswith(name + ".") or name.startswith(layer + "."):
            continue
        before = [end < layer_start for _, end in record.spans]
        if all(before):
            lower.append(name)
        elif any(before):
            raise ConfigError(f"module {name!r} runs both below and above layer {layer!r}; cannot split there")
    outermost = tuple(n for n in lower if not any(n.startswith(other + ".") for other in lower))
    return SplitPlan(layer=layer, below=outermost)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


@contextlib.contextmanager
def stubbed(model: nn.Module, plan: SplitPlan, activations: torch.Tensor) -> Iterator[torch.Tensor]:
    """Within the block, ``model(dummy)`` runs from ``activations (B, C, h, w)`` upward.

    Yields the dummy input to feed; the original modules are put back on exit, errors included.
    """
    originals = {name: model.get_submodule(name) for name in (*plan.below, plan.layer)}
    try:
        for name in plan.below:
            _set_submodule(model, name, nn.Identity())
        _set_submodule(model, plan.layer, _LayerStub(activations))
        yield activations.new_zeros((activations.shape[0], 3, DUMMY_SIDE, DUMMY_SIDE))
    finally:
        for name, module in originals.items():
            _set_submodule(model, name, module)


def split_forward(model: nn.Module, plan: SplitPlan, activations: torch.Tensor) -> torch.Tensor:
    """Embeddings ``(B, D)`` from the layer's activations ``(B, C, h, w)`` (autograd as the caller set)."""
    with stubbed(model, plan, activations) as dummy:
        return model(dummy)


def can_split(model: nn.Module, layer: str, input_size: tuple[int, int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> SplitPlan | None:
    """The checked plan to split ``model`` at ``layer`` for ``(H, W)`` inputs, or None (one warning).

    The check reads the model's forward trace at ``input_size`` (the model's own dtype and
    device; ``dtype`` and ``device`` are kept for callers and should match them) and runs the
    upper network once from the traced activations of ``layer``; its answer is remembered with
    the trace. Call it with the model in eval mode.
    """
    reason = ""
    try:
        trace = forward_trace(model, input_size)
    except Exception as error:  # noqa: BLE001 - any failure means: do not split this model here
        trace, reason = None, f"{type(error).__name__}: {error}"
    remembered = trace.memo.setdefault("split", {}) if trace is not None else {}
    if layer in remembered:
        return remembered[layer]
    plan: SplitPlan | None = None
    if trace is not None:
        plan, reason = _checked_plan(model, trace, layer)
    if plan is None:
        warned = model_memo(model).setdefault("split_warned", set())
        if layer not in warned:
            warned.add(layer)
            warnings.warn(f"cannot run {type(model).__name__} from layer {layer!r} upward ({reason}); "
                          "using the full network for it", SplitWarning, stacklevel=2)
    remembered[layer] = plan
    return plan


def _checked_plan(model: nn.Module, trace: ForwardTrace, layer: str) -> tuple[SplitPlan | None, str]:
    """The plan and ``""``, or None and why: the split forward must give the traced embedding."""
    try:
        plan = _plan_from_trace(trace, layer)
        activations = trace.layer_output(layer)
        if activations is None:
            return None, "its output is not a feature map on every path from input to embedding"
        full = trace.output
        with torch.no_grad():
            split = split_forward(model, plan, activations)
        scale = float(full.abs().max()) or 1.0
        difference = float((split - full).abs().max()) / scale if split.shape == full.shape else float("inf")
    except Exception as error:  # noqa: BLE001 - any failure means: do not split this model here
        return None, f"{type(error).__name__}: {error}"
    if not difference <= SPLIT_RTOL.get(trace.dtype, 1e-4):
        return None, f"the split forward differs from the full one (relative {difference:.2e})"
    return plan, ""
