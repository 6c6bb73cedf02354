"""The engine's direct LRP backward: same numbers as zennit's hooks, without their wasted work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model_helpers import plain_stack, random_images, tiny_timm_efficientnet, tiny_timm_resnet, traced_layer
from pairx_core import engine as engine_module
from pairx_core import explain
from pairx_core.canonizers import select_canonizers
from pairx_core.lrp import EngineEpsilonPlus, HookedEpsilonPlus, denominators_in_forward


class _OpCounter(TorchDispatchMode):
    """Counts aten calls by name (e.g. ``convolution_backward``)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _graph_node_names(tensor: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _pixel_relevance(model, composite, x, layer):
    """Relevance at the input of a seed at one cell of ``layer``, plus the op counts of the backward."""
    with traced_layer(model, composite, x, layer) as (x, out):
        seed = torch.zeros_like(out)
        seed[:, :, 1, 1] = out[:, :, 1, 1].detach()
        nodes = _graph_node_names(out)
        with _OpCounter() as counter:
            (grad,) = torch.autograd.grad(out, x, seed)
    return grad, nodes, counter.counts


@pytest.mark.parametrize(
    "make_model,layer,signed_inputs",
    [(tiny_timm_efficientnet, "backbone.blocks.3", "all"), (tiny_timm_resnet, "backbone.layer2", 1),
     (plain_stack, "features.4", 1)],
    ids=["timm-effnet", "timm-resnet", "plain"],
)
def test_direct_equals_hooks_without_ordinary_conv_backward(make_model, layer, signed_inputs):
    model = make_model()
    x = random_images(2, seed=3)
    canonizers = select_canonizers(model)
    direct, direct_nodes, direct_ops = _pixel_relevance(model, EngineEpsilonPlus(canonizers=canonizers), x, layer)
    hooked, hooked_nodes, hooked_ops = _pixel_relevance(model, HookedEpsilonPlus(canonizers=canonizers), x, layer)
    assert torch.isfinite(direct).all() and direct.abs().sum() > 0
    torch.testing.assert_close(direct, hooked, rtol=1e-10, atol=1e-12 * float(hooked.abs().max()))
    # the ordinary convolution backward is not in the graph any more, and no activation derivative
    assert "ConvolutionBackward0" in hooked_nodes and "ConvolutionBackward0" not in direct_nodes
    slow_paths = ("SiluBackward", "ReluBackward", "NativeBatchNormBackward")
    assert not any(name.startswith(slow_paths) for name in direct_nodes)
    # zennit runs the ordinary input gradient and two modified ones per convolution; direct: the
    # two where the input has negative values (SiLU networks, the image), else z+'s positive one
    # only (after a ReLU, where x- is zero: a ReLU network's convolutions but its stem)
    n_hooked = hooked_ops.get("convolution_backward", 0)
    n_direct = direct_ops.get("convolution_backward", 0)
    n_convolutions = n_hooked // 3
    assert n_hooked > 0 and n_hooked == 3 * n_convolutions
    expected = 2 * n_convolutions if signed_inputs == "all" else n_convolutions + signed_inputs
    assert n_direct == expected, (n_direct, n_convolutions)


@pytest.mark.slow
def test_engine_results_equal_on_both_paths_float64():
    model = tiny_timm_efficientnet()
    x0, x1 = random_images(2, seed=5), random_images(2, seed=6)
    layers = ["backbone.blocks.2", "backbone.blocks.3"]
    direct = explain(model, x0, x1, layers, k_colors=3, batch_size=2)
    original = engine_module.EngineEpsilonPlus
    engine_module.EngineEpsilonPlus = HookedEpsilonPlus
    try:
        hooked = explain(model, x0, x1, layers, k_colors=3, batch_size=2)
    finally:
        engine_module.EngineEpsilonPlus = original
    for a, b in zip(direct, hooked):
        for layer in layers:
            la, lb = a.layers[layer], b.layers[layer]
            np.testing.assert_allclose(la.relevance_0, lb.relevance_0, rtol=1e-9,
                                       atol=1e-12 * np.abs(lb.relevance_0).max())
            cells = ["row_0", "col_0", "row_1", "col_1"]
            assert la.matches[cells].equals(lb.matches[cells])
            np.testing.assert_allclose(la.pixel_relevance_1, lb.pixel_relevance_1, rtol=1e-9,
                                       atol=1e-12 * np.abs(lb.pixel_relevance_1).max())


class _SameConv(nn.Conv2d):
    """A convolution with its own forward (like timm's dynamic 'same' padding): not computed directly."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_custom_convolution_forward_falls_back_to_zennit_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(_SameConv(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 1)).double().eval()
    x = random_images(2, size=12, seed=1)
    direct, nodes, _ = _pixel_relevance(model, EngineEpsilonPlus(canonizers=[]), x, "4")
    hooked, _, _ = _pixel_relevance(model, HookedEpsilonPlus(canonizers=[]), x, "4")
    torch.testing.assert_close(direct, hooked, rtol=1e-10, atol=1e-14)
    assert nodes.count("ConvolutionBackward0") == 1  # the custom one only (zennit's hook is on it)
    # the in-place ReLU did not change its input (it got a copy): the graph stayed valid
    assert torch.isfinite(direct).all()


class _MixedSignStack(nn.Module):
    """Convolutions with biases: an ordinary one on the (signed) image, a depthwise one and a 1x1
    one after SiLUs (signed inputs), and a 1x1 one after a ReLU (no negative input), the traced
    layer."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.middle = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.last = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.act(self.depthwise(self.act(self.first(x))))
        return self.last(self.relu(self.middle(x)))


def test_zplus_denominators_one_convolution_per_branch_and_zennits_stabiliser():
    torch.manual_seed(4)
    model = _MixedSignStack().double().eval()
    for conv in (model.first, model.depthwise, model.middle):
        nn.init.normal_(conv.bias, std=0.5)  # biases of both signs: b+ in the positive branch only
    with torch.no_grad():
        model.middle.bias -= 0.4  # ReLU-dead cells ...
        model.last.bias.copy_(torch.tensor([-0.5, 0.0, -0.1, 0.3, -0.2, 0.0]))  # ... under b+ = 0: denominators of 0
    x = random_images(2, size=10, seed=2)
    direct, _, counts = _pixel_relevance(model, EngineEpsilonPlus(canonizers=[]), x, "last")
    hooked, _, _ = _pixel_relevance(model, HookedEpsilonPlus(canonizers=[]), x, "last")
    assert direct.abs().sum() > 0
    torch.testing.assert_close(direct, hooked, rtol=1e-10, atol=1e-13 * float(hooked.abs().max()))
    # the modified forwards: two branches where the input has negative values, one after the ReLU
    assert counts.get("convolution", 0) == 2 + 2 + 2 + 1
    # the zero denominators exist (the stabiliser's "+1 at zero" case is exercised)
    with torch.no_grad():
        hidden = model.relu(model.middle(model.act(model.depthwise(model.act(model.first(x))))))
        zplus = nn.functional.conv2d(hidden, model.last.weight.clamp(min=0), model.last.bias.clamp(min=0))
    assert (zplus == 0).any()

    # denominators built in the forward (stage 1): from the output where the convolution is
    # ungrouped, (y + |x| * |W| + |b|) / 2, or x * W+ + b+ after the ReLU; same numbers
    with denominators_in_forward():
        with _OpCounter() as forward_ops, traced_layer(model, EngineEpsilonPlus(canonizers=[]), x, "last") as (
                x_in, out):
            n_forward = forward_ops.counts.get("convolution", 0)
            seed = torch.zeros_like(out)
            seed[:, :, 1, 1] = out[:, :, 1, 1].detach()
            with _OpCounter() as backward_ops:
                (in_forward,) = torch.autograd.grad(out, x_in, seed)
    torch.testing.assert_close(in_forward, hooked, rtol=1e-10, atol=1e-13 * float(hooked.abs().max()))
    # the forward: 4 convolutions, one more for each of the 3 ungrouped ones; the backward builds
    # only the depthwise convolution's two branches
    assert n_forward == 4 + 3
    assert backward_ops.counts.get("convolution", 0) == 2
