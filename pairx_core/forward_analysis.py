"""Read what a module's own forward does with its activations (without running the network).

LRP with zennit attaches rules to known module types. A module of unknown type gets no rule:
relevance passes through it by its gradient, which is what the published PAIR-X code does with
such modules (GeM pooling, a flatten, a custom activation). That is sound when the module
transforms ONE activation on its own. When its forward combines two activations (a gate product
as in squeeze-and-excitation, a residual sum, attention), the gradient spreads relevance in a way
that no LRP rule chose; such modules are reported so that the caller can decide.

Two readers, both treating the module's children as opaque (children are checked on their own):

- :func:`analyse_fx`: a ``torch.fx`` symbolic trace of ``module.forward``; needs no input.
- :func:`analyse_autograd`: runs the module once on real inputs and walks the autograd graph it
  recorded; used when the forward cannot be traced symbolically (data-dependent control flow).

An *activation* is a tensor that depends on the module's inputs. Parameters, buffers, constants,
shapes (``x.shape``, ``x.size()``) and detached tensors are not. Operations are classified as

- elementwise (``mul``, ``add``, ``sigmoid``, ``pow``, ...): allowed between activations only if
  all of them are elementwise functions of the same activation (``x * torch.sigmoid(x)`` is a
  custom activation, ``x * torch.sigmoid(conv(x))`` is a gate);
- routing (``cat``, ``stack``, ``flatten``, ``view``, indexing...): moves values, never mixes them;
  allowed with any number of activations;
- anything else (reductions, pooling, ``conv2d``, ``matmul``...): allowed on one activation only.
"""

from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["ForwardFinding", "ForwardNotReadable", "analyse_fx", "analyse_autograd", "normalise_op"]


@dataclass(frozen=True)
class ForwardFinding:
    """What one module's own forward does.

    Attributes:
        combination: name of the first operation combining two different activations
            (``"mul"``, ``"add"``, ``"matmul"``...), or ``None``.
        computes: the forward computes something itself (beyond calling children and moving
            values around), so relevance passes through that computation by its gradient.
        pointwise: the output is an elementwise function of the single input (a custom
            activation): a parent may treat a call of this module like an elementwise op.
        method: ``"fx"`` or ``"autograd"``.
    """

    combination: str | None
    computes: bool
    pointwise: bool
    method: str


class ForwardNotReadable(Exception):
    """The forward could not be read by this reader (internal; the caller tries another one)."""


# ----------------------------------------------------------------------------- op classification
def normalise_op(name: str) -> str:
    """Canonical lower-case op name: ``MulBackward0`` / ``mul_`` / ``imul`` / ``__mul__`` -> ``mul``."""
    name = re.sub(r"Backward\d*$", "", name)
    name = name.strip("_").lower().replace("_", "")
    return {"truediv": "div", "itruediv": "div", "iadd": "add", "imul": "mul", "isub": "sub", "ipow": "pow",
            "imatmul": "matmul", "ifloordiv": "floordiv", "clip": "clamp", "concat": "cat",
            "concatenate": "cat", "mm": "matmul", "bmm": "matmul", "addmm": "matmul"}.get(name, name)


_ELEMENTWISE = {normalise_op(n) for n in (
    "add", "sub", "rsub", "mul", "div", "floordiv", "remainder", "pow", "neg", "abs", "exp", "exp2", "expm1",
    "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "reciprocal", "square", "sign", "sgn",
    "sigmoid", "tanh", "relu", "relu6", "gelu", "silu", "elu", "selu", "celu", "leaky_relu", "prelu",
    "rrelu", "hardtanh", "hardsigmoid", "hardswish", "hardshrink", "softshrink", "tanhshrink", "mish",
    "softplus", "softsign", "logsigmoid", "log_sigmoid", "threshold", "erf", "erfc", "erfinv",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "floor", "ceil", "round", "trunc", "frac",
    "clamp", "clamp_min", "clamp_max", "clampmin", "clampmax", "maximum", "minimum", "fmax", "fmin",
    "where", "lerp", "addcmul", "addcdiv", "nan_to_num", "masked_fill", "gt", "lt", "ge", "le", "eq", "ne",
    "logical_not", "logical_and", "logical_or", "float", "double", "half", "bfloat16", "to", "type",
    "clone", "contiguous", "dropout", "alias", "tocopy", "copy",
)}

