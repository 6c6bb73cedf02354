"""Which layers of a model PAIR-X can explain: defaults per family, listing, and checks.

A layer is usable when its output is a feature map ``(B, C, h, w)`` and it is a *cut* of the
network: every path from the input image to the embedding passes through that output (a block or
stage of a CNN backbone; not a convolution inside a residual block, which the skip bypasses). The
engine relies on that to stop the relevance backward at the layer.

:func:`list_layers` finds all cuts with ONE forward pass: it records the autograd graph and the
graph node that produced each module's output, then computes the dominators of the input in that
graph (Cooper, Harvey and Kennedy's iterative algorithm). A module's output is a cut exactly when
its node dominates the input, i.e. lies on every path from the embedding back to the input.

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
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import LayerError
from .runtime_settings import denormals_flushed

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

    One forward pass of a random image ``(1, 3, H, W)`` (model's dtype and device) with gradient
    recording; the model's mode, parameters and buffers are unchanged afterwards.

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


@dataclass
class _Record:
    module: nn.Module
    calls: int = 0
    node: Any = None
    shape: tuple[int, ...] = ()
    passes_input_on: bool = False
    tensor: Any = None
    version: int = 0


def _scan(model: nn.Module, input_size: tuple[int, int]) -> list[LayerInfo]:
    """All cuts with a 4-D output, in forward order (``is_default`` not set)."""
    height, width = int(input_size[0]), int(input_size[1])
    if height < 1 or width < 1:
        raise LayerError("", f"input size must be positive, got {input_size}")
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 3, height, width, generator=generator, dtype=dtype).to(device)
    with denormals_flushed(device):  # as the engine does: random weights make denormals
        records, order, x, output = _record_forward(model, probe)
    if isinstance(output, torch.Tensor):
        outputs = [output]
    else:
        outputs = [t for t in _flatten(output) if isinstance(t, torch.Tensor)]
    on_every_path = _dominators_of_input([t.grad_fn for t in outputs if t.grad_fn is not None], x)
    layers = []
    for name in order:
        record = records[name]
        if record.calls != 1 or record.node is None or record.passes_input_on or id(record.node) not in on_every_path:
            continue
        if record.tensor._version != record.version:
            continue  # changed in place later (an in-place activation): the engine cannot cut there
        channels, h, w = record.shape
        layers.append(LayerInfo(name, (int(channels), int(h), int(w)), type(record.module).__name__,
                                stride=height / max(int(h), 1)))
    return layers


def _record_forward(model: nn.Module, probe: torch.Tensor) -> tuple[dict[str, _Record], list[str], torch.Tensor, Any]:
    """One eval-mode forward of ``probe`` with hooks on every named module.

    Returns the per-module records, the module names in first-call order, the input leaf and the
    model output (its autograd graph kept). The model's mode and ``requires_grad`` flags are
    restored, and the hooks removed, even on error.
    """
    records: dict[str, _Record] = {}
    order: list[str] = []
    input_nodes: dict[str, list] = {}  # the nodes themselves (kept alive, so ids stay unique)

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            input_nodes[name] = [a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None]

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            record = records[name]
            record.calls += 1
            if record.calls == 1:
                order.append(name)
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.grad_fn is not None:
                record.node = output.grad_fn
                record.shape = tuple(output.shape[1:])
                # an identity-like module (Identity, eval Dropout) returns its input's node: the
                # engine would cut only the path through this call, not the node's other uses
                record.passes_input_on = any(output.grad_fn is node for node in input_nodes.get(name, ()))
                record.tensor, record.version = output, output._version

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            records[name] = _Record(module)
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with torch.enable_grad():
            x = probe.requires_grad_(True)
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return records, order, x, output


def _flatten(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flatten(v)]
    if isinstance(value, dict):
        return [item for v in value.values() for item in _flatten(v)]
    return [value]


def _dominators_of_input(roots: list, x: torch.Tensor) -> set[int]:
    """Ids of the autograd nodes that lie on every path from the outputs back to ``x``."""
    virtual_root = object()
    successors, target = _autograd_graph(virtual_root, roots, x)
    if target is None:
        return set()
    predecessors: dict[int, list[int]] = {key: [] for key in successors}
    for key, nexts in successors.items():
        for n in nexts:
            predecessors[n].append(key)
    reaches = _reachable(target, predecessors)  # keep only nodes that reach the input
    root_key = id(virtual_root)
    postorder = _postorder(root_key, {key: [n for n in nexts if n in reaches] for key, nexts in successors.items()})
    idom = _immediate_dominators(root_key, postorder, predecessors)
    dominators: set[int] = set()
    key = target
    while key != root_key:
        dominators.add(key)
        key = idom[key]
    return dominators


def _autograd_graph(virtual_root: object, roots: list, x: torch.Tensor) -> tuple[dict[int, list[int]], int | None]:
    """The graph behind ``roots`` as ``{node id: [next node ids]}`` with ``virtual_root`` above
    all roots, and the id of ``x``'s gradient accumulator (None when ``x`` is not reached)."""
    successors: dict[int, list[int]] = {id(virtual_root): [id(r) for r in roots]}
    seen: dict[int, Any] = {id(virtual_root): virtual_root}  # the nodes themselves keep ids unique
    target = None
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if type(node).__name__ == "AccumulateGrad":
            if getattr(node, "variable", None) is x:
                target = id(node)
            successors[id(node)] = []
            continue
        nexts = [n for n, _ in node.next_functions if n is not None]
        successors[id(node)] = [id(n) for n in nexts]
        stack.extend(nexts)
    return successors, target


