"""Make models LRP-ready: canonizers chosen by the module types found anywhere in a model.

The default treatment reproduces what the published PAIR-X code effectively applies
(the PAIR-X computation, step 2: relevance under zennit's ``EpsilonPlus``):

- timm EfficientNet / EfficientNetV2 (MiewID): only the squeeze-and-excitation product is
  rewritten (relevance goes to the signal unchanged, nothing to the gate). Fused batch norms and
  residual additions are left alone. ``strict=True`` additionally merges batch norms (fused
  ``BatchNormAct2d`` included) into the preceding convolution and splits residual additions in
  proportion to the branch contributions.
- torchvision EfficientNet: batch norms merged, the same SE rewrite, residual additions split.
- torchvision ResNet: zennit's own ResNet canonizer; timm ResNet: the same treatment.

Batch-norm merges zero the norm's ``eps`` while merged, so canonized and original models compute
the same embeddings (zennit's merge alone drifts by ``1/sqrt(1+eps)`` per norm).
- plain conv / batch-norm stacks: batch norms merged when they directly follow a conv.

Modules of types we do not know are read (:func:`check_supported`): those that transform a single
activation (GeM pooling, flatten, custom activations) run by their gradient, as in the published
method, with one :class:`UnknownModuleWarning`; those that combine two activations (gate products,
residual sums, attention) raise :class:`UnsupportedModelError`, unless the caller brings its own
canonizers.
"""

from __future__ import annotations

import types
import warnings
from typing import Iterator

import torch
from torch import nn
from zennit.canonizers import (AttributeCanonizer, Canonizer, CompositeCanonizer, MergeBatchNorm,
                               SequentialMergeBatchNorm)
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Activation

from .errors import UnsupportedModelError
from .forward_analysis import ForwardFinding, ForwardNotReadable, analyse_autograd, analyse_fx
from .forward_trace import forward_trace, model_memo

__all__ = [
    "UnknownModuleWarning",
    "check_supported",
    "register_safe_module",
    "select_canonizers",
    "signal_pass_product",
]


