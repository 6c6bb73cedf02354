"""The LRP composite of the engine: zennit's ``EpsilonPlus``, with its backward computed directly.

zennit implements a rule with hooks around the module: autograd first runs the module's ordinary
backward, then the hook throws that gradient away and computes the rule's relevance from a
re-run of the modified forward. The engine runs many backward passes over one forward (one per
pixel-map cell rank), so that waste is paid many times. :class:`EngineEpsilonPlus` keeps
zennit's composite machinery, canonizers and rule definitions (the input and parameter
modifiers, the stabiliser, the reducer) but attaches each rule as an autograd function on the
module's output, whose backward is the rule itself:

- z+ on convolutions and epsilon on linear layers (:class:`DirectRule`): the module's forward
  runs without a graph; the modified forwards and the stabilised denominator are computed once
  per forward, at the first backward that reaches the module, and every backward then costs one
  input-gradient convolution (or matrix product) per modified branch, a division and the
  reducer. The ordinary convolution backward is never run, and z+'s negative branch (its
  modified forward and its input gradients) is skipped for an input without negative values
  (after a ReLU), where its product is an exact zero. z+'s denominator is never negative, so
  zennit's stabiliser (epsilon times the sign, +1 at zero) is one in-place addition there.
- pass-through on activations and batch norms (:class:`DirectPass`): the module's forward runs
  without a graph and its backward hands the incoming relevance to the input untouched (zennit
  computes the activation's derivative and then discards it).
- the norm rule on sums and average pools, and z+ on convolutions whose forward is not the
  stock one (e.g. dynamic "same" padding), keep zennit's hooks with a reusable modified forward
  (:class:`ReusableNorm`, :class:`ReusableZPlus`), switched on by
  :func:`reuse_modified_forwards`.
- pixel passes on the CPU (:func:`windowed_relevance`): a pass seeded at one cell per image carries
  relevance only inside that cell's receptive field, so a z+ convolution computes its input
  gradient on the rectangle of its output that is non-zero (per image, padded to a common size)
  instead of the whole map: the same products and terms, summed in another order.

The arithmetic is zennit's own (same modifiers, same stabiliser applied to the same sum, same
reducer; the input gradient of a convolution is the same ``convolution_backward`` call autograd
makes), so the numbers equal stock zennit's to rounding. :class:`HookedEpsilonPlus` is the
previous, all-hooks composite, kept for comparisons (``bench/engine.py --lrp hooks``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.core import BasicHook, ParamMod, RemovableHandle, RemovableHandleList, Stabilizer
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass, ZPlus
from zennit.types import AvgPool, Convolution

_REUSE = threading.local()


@contextlib.contextmanager
def _switched_on(flag: str) -> Iterator[None]:
    previous = getattr(_REUSE, flag, False)
    setattr(_REUSE, flag, True)
    try:
        yield
    finally:
        setattr(_REUSE, flag, previous)


def reuse_modified_forwards() -> contextlib.AbstractContextManager:
    """Within this block, zennit-hook rules keep and reuse their modified forward across backwards
    (the direct rules always do: their cache lives and dies with the forward's graph)."""
    return _switched_on("on")


def denominators_in_forward() -> contextlib.AbstractContextManager:
    """Within this block, z+ convolutions build their denominator during the forward, from the
    module's output (``_RuleState.denominator_from_forward``): one convolution instead of two per
    ungrouped convolution with a signed input, on the CPU in float32 or float64. The denominator
    then lives from the forward to the first backward that reaches the module (one output-sized
    tensor per convolution). Meant for graphs that get a single backward (stage 1: 0.83x its time,
    +5 % peak memory at 440 px); in the engine, whose pixel passes keep the graph, it measured no
    gain."""
    return _switched_on("in_forward")


def windowed_relevance() -> contextlib.AbstractContextManager:
    """Within this block, z+ convolutions on the CPU compute only the rectangle of their output that
    carries relevance, when it is small enough (:data:`WINDOW_MAX_SHARE`): for backward passes
    seeded at single cells (the pixel passes), whose relevance stays inside the cells' receptive
    fields. Dense passes do not look for the rectangle."""
    return _switched_on("windowed")


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



# ------------------------------------------------------------------------ direct rules
class _Holder:
    """Carries a tensor into an autograd function without making it an input (so that the
    function's output is that very tensor, not a view of an input)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _PassFunction(torch.autograd.Function):
    """Output: the module's output; backward: the incoming relevance, to the module's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, holder: _Holder) -> torch.Tensor:
        return holder.tensor

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        return relevance, None