_ROUTING = {normalise_op(n) for n in (
    "cat", "stack", "hstack", "vstack", "dstack", "flatten", "unflatten", "view", "reshape", "permute",
    "transpose", "t", "squeeze", "unsqueeze", "expand", "repeat", "chunk", "split", "unbind", "narrow",
    "select", "slice", "getitem", "movedim", "flip", "roll", "unsafeview", "unsafesplit", "splitwithsizes",
    "expand_as", "view_as", "reshape_as", "identity", "index", "indexselect", "gather",
)}

#: methods/attributes that read tensor metadata: their results are not activations
_METADATA_METHODS = {"size", "dim", "numel", "stride", "element_size", "is_contiguous", "get_device", "nelement",
                     "ndimension", "data_ptr", "is_floating_point", "is_complex"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "T"}
#: results carry no dependence on the activation's values
_VALUE_FREE = {"detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
               "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
#: ``a.op(b)`` methods whose argument only lends its shape or dtype
_SHAPE_FROM_ARGUMENT = {"expand_as", "view_as", "reshape_as", "type_as"}


def _kind(op: str) -> str:
    if op in _ELEMENTWISE:
        return "elementwise"
    if op in _ROUTING:
        return "routing"
    return "other"


# ------------------------------------------------------------------------------------- fx reader
class _ChildrenAsLeaves(torch.fx.Tracer):
    """Records every call of a child module as one opaque ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def analyse_fx(module: nn.Module, pointwise_children: Iterable[str] = ()) -> ForwardFinding:
    """Read ``module.forward`` with a ``torch.fx`` symbolic trace (children opaque).

    Args:
        module: the module to read.
        pointwise_children: names of direct children known to be elementwise (activations):
            calling them keeps the elementwise lineage of their input.

    Raises:
        ForwardNotReadable: the forward cannot be traced symbolically.
    """
    pointwise_children = set(pointwise_children)
    concrete = _default_arguments(module)
    try:
        graph = _ChildrenAsLeaves().trace(module, concrete_args=concrete or None)
    except Exception as error:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        raise ForwardNotReadable(f"{type(error).__name__}: {error}") from error

    root: dict[torch.fx.Node, object] = {}  # activation node -> its elementwise root
    computes = False
    placeholders: list[torch.fx.Node] = []
    result: Any = None
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders.append(node)
            root[node] = node
        elif node.op == "output":
            result = node.args[0]
        elif node.op != "get_attr":
            step = _fx_lineage(node, root, pointwise_children)
            if isinstance(step, str):
                return ForwardFinding(step, True, False, "fx")
            if step is not None:
                root[node], did_compute = step
                computes = computes or did_compute
    pointwise = (
        len(placeholders) == 1 and isinstance(result, torch.fx.Node) and root.get(result) is placeholders[0]
        and result is not placeholders[0]
    )
    return ForwardFinding(None, computes, pointwise, "fx")


def _fx_lineage(node: torch.fx.Node, root: dict, pointwise_children: set[str]) -> tuple[Any, bool] | str | None:
    """What one traced call does with activations (``root``: activation node -> elementwise root).

    Returns ``None`` when the call's result is not an activation, ``(its root, whether it
    computes)`` when it is, or the operation's name when it combines two activations.
    """
    active = [a for a in _flatten_nodes((node.args, node.kwargs)) if a in root]
    if not active:
        return None
    if node.op == "call_module":
        keeps_lineage = node.target in pointwise_children and len(active) == 1
        return (root[active[0]] if keeps_lineage else node), False
    if node.op == "call_function" and node.target is getattr:
        attribute = node.args[1] if len(node.args) > 1 else None
        # an attribute of an activation we do not know: keep it an activation
        return None if attribute in _METADATA_ATTRIBUTES else (node, False)
    if node.op == "call_function" and node.target is operator.getitem:
        return node, False  # indexing moves values (a new lineage: positions change)
    raw_name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if raw_name in _METADATA_METHODS or raw_name in _VALUE_FREE:
        return None
    if raw_name in _SHAPE_FROM_ARGUMENT:
        active = [a for a in active if a is node.args[0]]
        if not active:
            return None
    op = normalise_op(raw_name)
    step = _follow(op, {root[a] for a in active}, node)
    return op if step is None else step


def _follow(op: str, active_roots: set, node: Any) -> tuple[Any, bool] | None:
    """How ``node``, computing ``op`` from activations with elementwise roots ``active_roots``,
    continues their lineage: ``(its root, whether it computes)``; ``None`` when it combines two.

    Shared by both readers: an elementwise op keeps its input's root, routing starts a new
    lineage without computing, anything else starts a new lineage and computes.
    """
    kind = _kind(op)
    if kind == "routing":
        return node, False
    if len(active_roots) > 1:
        return None
    return (next(iter(active_roots)) if kind == "elementwise" else node), True


def _default_arguments(module: nn.Module) -> dict[str, Any]:
    """Forward parameters with defaults, passed as constants (``mask=None`` stays ``None``)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return {}
    return {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if parameter.default is not inspect.Parameter.empty
        and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _flatten_nodes(value: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.fx.Node):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, slice):
            stack.extend((item.start, item.stop, item.step))
    return found