class _SignalPassProduct(torch.autograd.Function):
    """``signal * gate`` whose backward hands the incoming quantity to ``signal`` unchanged."""

    @staticmethod
    def forward(ctx, signal: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return signal * gate

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def signal_pass_product(signal: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated product with the published SE backward: relevance to ``signal``, none to ``gate``.

    The gate is detached so that no backward pass ever enters the squeeze branch (it would only
    carry zeros there, and zennit's rules cannot take an empty upstream gradient).
    """
    return _SignalPassProduct.apply(signal, gate.detach())


# --------------------------------------------------------------------------- known module types
def _timm_types() -> dict[str, tuple[type, ...]]:
    try:
        from timm.layers import BatchNormAct2d, SelectAdaptivePool2d
        from timm.layers.drop import DropPath
        from timm.models import _efficientnet_blocks as eb
        from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the core importable
        return {}
    blocks = tuple(
        getattr(eb, name)
        for name in ("DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "ConvBnAct", "CondConvResidual")
        if hasattr(eb, name)
    )
    return {
        "se": (eb.SqueezeExcite,),
        "eff_blocks": blocks,
        "eff_models": (EfficientNet, EfficientNetFeatures),
        "resnet_blocks": (BasicBlock, Bottleneck),
        "resnet_models": (ResNet,),
        "misc": (BatchNormAct2d, SelectAdaptivePool2d, DropPath),
    }


def _torchvision_types() -> dict[str, tuple[type, ...]]:
    from torchvision.models.efficientnet import EfficientNet, FusedMBConv, MBConv
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation
    from torchvision.ops.stochastic_depth import StochasticDepth

    return {
        "se": (SqueezeExcitation,),
        "eff_blocks": (MBConv, FusedMBConv),
        "eff_models": (EfficientNet,),
        "resnet_blocks": (BasicBlock, Bottleneck),
        "resnet_models": (ResNet,),
        "misc": (Conv2dNormActivation, StochasticDepth),
    }


# Modules whose forward is a plain composition of children or an elementwise/linear op that the
# EpsilonPlus composite handles (or that carries no relevance-changing interaction).
_GENERIC_SAFE: tuple[type, ...] = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.MaxPool2d,
)
#: safe types that compute an elementwise function of their one input (or pass it on)
_POINTWISE_SAFE: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_extra_safe_types: list[type] = []


class UnknownModuleWarning(UserWarning):
    """Modules of unknown type run without an LRP rule: relevance passes through by their gradient.

    Attributes:
        modules: ``{module name: type name}`` of those modules.
    """

    def __init__(self, message: str, modules: dict[str, str] | None = None):
        super().__init__(message)
        self.modules = dict(modules or {})


def register_safe_module(module_type: type) -> type:
    """Declare a module type LRP-ready as it is; it is then neither analysed nor warned about.

    Usable as a class decorator. Not needed for modules that transform one activation on their
    own (pooling such as GeM, flatten, a custom activation): those are recognised by reading their
    forward and run by their gradient, as the published method runs them. Use it to override the
    check for a module that combines two activations when plain gradient treatment is what you
    want (relevance then follows the gradient of the product or sum).
    """
    _extra_safe_types.append(module_type)
    return module_type


def _is_generic_safe(module: nn.Module) -> bool:
    if isinstance(module, tuple(_extra_safe_types)):
        return True
    if isinstance(module, Activation) and not isinstance(module, nn.MultiheadAttention):
        return True  # zennit's activation set includes attention, which combines activations
    for base in _GENERIC_SAFE:
        if isinstance(module, base):
            return type(module).forward is base.forward  # a subclass with its own forward is read
    return False


def _is_pointwise_safe(module: nn.Module) -> bool:
    return (isinstance(module, Activation) and not isinstance(module, nn.MultiheadAttention)) or (
        isinstance(module, _POINTWISE_SAFE) and _is_generic_safe(module)
    )


def _known_types() -> tuple[type, ...]:
    timm_t = _timm_types()
    tv_t = _torchvision_types()
    return tuple(t for group in (timm_t, tv_t) for types_ in group.values() for t in types_)


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def check_supported(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, str]:
    """Check that every module can be explained as it is or by the built-in canonizers.

    Modules of types the canonizers know (timm and torchvision EfficientNet/ResNet parts), plain
    layers and zennit's activations pass. Every other module's forward is read (a ``torch.fx``
    trace with its children opaque; if the forward cannot be traced, a run of that module alone on
    its inputs in the model's forward trace at ``example_input``'s size, and a look at the
    autograd graph):

    - a forward that transforms a single activation (GeM pooling, also with a learnable
      exponent; flatten; a custom activation; a composition of children) passes: relevance goes
      through its own computation by the gradient, as in the published method. All such
      modules are named in ONE :class:`UnknownModuleWarning` per model;
    - a forward that combines two activations (a gate product, a residual sum, attention) is
      refused with :class:`UnsupportedModelError` naming the module and the operation.

    Results are remembered per model object until its modules change (the warning is given once
    per model).

    Args:
        model: the embedding model.
        example_input: one preprocessed image ``(1, 3, H, W)``; only needed when a forward cannot
            be traced symbolically.

    Returns:
        ``{module name: type name}`` of the unknown modules passed by their gradient.

    Raises:
        UnsupportedModelError: the first refused module (in ``named_modules`` order).
    """
    memo = model_memo(model)  # (verdict, {module name: type} run by gradient, or the refusal's arguments)
    cached = memo.get("canonizers")
    if cached is not None:
        if cached[0] == "refused":
            raise UnsupportedModelError(*cached[1])
        return dict(cached[1])

    modules = list(model.named_modules())
    findings = _read_forwards(model, modules, example_input)
    by_name = dict(modules)
    refused = [(name, findings[name]) for name, _ in modules if name in findings and findings[name].combination]
    if refused:
        (name, finding), *others = refused
        hint = "; ".join(f"also {f.combination} in {n!r} ({type(by_name[n]).__qualname__})" for n, f in others[:4])
        arguments = (_type_name(by_name[name]), name, hint, finding.combination)
        memo["canonizers"] = ("refused", arguments)
        raise UnsupportedModelError(*arguments)

    passed = {
        name: type(by_name[name]).__qualname__ for name, _ in modules if name in findings and findings[name].computes
    }
    memo["canonizers"] = ("passed", passed)
    if passed:
        _warn_run_by_gradient(passed)
    return passed


def _read_forwards(
    model: nn.Module, modules: list[tuple[str, nn.Module]], example_input: torch.Tensor | None
) -> dict[str, ForwardFinding]:
    """What the forward of every module of unknown type does, by name (fx first, then by running)."""
    known = _known_types()
    if not any(True for _ in model.children()) and not _is_generic_safe(model) and not isinstance(model, known):
        raise UnsupportedModelError(_type_name(model), "", "the model has no submodules")
    findings: dict[str, ForwardFinding] = {}
    pointwise: set[int] = set()  # ids of modules that act elementwise on their one input
    unreadable: dict[str, str] = {}  # name -> why fx failed
    for name, module in reversed(modules):  # children before their parents
        if _is_generic_safe(module) or isinstance(module, known):
            if _is_pointwise_safe(module):
                pointwise.add(id(module))
            continue
        children = [child_name for child_name, child in module.named_children() if id(child) in pointwise]
        try:
            findings[name] = analyse_fx(module, children)
        except ForwardNotReadable as error:
            unreadable[name] = str(error)
            continue
        if findings[name].pointwise:
            pointwise.add(id(module))
    if unreadable:
        findings.update(_read_by_running(model, modules, unreadable, pointwise, example_input))
    return findings


def _warn_run_by_gradient(passed: dict[str, str]) -> None:
    """One :class:`UnknownModuleWarning` naming the modules relevance passes by their gradient."""
    listed = ", ".join(f"{type_name} ({name!r})" for name, type_name in list(passed.items())[:8])
    more = f" and {len(passed) - 8} more" if len(passed) > 8 else ""
    warnings.warn(
        UnknownModuleWarning(
            f"no LRP rule for {listed}{more}: each transforms a single activation, so relevance "
            "passes through it by its gradient, as in the published PAIR-X method (declare a type "
            "with pairx_core.canonizers.register_safe_module to silence this)",
            passed,
        ),
        stacklevel=4,
    )


def _read_by_running(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    unreadable: dict[str, str],
    pointwise: set[int],
    example_input: torch.Tensor | None,
) -> dict[str, ForwardFinding]:
    """Read the forwards fx could not trace by running each alone on its inputs in the model's
    forward trace at the size of ``example_input`` (only its shape is used)."""
    by_name = dict(modules)
    if example_input is None:
        name, reason = next(iter(unreadable.items()))
        raise UnsupportedModelError(
            _type_name(by_name[name]), name,
            f"its forward cannot be traced symbolically ({reason}) and no example input was given to run it",
        )
    trace = forward_trace(model, tuple(example_input.shape[-2:]))
    findings: dict[str, ForwardFinding] = {}
    for name, reason in unreadable.items():
        record = trace.module(name)
        if record is None or not record.calls:
            continue  # never executed: it cannot influence the embedding
        module = by_name[name]
        captured = trace.first_inputs(name)
        if captured is None:
            raise UnsupportedModelError(
                _type_name(module), name,
                f"its forward cannot be traced symbolically ({reason}) and, as a library type, it has no kept inputs",
            )
        children = [child_name for child_name, child in module.named_children() if id(child) in pointwise]
        args, kwargs = captured
        was_training = module.training
        try:
            module.eval()
            findings[name] = analyse_autograd(module, args, kwargs, children)
        except ForwardNotReadable as error:
            raise UnsupportedModelError(
                _type_name(module), name, f"its forward can neither be traced ({reason}) nor run alone ({error})"
            ) from error
        finally:
            module.train(was_training)
    return findings


# ------------------------------------------------------------------------------ the canonizers
class _FixedMapCanonizer(AttributeCanonizer):
    """An attribute canonizer whose map takes no settings: subclasses define ``_attribute_map``."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name: str, module: nn.Module) -> dict | None:
        raise NotImplementedError

    def copy(self) -> "_FixedMapCanonizer":
        return type(self)()


class _SqueezeExciteCanonizer(_FixedMapCanonizer):
    """Rewrites the SE product of timm and torchvision blocks (published PAIR-X behaviour)."""

    @staticmethod
    def _attribute_map(name: str, module: nn.Module) -> dict | None:
        timm_se = _timm_types().get("se", ())
        tv_se = _torchvision_types()["se"]
        if timm_se and isinstance(module, timm_se):
            return {"forward": types.MethodType(_timm_se_forward, module)}
        if isinstance(module, tv_se):
            return {"forward": types.MethodType(_torchvision_se_forward, module)}
        return None


def _timm_se_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    squeezed = x.mean((2, 3), keepdim=True)
    squeezed = self.conv_expand(self.act1(self.conv_reduce(squeezed)))
    return signal_pass_product(x, self.gate(squeezed))


def _torchvision_se_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return signal_pass_product(x, self._scale(x))


class _ResidualSplitCanonizer(AttributeCanonizer):
    """Routes residual additions through ``zennit.layer.Sum`` so relevance splits by contribution.

    Works for blocks whose forward adds the input back when a flag is set: timm EfficientNet
    blocks (``has_skip``) and torchvision ``MBConv``/``FusedMBConv`` (``use_res_connect``): the
    flag is switched off on the instance and the addition is done by ``Sum`` instead.
    """

    def __init__(self, block_types: tuple[type, ...], flag: str, drop_attr: str) -> None:
        self.block_types = block_types
        self.flag = flag
        self.drop_attr = drop_attr
        super().__init__(self._attribute_map)

    def _attribute_map(self, name: str, module: nn.Module) -> dict | None:
        if not isinstance(module, self.block_types) or not getattr(module, self.flag, False):
            return None
        original_forward = type(module).forward
        drop_attr = self.drop_attr

        def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            branch = getattr(block, drop_attr)(original_forward(block, x))
            return block.canonizer_sum(torch.stack([branch, x], dim=-1))

        return {
            self.flag: False,
            "forward": types.MethodType(forward, module),
            "canonizer_sum": Sum(),
        }

    def register(self, module: nn.Module, attributes: dict) -> None:
        self._original_flag = getattr(module, self.flag)
        super().register(module, attributes)

    def remove(self) -> None:
        # the flag is an instance attribute set in __init__: deleting it would lose it
        super().remove()
        setattr(self.module, self.flag, self._original_flag)

    def copy(self) -> "_ResidualSplitCanonizer":
        return _ResidualSplitCanonizer(self.block_types, self.flag, self.drop_attr)


class _TimmResNetBlockCanonizer(_FixedMapCanonizer):
    """Explicit residual split for timm ``BasicBlock``/``Bottleneck`` (their forward adds in place)."""

    @staticmethod
    def _attribute_map(name: str, module: nn.Module) -> dict | None:
        blocks = _timm_types().get("resnet_blocks", ())
        if not blocks or not isinstance(module, blocks):
            return None
        basic = isinstance(module, blocks[0])
        return {
            "forward": types.MethodType(_timm_basic_forward if basic else _timm_bottleneck_forward, module),
            "canonizer_sum": Sum(),
        }


def _timm_block_tail(block: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, last_act: nn.Module) -> torch.Tensor:
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return last_act(block.canonizer_sum(torch.stack([x, shortcut], dim=-1)))


def _timm_basic_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    out = self.bn2(self.conv2(out))
    return _timm_block_tail(self, out, x, self.act2)


def _timm_bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
    out = self.bn3(self.conv3(out))
    return _timm_block_tail(self, out, x, self.act3)


class _ExactEpsMixin:
    """Also zero the batch norm's ``eps`` while merged (restored on removal).

    zennit's merge leaves ``eps`` in place, so the merged network computes ``x / sqrt(1 + eps)``
    at every former batch norm: about 1e-4 relative drift of the embedding over 20 norms. With
    ``eps = 0`` the canonized model computes the same function as the original.
    """

    def register(self, linears, batch_norm):
        self._saved_eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self._saved_eps


class _ExactSequentialMergeBatchNorm(_ExactEpsMixin, SequentialMergeBatchNorm):
    def copy(self):
        return _ExactSequentialMergeBatchNorm()


def _resnet_canonizer() -> Canonizer:
    """zennit's torchvision ResNet canonizer, with the exact batch-norm merge."""
    return CompositeCanonizer(
        (_ExactSequentialMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer())
    )


class _AtomicMergeBatchNorm(_ExactEpsMixin, MergeBatchNorm):
    """Merge every batch norm that directly follows a convolution in registration order.

    Unlike zennit's ``SequentialMergeBatchNorm`` it treats a batch norm with children (timm's
    fused ``BatchNormAct2d``, which holds its activation as a child) as one unit, so the fused
    norms of timm blocks are merged too; the activation inside keeps working.
    """

    def apply(self, root_module: nn.Module) -> list["_AtomicMergeBatchNorm"]:
        instances = []
        previous = None
        for unit in _atomic_units(root_module):
            if isinstance(previous, self.linear_type) and isinstance(unit, self.batch_norm_type):
                instance = self.copy()
                instance.register((previous,), unit)
                instances.append(instance)
            previous = unit
        return instances

    def copy(self) -> "_AtomicMergeBatchNorm":
        return _AtomicMergeBatchNorm()


def _atomic_units(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) or not any(True for _ in child.children()):
            yield child
        else:
            yield from _atomic_units(child)


def select_canonizers(
    model: nn.Module, *, strict: bool = False, example_input: torch.Tensor | None = None
) -> list[Canonizer]:
    """Choose canonizers from the module types present anywhere in ``model``.

    Args:
        model: the embedding model (any ``nn.Module``).
        strict: for timm EfficientNet blocks, also merge fused batch norms and split residual
            additions (off by default, so that numbers match the published method).
        example_input: one preprocessed image, used only to read a module's forward that
            ``torch.fx`` cannot trace (see :func:`check_supported`).

    Raises:
        UnsupportedModelError: a module combines two activations in a way no canonizer handles.
    """
    check_supported(model, example_input)
    timm_t = _timm_types()
    tv_t = _torchvision_types()

    def present(*type_groups: tuple[type, ...]) -> bool:
        wanted = tuple(t for group in type_groups for t in group)
        return bool(wanted) and any(isinstance(m, wanted) for m in model.modules())

    canonizers: list[Canonizer] = []
    has_timm_eff = present(timm_t.get("eff_blocks", ()), timm_t.get("se", ()))
    has_tv_eff = present(tv_t["eff_blocks"], tv_t["se"])
    has_tv_resnet = present(tv_t["resnet_blocks"])
    has_timm_resnet = present(timm_t.get("resnet_blocks", ()))

    if has_tv_resnet:
        canonizers.append(_resnet_canonizer())
    if has_timm_resnet:
        canonizers.append(_TimmResNetBlockCanonizer())
    if has_timm_eff or has_tv_eff:
        canonizers.append(_SqueezeExciteCanonizer())
    if has_tv_eff:
        canonizers.append(_ResidualSplitCanonizer(tv_t["eff_blocks"], "use_res_connect", "stochastic_depth"))
    if has_timm_eff and strict:
        canonizers.append(_ResidualSplitCanonizer(timm_t["eff_blocks"], "has_skip", "drop_path"))

    # Batch-norm merging: plain BN leaves right after a conv everywhere (torchvision, timm ResNet,
    # plain stacks); timm's fused norms only in strict mode (the published code merges none).
    if has_tv_resnet:
        pass  # ResNetCanonizer already merges
    elif strict and has_timm_eff:
        canonizers.append(_AtomicMergeBatchNorm())
    else:
        canonizers.append(_ExactSequentialMergeBatchNorm())
    return canonizers