class _RuleFunction(torch.autograd.Function):
    """Output: the module's output; backward: the rule's relevance at the module's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, holder: _Holder, state: "_RuleState") -> torch.Tensor:
        ctx.save_for_backward(x)  # an in-place change of the input later fails loudly
        ctx.state = state
        return holder.tensor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, relevance: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.state.relevance(x, relevance), None, None


class _GraphFreeForward:
    """Forward hooks shared by the direct rules (zennit's hook interface: ``copy``, ``register``,
    ``remove``, ``active``).

    The pre-hook remembers the module's input and, for a leaf module, switches the graph off for
    its forward (in-place modules get a copy, so the input stays intact); the post-hook switches
    it back on and makes the output the output of an autograd function of the input, whose
    backward is the rule. A non-leaf module (e.g. a batch norm with its activation inside) runs
    with its graph, which is dropped with its output's history.
    """

    def __init__(self) -> None:
        self.active = True
        self._pending: list[tuple[torch.Tensor, bool] | None] = []

    def copy(self):
        return type(self)()

    def register(self, module: nn.Module) -> RemovableHandleList:
        self._pending = []
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self._pre_forward),
            # first of the module's forward hooks, so that others see the attached output
            module.register_forward_hook(self._post_forward, prepend=True),
        ])

    def remove(self) -> None:
        self._pending.clear()

    def _pre_forward(self, module: nn.Module, args: tuple):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not (self.active and torch.is_grad_enabled() and x.requires_grad):
            self._pending.append(None)
            return None
        leaf = next(module.children(), None) is None
        self._pending.append((x, leaf))
        if leaf:
            torch.set_grad_enabled(False)
        if getattr(module, "inplace", False):
            return (x.clone(), *args[1:])
        return None

    def _post_forward(self, module: nn.Module, args: tuple, output):
        entry = self._pending.pop()
        if entry is None:
            return None
        x, leaf = entry
        if leaf:
            torch.set_grad_enabled(True)  # it was on: checked by the pre-hook
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"LRP rule on {type(module).__name__}: expected a tensor output, "
                            f"got {type(output).__name__}")
        if not leaf:
            output = output.detach()
        elif output is x:
            output = output.clone()
        return self._attach(module, x, _Holder(output))

    def _attach(self, module: nn.Module, x: torch.Tensor, holder: _Holder) -> torch.Tensor:
        raise NotImplementedError


class DirectPass(_GraphFreeForward):
    """zennit's ``Pass`` rule without computing the discarded derivative."""

    def _attach(self, module, x, holder):
        return _PassFunction.apply(x, holder)


_DIRECT_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_STOCK_FORWARDS = tuple(kind.forward for kind in (*_DIRECT_CONVOLUTIONS, nn.Linear))


