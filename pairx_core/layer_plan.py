"""Which requested layers run in which order, and whether the deepest one cuts the network.

Read from the model's forward trace (:mod:`.forward_trace`), so the engine's batches pay nothing
for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, ShapeError
from .forward_trace import forward_trace


@dataclass(frozen=True)
class LayerPlan:
    """Requested layers in forward order (shallowest first)."""

    ordered: tuple[str, ...]

    @property
    def deepest(self) -> str:
        return self.ordered[-1]

    @property
    def shallowest(self) -> str:
        return self.ordered[0]


def plan_layers(model: nn.Module, probe: torch.Tensor, layer_names: list[str]) -> LayerPlan:
    """Order the layers by execution and check that the deepest one is a cut of the network.

    Replacing the deepest layer's output by a leaf is exact only if every path from the input to
    the embedding passes through that output (true for stages and blocks of CNN backbones, not
    for a module inside a residual block). Read from the model's forward trace at the probe's
    size ``probe (1, 3, H, W)`` (only its shape is used), so repeated calls cost no forward.
    """
    trace = forward_trace(model, tuple(probe.shape[-2:]))
    records = {name: trace.module(name) for name in layer_names}
    missing = [name for name, record in records.items() if record is None or not record.calls]
    if missing:
        raise ConfigError(f"layers {missing} are not executed by the model's forward")
    repeated = sorted(name for name, record in records.items() if record.calls > 1)
    if repeated:
        raise ConfigError(f"layers {repeated} run more than once per forward")
    order = [record.name for record in trace.ran if record.name in records]
    for name in order:
        _check_layer_output(name, records[name].output_shape or ())
    output = trace.output
    output_shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
    if len(output_shape) != 2:
        raise ShapeError("model output", output_shape, "(B, D) embeddings")
    plan = LayerPlan(tuple(order))
    check_cut(model, probe, plan.deepest)
    return plan


def _check_layer_output(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise ShapeError(f"output of layer {name!r}", shape, "(B, C, h, w) feature map")


def check_cut(model: nn.Module, probe: torch.Tensor, layer: str) -> None:
    """Raise :class:`ConfigError` unless ``layer``'s output lies on every path from input to embedding.

    Read from the forward trace at the probe's size: the layer's autograd node must dominate the
    input, and its output must not be changed in place later (the engine replaces it by a leaf).
    """
    record = forward_trace(model, tuple(probe.shape[-2:])).module(layer)
    if record is None or not record.calls:
        raise ConfigError(f"layer {layer!r} is not executed by the model's forward")
    if not record.dominates_input:
        raise ConfigError(
            f"layer {layer!r} is bypassed by a path from input to embedding (e.g. a module inside a "
            "residual block); choose a block or stage output instead"
        )
    if record.changed_in_place:
        raise ConfigError(f"the output of layer {layer!r} is changed in place afterwards (e.g. by an in-place "
                          "activation); choose the module that contains that step")


def capture_hook(store: dict[str, torch.Tensor], name: str):
    """A forward hook that keeps the module's output in ``store[name]``."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[name] = output

    return hook
