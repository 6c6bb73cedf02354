"""The LRP composite of the engine: zennit's ``EpsilonPlus``, with reusable modified forwards.

zennit's rule hooks recompute each layer's modified forward (e.g. z+ with clamped weights) on
every backward pass, although it depends only on the forward's stored input. The engine runs
many backward passes over one forward (one per pixel-map cell rank), so the rules here keep the
modified forward (and its graph) from the first backward and reuse it until the next forward.
The arithmetic is zennit's own (same modifiers, stabiliser, division and reducer), so the
numbers are identical; only repeated work goes. Reuse is switched on by :func:`reuse_modified_forwards`
for the pixel passes only, so that nothing above the layer is kept longer than needed.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.core import ParamMod, Stabilizer
from zennit.rules import Epsilon, Norm, ZPlus
from zennit.types import AvgPool, Convolution
from zennit.layer import Sum

_REUSE = threading.local()


@contextlib.contextmanager
def reuse_modified_forwards() -> Iterator[None]:
    """Within this block, rule hooks keep and reuse their modified forward across backwards."""
    previous = getattr(_REUSE, "on", False)
    _REUSE.on = True
    try:
        yield
    finally:
        _REUSE.on = previous


class _ReusableModifiedForward:
    """Mixin for zennit ``BasicHook`` rules (same maths, cached modified forward)."""

    def _init_reuse(self, stabilizer) -> None:
        self._stabilizer_value = stabilizer
        self._stabilize = Stabilizer.ensure(stabilizer)
        self._modified = None

    def copy(self):
        return type(self)(self._stabilizer_value)

    def forward(self, module, input, output):
        super().forward(module, input, output)
        self._modified = None

    def backward(self, module, grad_input, grad_output):
        reuse = getattr(_REUSE, "on", False)
        cached = getattr(self, "_modified", None)
        if cached is None:
            original_input = self.stored_tensors["input"][0].clone()
            inputs, outputs = [], []
            for in_mod, param_mod, out_mod in zip(self.input_modifiers, self.param_modifiers, self.output_modifiers):
                input = in_mod(original_input).requires_grad_()
                with ParamMod.ensure(param_mod)(module) as modified, torch.autograd.enable_grad():
                    output = out_mod(modified.forward(input))
                inputs.append(input)
                outputs.append(output)
            # zennit's mappers for these rules divide by the stabilised sum of the outputs; the
            # denominator depends on the forward only, so it is computed once per forward too
            cached = (inputs, outputs, self._stabilize(sum(outputs)))
            if reuse:
                self._modified = cached
        inputs, outputs, denominator = cached
        grad_outputs = [grad_output[0] / denominator] * len(outputs)
        gradients = torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, retain_graph=reuse,
            create_graph=grad_output[0].requires_grad,
        )
        relevance = self.reducer(inputs, gradients)
        return tuple(relevance if original.shape == relevance.shape else None for original in grad_input)

    def remove(self):
        self._modified = None
        super().remove()


class ReusableZPlus(_ReusableModifiedForward, ZPlus):
    """z+ (``stabilizer`` as in zennit's ``ZPlus``)."""

    def __init__(self, stabilizer=1e-6):
        super().__init__(stabilizer=stabilizer)
        self._init_reuse(stabilizer)


class ReusableEpsilon(_ReusableModifiedForward, Epsilon):
    """epsilon rule (``epsilon`` as in zennit's ``Epsilon``)."""

    def __init__(self, epsilon=1e-6):
        super().__init__(epsilon=epsilon)
        self._init_reuse(epsilon)


class ReusableNorm(_ReusableModifiedForward, Norm):
    """norm rule for sums and average pools (as zennit's ``Norm``)."""

    def __init__(self, stabilizer=1e-6):
        super().__init__(stabilizer=stabilizer)
        self._init_reuse(stabilizer)


class EngineEpsilonPlus(LayerMapComposite):
    """``EpsilonPlus`` (z+ on convolutions, epsilon on linear layers, pass-through on activations
    and batch norms, norm on sums and average pools) built from the reusable rules."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonizers=None):
        base = [(types, rule) for types, rule in layer_map_base(stabilizer) if types not in (Sum, AvgPool)]
        layer_map = [
            (Sum, ReusableNorm(stabilizer=stabilizer)),
            (AvgPool, ReusableNorm(stabilizer=stabilizer)),
            *base,
            (Convolution, ReusableZPlus(stabilizer=stabilizer)),
            (torch.nn.Linear, ReusableEpsilon(epsilon=epsilon)),
        ]
        super().__init__(layer_map=layer_map, canonizers=canonizers)