class DirectRule(_GraphFreeForward):
    """A zennit ``BasicHook`` rule whose mapper divides by the stabilised sum of the modified
    outputs (``ZPlus``, ``Epsilon``), computed directly on a convolution or linear layer.

    Args:
        rule: the zennit rule giving the input and parameter modifiers and the reducer.
        stabilizer: the value the rule was built with (``Stabilizer.ensure`` as zennit does).
        fallback: zennit hook used for modules this class does not compute directly.
    """

    def __init__(self, rule: BasicHook, stabilizer, fallback: BasicHook) -> None:
        super().__init__()
        self.rule = rule
        self.stabilizer = stabilizer
        self.stabilize = Stabilizer.ensure(stabilizer)
        self.fallback = fallback
        # z+ splits the input by sign: x+ = clamp(x, min=0), x- = clamp(x, max=0) have disjoint
        # supports, so one of the reducer's two products is an exact zero everywhere and the
        # reducer x+ * a + x- * b can run in place as one multiply and one fused multiply-add
        # with the same result (torch.where on a boolean mask was 3x slower on CPU)
        self.sign_split = type(rule) is ZPlus
        # a plain epsilon (no clipping, no norm scaling): on a denominator without negative values
        # zennit's stabiliser adds it to every entry; None: use zennit's stabiliser
        plain = type(stabilizer) is Stabilizer and not stabilizer.clip and not stabilizer.norm_scale
        self.plain_epsilon = (float(stabilizer) if isinstance(stabilizer, (int, float))
                              else stabilizer.epsilon if plain else None)

    def copy(self):
        return type(self)(self.rule, self.stabilizer, self.fallback)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Stock ``Conv1d/2d/3d`` with zero padding given as numbers, or stock ``Linear``."""
        if type(module).forward not in _STOCK_FORWARDS:
            return False
        if isinstance(module, _DIRECT_CONVOLUTIONS):
            return module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return isinstance(module, nn.Linear)

    def _attach(self, module, x, holder):
        state = _RuleState(self, module)
        if self.sign_split and getattr(_REUSE, "in_forward", False) and isinstance(module, _DIRECT_CONVOLUTIONS):
            state.denominator_from_forward(x, holder.tensor)
        return _RuleFunction.apply(x, holder, state)


class _RuleState:
    """Per-forward cache of one direct rule: modified inputs (z+: x+ and x-), modified
    weights, denominator."""

    __slots__ = ("hook", "module", "cache", "signed_input", "forward_denominator")

    def __init__(self, hook: DirectRule, module: nn.Module) -> None:
        self.hook = hook
        self.module = module
        self.cache: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None
        self.signed_input = True
        #: z+'s denominator (not stabilised) built during the forward, until the cache takes it
        self.forward_denominator: torch.Tensor | None = None

    def denominator_from_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """z+'s denominator ``x+ * W+ + b+ + x- * W-`` from the module's output ``y = x * W + b``
        (``*``: the convolution), while both are at hand (:func:`denominators_in_forward`).

        By bilinearity ``x+ * W+ + x- * W- = (x * W + |x| * |W|) / 2``, so the denominator is
        ``(y + |x| * |W| + |b|) / 2``: one convolution, where the two branches take two. Rounding:
        it adds two sums whose signed parts cancel, so its relative error grows where the negative
        products outweigh the positive ones. Measured at the MiewID architecture's size in float32
        against float64: at most 3e-6 on ordinary convolutions (the two branches: 1e-6), but up to
        4e-3 on depthwise 3x3 ones (9 products per sum), which therefore keep their two branches
        (at the first backward). So do GPUs (cuDNN may run float32 convolutions in TF32, whose
        10-bit mantissa this cancellation would magnify) and half precisions. An input without
        negative values (checked on the CPU) gets the exact ``x * W+ + b+``.
        """
        module = self.module
        with torch.no_grad():
            x = x.detach()
            weight, bias = module.weight.detach(), module.bias
            bias = bias.detach() if bias is not None else None
            if x.device.type == "cpu":
                # recorded here for the backward, which would otherwise look again
                self.signed_input = bool(x.lt(0).any())
            if not self.signed_input:
                self.forward_denominator = module._conv_forward(
                    x, weight.clamp(min=0), bias.clamp(min=0) if bias is not None else None)
            elif module.groups == 1 and x.device.type == "cpu" and output.dtype in (torch.float32, torch.float64):
                # halving |W| and |b| is exact (a power of two)
                denominator = module._conv_forward(x.abs(), weight.abs().mul_(0.5),
                                                   bias.abs().mul_(0.5) if bias is not None else None)
                # >= 0 in exact arithmetic: a rounding below zero must not flip the stabiliser's sign
                self.forward_denominator = denominator.add_(output.detach(), alpha=0.5).clamp_(min=0)

    def _prepare(self, x: torch.Tensor):
        if self.hook.sign_split and isinstance(self.module, _DIRECT_CONVOLUTIONS):
            return self._prepare_zplus(x)
        rule, module = self.hook.rule, self.module
        inputs, weights, outputs = [], [], []
        for in_mod, param_mod, out_mod in zip(rule.input_modifiers, rule.param_modifiers, rule.output_modifiers):
            modified_input = in_mod(x)
            with ParamMod.ensure(param_mod)(module) as modified:
                weights.append(modified.weight.detach())
                outputs.append(out_mod(modified.forward(modified_input)))
            inputs.append(modified_input)
        # the rules' mapper: incoming relevance / stabiliser(sum of the modified outputs)
        return inputs, weights, self.hook.stabilize(sum(outputs))

    def _prepare_zplus(self, x: torch.Tensor):
        """zennit's z+ on a convolution: x+ = max(x, 0), x- = min(x, 0), W+ / W- likewise, and the
        denominator x+ * W+ + b+ + x- * W- (``*``: the convolution; the negative branch has no
        bias). An input without negative values (after a ReLU) needs only x * W+ + b+, exactly
        the two-branch sum (the other branch is an exact zero)."""
        module = self.module
        weight, bias = module.weight.detach(), module.bias
        weights = [weight.clamp(min=0), weight.clamp(max=0)]
        inputs = [x.clamp(min=0), x.clamp(max=0)]
        # whether x has negative values: checked on the CPU only (on a GPU, a synchronisation per
        # convolution costs more than the work it would skip; the product with x- = 0 adds zeros)
        if self.forward_denominator is None:
            self.signed_input = x.device.type != "cpu" or bool(inputs[1].any())
        else:  # the forward checked the sign (on the CPU; elsewhere signed_input stays True)
            denominator, self.forward_denominator = self.forward_denominator, None
            return inputs, weights, self._stabilize_non_negative(denominator)
        positive_bias = bias.detach().clamp(min=0) if bias is not None else None
        denominator = module._conv_forward(inputs[0], weights[0], positive_bias)
        if self.signed_input:
            denominator.add_(module._conv_forward(inputs[1], weights[1], None))
        return inputs, weights, self._stabilize_non_negative(denominator)

    def _stabilize_non_negative(self, denominator: torch.Tensor) -> torch.Tensor:
        """zennit's stabiliser on a denominator without negative values (z+): with a plain
        epsilon it adds epsilon to every entry (its sign is taken as +1 at zero), done here in
        place instead of through five temporary tensors of the denominator's size."""
        if self.hook.plain_epsilon is None:
            return self.hook.stabilize(denominator)
        return denominator.add_(self.hook.plain_epsilon)

    def relevance(self, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            with torch.no_grad():
                # z+ on an input without negative values (after a ReLU): x- is an exact zero and
                # so is the product of its branch, which is then skipped (here and in every backward)
                self.cache = self._prepare(x)
        inputs, weights, denominator = self.cache
        if (self.hook.sign_split and getattr(_REUSE, "windowed", False) and isinstance(self.module, nn.Conv2d)
                and relevance.device.type == "cpu"):  # on a GPU, finding the rectangle is a synchronisation
            windows = _relevance_windows(relevance)
            if windows is not None:
                return self._windowed_zplus(x, relevance, windows)
        scaled = relevance / denominator
        if self.hook.sign_split:  # the input gradient depends on the input's shape only
            positive = _input_gradient(self.module, scaled, x, weights[0]).mul_(inputs[0])
            if not self.signed_input:
                return positive
            return positive.addcmul_(inputs[1], _input_gradient(self.module, scaled, x, weights[1]))
        gradients = [_input_gradient(self.module, scaled, inp, weight) for inp, weight in zip(inputs, weights)]
        return self.hook.rule.reducer(inputs, gradients)

    def _windowed_zplus(self, x: torch.Tensor, relevance: torch.Tensor, windows: "_Windows") -> torch.Tensor:
        """z+ of a 2-D convolution computed on the part of the output that carries relevance.

        Relevance seeded at one feature cell is non-zero only inside that cell's receptive field
        (zeros stay exact zeros through every rule), so each image's non-zero output rectangle is
        cut out, padded to a common size and pushed back in one ``convolution_backward`` call
        without padding; each image's input rectangle is the part of that call's result inside
        the image. Every product and term of the full computation that is not an exact zero is
        computed; only their summation order may differ (rounding).
        """
        inputs, weights, denominator = self.cache
        module = self.module
        out_h, out_w = windows.height, windows.width
        (k_h, k_w), (s_h, s_w) = module.kernel_size, module.stride
        (p_h, p_w), (d_h, d_w) = module.padding, module.dilation
        in_h, in_w = (out_h - 1) * s_h + d_h * (k_h - 1) + 1, (out_w - 1) * s_w + d_w * (k_w - 1) + 1
        memory_format = (torch.channels_last if relevance.is_contiguous(memory_format=torch.channels_last)
                         and not relevance.is_contiguous() else torch.contiguous_format)
        n = len(windows.images)
        if n == 0:
            return torch.zeros_like(x)
        scaled = torch.empty((n, relevance.shape[1], out_h, out_w), dtype=relevance.dtype, device=relevance.device,
                             memory_format=memory_format).zero_()
        for i, (b, r0, r1, c0, c1) in enumerate(windows.boxes()):
            torch.div(relevance[b, :, r0:r1, c0:c1], denominator[b, :, r0:r1, c0:c1],
                      out=scaled[i, :, : r1 - r0, : c1 - c0])
        shape = (n, x.shape[1], in_h, in_w)
        virtual = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)  # its shape only
        gradients = [_window_input_gradient(module, scaled, virtual, weights[0])]
        if self.signed_input:
            gradients.append(_window_input_gradient(module, scaled, virtual, weights[1]))
        result = torch.zeros_like(x)
        height, width = x.shape[2], x.shape[3]
        for i, (b, r0, _, c0, _) in enumerate(windows.boxes()):
            top, left = r0 * s_h - p_h, c0 * s_w - p_w  # input position of the window's corner
            y0, y1 = max(0, top), min(height, top + in_h)
            x0, x1 = max(0, left), min(width, left + in_w)
            if y0 >= y1 or x0 >= x1:
                continue
            rows, cols = slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)
            target = result[b, :, y0:y1, x0:x1]
            torch.mul(gradients[0][i, :, rows, cols], inputs[0][b, :, y0:y1, x0:x1], out=target)
            if self.signed_input:
                target.addcmul_(inputs[1][b, :, y0:y1, x0:x1], gradients[1][i, :, rows, cols])
        return result


