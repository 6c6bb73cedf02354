"""Which layers of a model PAIR-X can explain: defaults per family, listing, and checks.

A layer is usable when its output is a feature map ``(B, C, h, w)`` and it is a *cut* of the
network: every path from the input image to the embedding passes through that output (a block or
stage of a CNN backbone; not a convolution inside a residual block, which the skip bypasses). The
engine relies on that to stop the relevance backward at the layer.

:func:`list_layers` reads the cuts from the model's forward trace (:mod:`.forward_trace`, one
forward pass shared with the other planners): a module's output is a cut exactly when its
autograd node dominates the input, i.e. lies on every path from the embedding back to the input.

Default layers (:func:`default_layer`):

- a model may declare its own: a string attribute ``pairx_default_layer`` on the model (a
  ``python:`` factory sets it on the model it returns; the zoo's ``demo`` model does);
- timm EfficientNet / EfficientNetV2 (MiewID): ``<prefix>.blocks.3`` (the first stride-16 stage;
  152 x 28 x 28 for MiewID at 440 px);
- timm or torchvision ResNet: ``<prefix>.layer3``;
- torchvision EfficientNet: ``<prefix>.features.4`` (the stage matching timm's ``blocks.3``);
- anything else, when the input size is given: the shallowest-named, earliest cut whose output
  stride is closest to 16.

``<prefix>`` is wherever the backbone sits (``backbone`` in the zoo's MiewID-style models,
``network`` in its torchvision wrapper, any attribute name in a user's own model).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from .errors import LayerError
from .forward_trace import forward_trace

__all__ = [
    "DEFAULT_LAYER_ATTRIBUTE",
    "LayerInfo",
    "check_layer_names",
    "check_layers",
    "default_layer",
    "default_layer_for_spec",
    "list_layers",
    "suggest_layers",
]

#: attribute a model may carry to declare its default layer
DEFAULT_LAYER_ATTRIBUTE = "pairx_default_layer"
#: output stride of the default layer when the family is not known
_FALLBACK_STRIDE = 16


@dataclass(frozen=True)
class LayerInfo:
    """A usable layer.

    Attributes:
        name: ``model.get_submodule`` name.
        shape: feature-map shape ``(C, h, w)`` at the input size it was listed for.
        module_type: the module's class name.
        is_default: the model's default layer.
        stride: input height / ``h`` (the feature map's output stride).
    """

    name: str
    shape: tuple[int, int, int]
    module_type: str
    is_default: bool = False
    stride: float = 1.0

    @property
    def depth(self) -> int:
        """Nesting depth of the name (``backbone.blocks.3`` -> 3)."""
        return self.name.count(".") + 1


# -------------------------------------------------------------------------------------- defaults
def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if prefix else rest


def _family_default(model: nn.Module) -> str | None:
    """Default layer from the backbone family found anywhere in ``model`` (first match wins)."""
    timm_eff: tuple[type, ...] = ()
    timm_resnet: tuple[type, ...] = ()
    try:
        from timm.models.efficientnet import EfficientNet as TimmEfficientNet
        from timm.models.efficientnet import EfficientNetFeatures
        from timm.models.resnet import ResNet as TimmResNet

        timm_eff, timm_resnet = (TimmEfficientNet, EfficientNetFeatures), (TimmResNet,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    from torchvision.models.efficientnet import EfficientNet as TvEfficientNet
    from torchvision.models.resnet import ResNet as TvResNet

    for prefix, module in model.named_modules():
        if timm_eff and isinstance(module, timm_eff) and len(module.blocks) > 0:
            return _join(prefix, f"blocks.{min(3, len(module.blocks) - 1)}")
        if isinstance(module, timm_resnet + (TvResNet,)) and hasattr(module, "layer3"):
            return _join(prefix, "layer3")
        if isinstance(module, TvEfficientNet) and len(module.features) > 2:
            return _join(prefix, f"features.{min(4, len(module.features) - 2)}")
    return None


def default_layer(model: nn.Module, input_size: tuple[int, int] | None = None) -> str:
    """The layer explained when none is chosen (see the module docstring for the rules).

    Args:
        model: the embedding model.
        input_size: ``(H, W)`` the model runs at; only used for models of unknown family.

    Raises:
        LayerError: a declared default does not exist, or the family is unknown and no input
            size was given (or the model has no usable layer).
    """
    declared = getattr(model, DEFAULT_LAYER_ATTRIBUTE, None)
    if declared is not None:
        if not isinstance(declared, str) or not _has_submodule(model, declared):
            raise LayerError(str(declared), f"declared as the model's {DEFAULT_LAYER_ATTRIBUTE} but not a submodule",
                             suggest_layers(str(declared), _module_names(model)))
        return declared
    family = _family_default(model)
    if family is not None:
        return family
    if input_size is None:
        raise LayerError("", f"no default layer is known for {type(model).__name__}; choose one (list_layers "
                             f"shows the usable ones) or set {DEFAULT_LAYER_ATTRIBUTE} on the model")
    return _stride_default(_scan(model, input_size))


def _stride_default(layers: Sequence[LayerInfo]) -> str:
    if not layers:
        raise LayerError("", "the model has no layer whose output is a feature map on every path to the embedding")
    return min(
        enumerate(layers),
        key=lambda item: (round(abs(math.log2(max(item[1].stride, 1e-9)) - math.log2(_FALLBACK_STRIDE)), 3),
                          item[1].depth, item[0]),
    )[1].name


def default_layer_for_spec(spec: str) -> str | None:
    """The default layer of a zoo model spec, decided without building the model.

    Returns ``None`` when it cannot be known without building (``python:`` factories, timm or
    torchvision families other than EfficientNet/ResNet): build it and call :func:`default_layer`.
    """
    from .specs import ModelSpec, demo_default_layer

    parsed = ModelSpec.parse(spec)
    if parsed.kind in ("miewid", "miewid-arch"):
        return "backbone.blocks.3"
    if parsed.kind == "demo":
        return demo_default_layer()
    if parsed.kind == "timm" and parsed.name:
        try:
            import timm.models

            family = timm.models.model_entrypoint(parsed.name).__module__
        except (ImportError, RuntimeError):
            return None
        return {"timm.models.efficientnet": "backbone.blocks.3", "timm.models.resnet": "backbone.layer3"}.get(family)
    if parsed.kind == "torchvision":
        name = parsed.name.lower()
        if name.startswith(("resnet", "resnext", "wide_resnet")):
            return "network.layer3"
        if name.startswith("efficientnet"):
            return "network.features.4"
    return None


# --------------------------------------------------------------------------------------- listing
def list_layers(model: nn.Module, input_size: tuple[int, int], *, include_leaves: bool = True) -> list[LayerInfo]:
    """Usable layers of ``model`` at ``input_size`` ``(H, W)``, in forward order, default marked.

    Read from the model's forward trace at ``input_size`` (one forward pass of a random image,
    shared with the other planners); the model's mode, parameters and buffers are unchanged.

    Args:
        include_leaves: also list leaf modules (convolutions, norms, activations) that are cuts;
            ``False`` keeps blocks and stages only (what one usually wants to read).
    """
    layers = _scan(model, input_size)
    try:
        default = default_layer(model) if _family_default(model) or hasattr(model, DEFAULT_LAYER_ATTRIBUTE) \
            else _stride_default(layers)
    except LayerError:
        default = None
    if not include_leaves:
        leaves = {name for name, module in model.named_modules() if not any(True for _ in module.children())}
        layers = [info for info in layers if info.name not in leaves or info.name == default]
    return [
        LayerInfo(info.name, info.shape, info.module_type, info.name == default, info.stride) for info in layers
    ]


def _scan(model: nn.Module, input_size: tuple[int, int]) -> list[LayerInfo]:
    """All cuts with a 4-D output, in forward order (``is_default`` not set), from the forward trace."""
    trace = forward_trace(model, input_size)
    height = trace.input_size[0]
    layers = []
    for record in trace.ran:
        if not record.is_cut:
            continue
        _, channels, h, w = record.output_shape
        layers.append(LayerInfo(record.name, (int(channels), int(h), int(w)), record.module_type,
                                stride=height / max(int(h), 1)))
    return layers


# --------------------------------------------------------------------------------------- checks
def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def suggest_layers(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` candidates closest to ``name`` (difflib ratio), best first."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if close:
        return close
    # fall back on shared trailing components (``blocks.3`` for ``backbone.blocks.3`` typed short)
    tail = name.rsplit(".", 1)[-1]
    return [c for c in candidates if c.endswith("." + tail) or c == tail][:n]


def check_layer_names(model: nn.Module, names: Sequence[str]) -> None:
    """Cheap check (no forward): every name is a submodule; else :class:`LayerError` with suggestions.

    The error keeps the words "has no submodule" so callers matching the engine's old message
    still match.
    """
    for name in names:
        if not isinstance(name, str) or not name or not _has_submodule(model, name):
            raise LayerError(str(name), "the model has no submodule of that name",
                             suggest_layers(str(name), _module_names(model)))


def check_layers(model: nn.Module, names: Sequence[str], input_size: tuple[int, int]) -> None:
    """Check that every name is a usable layer at ``input_size``; fail fast with suggestions.

    Raises:
        LayerError: naming the first bad layer, why, and the nearest usable layers.
    """
    names = list(names)
    if not names:
        raise LayerError("", "at least one layer is required")
    usable = _scan(model, input_size)
    usable_names = [info.name for info in usable]
    for name in names:
        if name in usable_names:
            continue
        if not isinstance(name, str) or not name or not _has_submodule(model, name):
            reason = "the model has no submodule of that name"
        else:
            reason = _why_unusable(model, name, input_size)
        suggestions = suggest_layers(str(name), usable_names)
        if not suggestions:
            try:
                suggestions = [default_layer(model, input_size)]
            except LayerError:
                suggestions = usable_names[:3]
        raise LayerError(str(name), reason, suggestions)


def _why_unusable(model: nn.Module, name: str, input_size: tuple[int, int]) -> str:
    """Why the submodule ``name`` is not a usable layer, read from the forward trace."""
    record = forward_trace(model, input_size).module(name)
    if record is None or not record.calls:
        return "the model's forward never runs it"
    if record.calls > 1:
        return f"it runs {record.calls} times per forward"
    if record.returns_input:
        return "it returns its input unchanged (an identity); choose the module before or after it"
    if record.changed_in_place:
        return ("its output is changed in place afterwards (e.g. by an in-place activation); choose the "
                "module that contains that step")
    if not record.is_feature_map:
        shape = record.output_shape if record.output_shape is not None else record.output_kind
        return f"its output is {shape}, not a (B, C, h, w) feature map"
    return ("a path from input to embedding bypasses it (e.g. a module inside a residual block); "
            "choose a block or stage output")
