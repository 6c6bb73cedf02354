"""Run a model from a layer's activations upward, without running anything below the layer.

One probe forward with hooks on every module records when each module starts and ends. The
modules that finish before the layer starts (and do not contain it) form the *lower network*;
during a split forward the outermost of them are swapped for identity stubs and the layer itself
for a stub that returns the given activations, and the model is fed a tiny dummy input. Code in
the parents' ``forward`` between the lower modules sees the dummy input only; its result is
thrown away by the layer stub.

A split is checked once per (model, layer, input shape, dtype): on a probe image the split
forward must give the full model's embedding (float tolerance). A model whose structure defeats
this (a module used below and above the layer, a skip connection around the layer, shape
checks on the input) fails the check; :func:`can_split` then returns False, with one warning per
(model, layer), and callers use the full path. The model is restored exactly after every split
forward, errors included.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError

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


_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


class _LayerStub(nn.Module):
    """Stands in for the layer: returns the activations it holds, ignoring its input."""

    def __init__(self, activations: torch.Tensor):
        super().__init__()
        self.activations = activations

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.activations


def plan_split(model: nn.Module, layer: str, probe: torch.Tensor) -> SplitPlan:
    """Find the lower network of ``layer`` with one probe forward ``probe (1, 3, H, W)``.

    Raises:
        ConfigError: the layer never runs, runs twice, or a lower module also runs above it.
    """
    target = model.get_submodule(layer)
    events: dict[str, list[tuple[int, int]]] = {}
    clock = [0]
    open_calls: dict[str, list[int]] = {}
    handles = []

    def pre(name):
        def hook(module, args):
            clock[0] += 1
            open_calls.setdefault(name, []).append(clock[0])
        return hook

    def post(name):
        def hook(module, args, output):
            clock[0] += 1
            start = open_calls[name].pop()
            events.setdefault(name, []).append((start, clock[0]))
        return hook

    names = {module: name for name, module in model.named_modules() if name}
    try:
        for module, name in names.items():
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if len(events.get(layer, [])) != 1:
        raise ConfigError(f"layer {layer!r} runs {len(events.get(layer, []))} times in a forward; cannot split there")
    layer_start = events[layer][0][0]
    lower = []
    for name, calls in events.items():
        if name == layer or layer.startswith(name + ".") or name.startswith(layer + "."):
            continue
        before = [end < layer_start for _, end in calls]
        if all(before):
            lower.append(name)
        elif any(before):
            raise ConfigError(f"module {name!r} runs both below and above layer {layer!r}; cannot split there")
    outermost = tuple(n for n in lower if not any(n.startswith(other + ".") for other in lower))
    del target
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


def _capture(model: nn.Module, layer: str, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    store: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("out", o))
    try:
        with torch.no_grad():
            embedding = model(probe)
    finally:
        handle.remove()
    return embedding, store["out"]


def can_split(model: nn.Module, layer: str, input_size: tuple[int, int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> SplitPlan | None:
    """The checked plan to split ``model`` at ``layer`` for ``(H, W)`` inputs, or None (one warning).

    The check runs once per (model, layer, input size, dtype) and its answer is remembered.
    Call it with the model in eval mode.
    """
    key = (layer, tuple(input_size), dtype, str(device))
    remembered = _PLANS.setdefault(model, {})
    if key in remembered:
        return remembered[key]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((1, 3, *input_size), generator=generator).to(device=device, dtype=dtype)
    plan: SplitPlan | None
    reason = ""
    try:
        plan = plan_split(model, layer, probe)
        full, activations = _capture(model, layer, probe)
        with torch.no_grad():
            split = split_forward(model, plan, activations)
        scale = float(full.abs().max()) or 1.0
        difference = float((split - full).abs().max()) / scale if split.shape == full.shape else float("inf")
        if not difference <= SPLIT_RTOL.get(dtype, 1e-4):
            reason = f"the split forward differs from the full one (relative {difference:.2e})"
            plan = None
    except Exception as error:  # noqa: BLE001 - any failure means: do not split this model here
        reason = f"{type(error).__name__}: {error}"
        plan = None
    if plan is None:
        warned = _WARNED.setdefault(model, set())
        if layer not in warned:
            warned.add(layer)
            warnings.warn(f"cannot run {type(model).__name__} from layer {layer!r} upward ({reason}); "
                          "using the full network for it", SplitWarning, stacklevel=2)
    remembered[key] = plan
    return plan