class _Windows:
    """Per image of a batch, the rectangle of non-zero relevance, and one common size."""

    __slots__ = ("images", "rows", "cols", "height", "width")

    def __init__(self, images: list[int], rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> None:
        self.images, self.rows, self.cols = images, rows, cols
        self.height = max((r1 - r0 for r0, r1 in rows), default=0)
        self.width = max((c1 - c0 for c0, c1 in cols), default=0)

    def area(self) -> int:
        """Cells inside the images' own rectangles (not padded to the common size)."""
        return sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in zip(self.rows, self.cols))

    def boxes(self) -> Iterator[tuple[int, int, int, int, int]]:
        """``(image, row_start, row_stop, col_start, col_stop)`` per image with relevance."""
        for b, (r0, r1), (c0, c1) in zip(self.images, self.rows, self.cols):
            yield b, r0, r1, c0, c1


#: windowed z+ is used when the padded rectangles cover at most this share of the output (measured at
#: MiewID size on the CPU: 0.75, 0.9 and 1.0 within noise of each other, 0.5 left the heavy layers out)
WINDOW_MAX_SHARE = 0.9


def relevance_boxes(relevance: torch.Tensor) -> _Windows:
    """Per image of ``(B, C, H, W)``, the bounding box of its non-zero cells (images without any
    are left out)."""
    batch = relevance.shape[0]
    # (B, H, W): a cell is non-zero where its largest or its smallest channel is (NaN included); two
    # vectorised reductions, 8-15x faster on this CPU than a mask of the whole tensor reduced with any()
    nonzero = relevance.amax(dim=1).ne(0) | relevance.amin(dim=1).ne(0)
    row_any = nonzero.any(dim=2).cpu().numpy()
    col_any = nonzero.any(dim=1).cpu().numpy()
    images, rows, cols = [], [], []
    for b in range(batch):
        r = row_any[b].nonzero()[0]
        if len(r) == 0:
            continue
        c = col_any[b].nonzero()[0]
        images.append(b)
        rows.append((int(r[0]), int(r[-1]) + 1))
        cols.append((int(c[0]), int(c[-1]) + 1))
    return _Windows(images, rows, cols)