# ------------------------------------------------------------------------------- autograd reader
class _Boundary(torch.autograd.Function):
    """Identity that marks a child's output in the autograd graph."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def analyse_autograd(
    module: nn.Module, inputs: tuple, kwargs: dict | None = None, pointwise_children: Iterable[str] = ()
) -> ForwardFinding:
    """Run ``module(*inputs, **kwargs)`` once and read the autograd graph it records.

    Children's outputs are marked (an identity autograd function) and not looked into, except
    for ``pointwise_children``, whose elementwise operations are read like the module's own.
    Floating-point tensor inputs are cloned as fresh leaves; the module's parameters and state
    are not changed (call it on a module in eval mode).

    Raises:
        ForwardNotReadable: the forward fails on these inputs or returns no tensor.
    """
    kwargs = dict(kwargs or {})
    pointwise_children = set(pointwise_children)
    leaves: list[torch.Tensor] = []

    def as_leaf(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            leaf = value.detach().clone().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        return value

    call_inputs = tuple(as_leaf(v) for v in inputs)
    call_kwargs = {k: as_leaf(v) for k, v in kwargs.items()}

    def mark(child: nn.Module, child_inputs: tuple, output: Any) -> Any:
        return _map_tensors(output, lambda t: _Boundary.apply(t) if t.requires_grad else t)

    handles = [
        child.register_forward_hook(mark)
        for child_name, child in module.named_children()
        if child_name not in pointwise_children
    ]
    try:
        with torch.enable_grad():
            output = module(*call_inputs, **call_kwargs)
    except Exception as error:
        raise ForwardNotReadable(f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    outputs = [t for t in nested_tensors(output) if t.grad_fn is not None]
    if not outputs:
        raise ForwardNotReadable("the forward returned no tensor that depends on its inputs")
    leaf_index = {id(leaf): i for i, leaf in enumerate(leaves)}
    return _walk(outputs, leaf_index, single_input=len(leaves) == 1)


def _walk(outputs: list[torch.Tensor], leaf_index: dict[int, int], single_input: bool) -> ForwardFinding:
    """Assign every graph node the elementwise root of its value; find combinations."""
    roots: dict[Any, Any] = {}  # node -> root (None: not an activation)
    computes = False
    # iterative post-order over the graph below the outputs
    stack: list[tuple[Any, bool]] = [(t.grad_fn, False) for t in outputs]
    while stack:
        node, expanded = stack.pop()
        if node in roots:
            continue
        name = type(node).__name__
        if name == "AccumulateGrad":
            variable = getattr(node, "variable", None)
            roots[node] = ("input", leaf_index[id(variable)]) if id(variable) in leaf_index else None
            continue
        if name == "_BoundaryBackward":
            roots[node] = node
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((n, False) for n in children if n not in roots)
            continue
        active = {roots[n] for n in children if roots.get(n) is not None}
        if not active:
            roots[node] = None
            continue
        op = normalise_op(name)
        step = _follow(op, active, node)
        if step is None:
            return ForwardFinding(op, True, False, "autograd")
        roots[node], did_compute = step
        computes = computes or did_compute
    pointwise = single_input and len(outputs) == 1 and roots.get(outputs[0].grad_fn) == ("input", 0)
    return ForwardFinding(None, computes, pointwise, "autograd")


def nested_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value`` and in its lists, tuples and dict values, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in nested_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in nested_tensors(item)]
    return []


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, function) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, function) for v in value]
    return value