def _reachable(start: int, edges: dict[int, list[int]]) -> set[int]:
    """Every key reachable from ``start`` along ``edges`` (``start`` included)."""
    found: set[int] = set()
    stack = [start]
    while stack:
        key = stack.pop()
        if key not in found:
            found.add(key)
            stack.extend(edges[key])
    return found


def _postorder(root: int, successors: dict[int, list[int]]) -> list[int]:
    """Depth-first postorder from ``root`` (iterative: autograd graphs are deep)."""
    postorder: list[int] = []
    visited = {root}
    dfs: list[tuple[int, int]] = [(root, 0)]
    while dfs:
        key, index = dfs[-1]
        nexts = successors[key]
        if index < len(nexts):
            dfs[-1] = (key, index + 1)
            child = nexts[index]
            if child not in visited:
                visited.add(child)
                dfs.append((child, 0))
        else:
            postorder.append(key)
            dfs.pop()
    return postorder


def _immediate_dominators(root: int, postorder: list[int], predecessors: dict[int, list[int]]) -> dict[int, int]:
    """Cooper, Harvey and Kennedy's iteration over the nodes in ``postorder``."""
    number = {key: i for i, key in enumerate(postorder)}
    preds_in = {key: [p for p in predecessors[key] if p in number] for key in number}
    idom: dict[int, int] = {root: root}

    def intersect(a: int, b: int) -> int:
        while a != b:
            while number[a] < number[b]:
                a = idom[a]
            while number[b] < number[a]:
                b = idom[b]
        return a

    changed = True
    reverse_postorder = [key for key in reversed(postorder) if key != root]
    while changed:
        changed = False
        for key in reverse_postorder:
            processed = [p for p in preds_in[key] if p in idom]
            if not processed:
                continue
            new = processed[0]
            for p in processed[1:]:
                new = intersect(p, new)
            if idom.get(key) != new:
                idom[key] = new
                changed = True
    return idom


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
    calls: list[Any] = []
    versions: list[int] = []
    identity: list[bool] = []

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        calls.append(output)
        identity.append(any(output is a for a in args))
        versions.append(output._version if isinstance(output, torch.Tensor) else 0)

    handle = model.get_submodule(name).register_forward_hook(record)
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, dtype=dtype, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    if not calls:
        return "the model's forward never runs it"
    if len(calls) > 1:
        return f"it runs {len(calls)} times per forward"
    output = calls[0]
    if identity[0]:
        return "it returns its input unchanged (an identity); choose the module before or after it"
    if isinstance(output, torch.Tensor) and output._version != versions[0]:
        return ("its output is changed in place afterwards (e.g. by an in-place activation); choose the "
                "module that contains that step")
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        return f"its output is {shape}, not a (B, C, h, w) feature map"
    return ("a path from input to embedding bypasses it (e.g. a module inside a residual block); "
            "choose a block or stage output")