def _relevance_windows(relevance: torch.Tensor) -> _Windows | None:
    """The rectangles of non-zero relevance ``(B, C, H, W)``, or None when they would not pay."""
    batch, _, height, width = relevance.shape
    if height * width < 4:
        return None
    windows = relevance_boxes(relevance)
    if len(windows.images) * windows.height * windows.width > WINDOW_MAX_SHARE * batch * height * width:
        return None
    return windows


def _window_input_gradient(module: nn.Module, grad_output: torch.Tensor, virtual_input: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of a 2-D convolution without padding on a window (``virtual_input``: its shape)."""
    (grad_input, _, _) = torch.ops.aten.convolution_backward(
        grad_output, virtual_input, weight, None, module.stride, [0, 0], module.dilation,
        False, [0, 0], module.groups, [True, False, False],
    )
    return grad_input


def _input_gradient(module: nn.Module, grad_output: torch.Tensor, x: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """Gradient of ``module``'s forward with ``weight`` with respect to its input ``x``."""
    if isinstance(module, nn.Linear):
        return grad_output.matmul(weight)
    dims = x.ndim - 2
    (grad_input, _, _) = torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, module.stride, module.padding, module.dilation,
        False, [0] * dims, module.groups, [True, False, False],
    )
    return grad_input


