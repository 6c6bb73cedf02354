"""Which requested layers run in which order, and whether the deepest one cuts the network.

Probed once per model and layer set on one image (cached per model object, weakly), so the
engine's batches pay nothing for it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, ShapeError


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


_PLANS_BY_MODEL: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, object]]" = weakref.WeakKeyDictionary()


def plan_layers(model: nn.Module, probe: torch.Tensor, layer_names: list[str]) -> LayerPlan:
    """Order the layers by execution and check that the deepest one is a cut of the network.

    Replacing the deepest layer's output by a leaf is exact only if every path from the input to
    the embedding passes through that output (true for stages and blocks of CNN backbones, not
    for a module inside a residual block). Checked once per model and layer set on one image.
    """
    key = tuple(layer_names)
    cached = _PLANS_BY_MODEL.setdefault(model, {})
    if key in cached:
        return cached[key]
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: order.append(name))
        for name in layer_names
    ]
    try:
        with torch.no_grad():
            output = model(probe)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layer_names if name not in order]
    if missing:
        raise ConfigError(f"layers {missing} are not executed by the model's forward")
    if len(order) != len(set(order)):
        repeated = sorted({n for n in order if order.count(n) > 1})
        raise ConfigError(f"layers {repeated} run more than once per forward")
    for name in order:
        _check_layer_output(name, _captured_shape(model, probe, name))
    if output.ndim != 2:
        raise ShapeError("model output", tuple(output.shape), "(B, D) embeddings")
    plan = LayerPlan(tuple(order))
    check_cut(model, probe, plan.deepest)
    cached[key] = plan
    return plan


def _captured_shape(model: nn.Module, probe: torch.Tensor, name: str) -> tuple[int, ...]:
    store: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(name).register_forward_hook(capture_hook(store, name))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
    return tuple(store[name].shape)


def _check_layer_output(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise ShapeError(f"output of layer {name!r}", shape, "(B, C, h, w) feature map")


def check_cut(model: nn.Module, probe: torch.Tensor, layer: str) -> None:
    leaf_hook = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: o.detach().requires_grad_(True)
    )
    try:
        with torch.enable_grad():
            x = probe.detach().clone().requires_grad_(True)
            embedding = model(x)
            (through_input,) = torch.autograd.grad(embedding.sum(), x, allow_unused=True)
    finally:
        leaf_hook.remove()
    if through_input is not None:
        raise ConfigError(
            f"layer {layer!r} is bypassed by a path from input to embedding (e.g. a module inside a "
            "residual block); choose a block or stage output instead"
        )




def capture_hook(store: dict[str, torch.Tensor], name: str):
    """A forward hook that keeps the module's output in ``store[name]``."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[name] = output

    return hook