def state_lives_with_graph(composite: LayerMapComposite) -> bool:
    """Whether every rule ``composite`` has attached keeps its per-forward state in that forward's
    graph (the direct rules), so that several forwards may be built before their backwards run.

    zennit's hooks (:class:`ReusableNorm`, :class:`ReusableZPlus`, ...) keep the last forward's
    input on the hook object: a second forward replaces it. Call inside ``composite.context(model)``.
    """
    return all(isinstance(hook, (DirectRule, DirectPass)) for hook in composite.hook_refs)


# ------------------------------------------------------------------------ composites
class EngineEpsilonPlus(LayerMapComposite):
    """zennit's ``EpsilonPlus`` (z+ on convolutions, epsilon on linear layers, pass-through on
    activations and batch norms, norm on sums and average pools), computed directly where the
    module allows it (module docstring)."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonizers=None):
        direct_base = {Pass: DirectPass(), Norm: ReusableNorm(stabilizer=stabilizer)}
        layer_map = []
        for types, rule in layer_map_base(stabilizer):
            if type(rule) not in direct_base:
                raise TypeError(f"unexpected rule {type(rule).__name__} in zennit's base layer map")
            layer_map.append((types, direct_base[type(rule)]))
        layer_map += [
            (Convolution, DirectRule(ZPlus(stabilizer=stabilizer), stabilizer, ReusableZPlus(stabilizer=stabilizer))),
            (nn.Linear, DirectRule(Epsilon(epsilon=epsilon), epsilon, ReusableEpsilon(epsilon=epsilon))),
        ]
        super().__init__(layer_map=layer_map, canonizers=canonizers)

    def mapping(self, ctx, name, module):
        hook = super().mapping(ctx, name, module)
        if isinstance(hook, DirectRule) and not hook.supports(module):
            return hook.fallback
        return hook


class HookedEpsilonPlus(LayerMapComposite):
    """The same composite on zennit's hooks only (reusable modified forwards): the previous engine
    path, kept as a yardstick for speed and numbers."""

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
