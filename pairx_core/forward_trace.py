"""One recorded forward pass of a model, shared by everything that needs to know its structure.

Layer listing and checks (:mod:`.layers`), layer planning (:mod:`.layer_plan`), batch planning
(:mod:`.batch_plan`), splitting (:mod:`.split`) and the canonizer check (:mod:`.canonizers`) all
read :func:`forward_trace` instead of running their own probes. The trace is ONE eval-mode
forward of a seeded random image ``(1, 3, H, W)`` in the model's dtype, on the model's device,
with a pre- and a post-hook on every module and gradient recording on (parameters frozen), so
that the autograd graph tells which module outputs lie on every path from the input to the
embedding. The model's mode, ``requires_grad`` flags, parameters and buffers are unchanged.

It records per module: name, type, whether it is a leaf, every call's (start, end) tick on one
clock (call order and nesting), the first call's output shape, whether that output is the input
passed on or changed in place later, whether its autograd node dominates the input (a *cut*),
the bytes of all its tensor outputs, and which modules produced its inputs (lineage; with the
call order, what splitting a model needs).

Kept tensors (freed with the trace): the probe, the model's output, the first output of every
module whose 4-D output runs once, lies on every path from the input to the embedding and is
not changed later (what a split check starts from; on the CPU when the model runs elsewhere),
and the first call's inputs of modules whose type comes from neither torch, timm, torchvision
nor zennit (what reading a forward that ``torch.fx`` cannot trace needs).

Traces are cached per model object (weakly) and per (input size, dtype, device), the
:data:`TRACES_PER_MODEL` most recently used of each model. A model whose modules changed since
(a module replaced, added or given its own ``forward``) is traced anew, and what callers
derived from the old trace (:func:`model_memo`, :attr:`ForwardTrace.memo`) is dropped.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import LayerError
from .forward_analysis import nested_tensors
from .runtime_settings import denormals_flushed

__all__ = ["ForwardTrace", "ModuleTrace", "forward_trace", "model_memo"]

#: traces kept per model (input size, dtype, device), least recently used dropped first
TRACES_PER_MODEL = 4
#: packages whose module types never need their inputs kept (their forwards are read without them)
_LIBRARY_PACKAGES = frozenset({"torch", "timm", "torchvision", "zennit"})


@dataclass(frozen=True)
class ModuleTrace:
    """What one module did in the traced forward.

    Attributes:
        name: ``model.get_submodule`` name (``""`` for the model itself).
        module_type: the module's class name.
        is_leaf: the module has no children.
        spans: ``(start, end)`` clock ticks of every call, in call order (empty: never ran).
        output_shape: the first call's output shape ``(1, ...)``, or ``None`` when it is no tensor.
        output_kind: type name of the first call's output (``"Tensor"``, ``"tuple"``...).
        returns_input: the first call's output is one of its inputs (an identity, eval dropout).
        changed_in_place: the first call's output was changed in place later in the forward.
        dominates_input: the first output's autograd node lies on every path from the model's
            output back to the input.
        output_bytes: bytes of the tensor outputs of all calls.
        fed_by: the innermost modules whose first output is an input of this module's first call.
    """

    name: str
    module_type: str
    is_leaf: bool
    spans: tuple[tuple[int, int], ...] = ()
    output_shape: tuple[int, ...] | None = None
    output_kind: str = ""
    returns_input: bool = False
    changed_in_place: bool = False
    dominates_input: bool = False
    output_bytes: int = 0
    fed_by: tuple[str, ...] = ()

    @property
    def calls(self) -> int:
        return len(self.spans)

    @property
    def is_feature_map(self) -> bool:
        """The first output is a ``(B, C, h, w)`` tensor."""
        return self.output_shape is not None and len(self.output_shape) == 4

    @property
    def is_cut(self) -> bool:
        """A usable layer: runs once, a feature map on every path, not an identity, not changed later."""
        return (self.calls == 1 and self.is_feature_map and self.dominates_input and not self.returns_input
                and not self.changed_in_place)


@dataclass(frozen=True, eq=False)
class ForwardTrace:
    """The recorded forward (see the module docstring).

    Attributes:
        input_size: ``(H, W)`` of the probe.
        dtype, device: the model's (the probe's) dtype and device.
        modules: every named module, those that ran in order of their first call's end, then the
            ones that never ran.
        probe: the probe image ``(1, 3, H, W)``.
        output: the model's output on the probe (detached).
        memo: results callers derive from this trace (dropped with it).
    """

    input_size: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    modules: tuple[ModuleTrace, ...]
    probe: torch.Tensor
    output: Any
    _cut_outputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict, repr=False)
    memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.modules})

    def module(self, name: str) -> ModuleTrace | None:
        """The record of ``name``, or None when the model has no such submodule."""
        return self._by_name.get(name)

    @property
    def ran(self) -> list[ModuleTrace]:
        """Named modules that ran, in order of their first call's end (the root left out)."""
        return [m for m in self.modules if m.name and m.calls]

    def layer_output(self, name: str) -> torch.Tensor | None:
        """The probe's output of a cut ``(1, C, h, w)`` on the trace's device, or None."""
        kept = self._cut_outputs.get(name)
        return None if kept is None else kept.to(self.device)

    def first_inputs(self, name: str) -> tuple[tuple, dict] | None:
        """``(args, kwargs)`` of the first call of a module of a non-library type, or None."""
        return self._inputs.get(name)


@dataclass
class _ModelEntry:
    signature: tuple
    traces: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)


_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, _ModelEntry]" = weakref.WeakKeyDictionary()
#: one trace at a time: hooks of two concurrent traces on one model would mix their records
_RECORDING = threading.Lock()


def _signature(model: nn.Module) -> tuple:
    """Identity of the model's structure: names, module objects (weakly: a freed module's address
    reused by a new one does not match), types and own ``forward`` attributes."""
    return tuple((name, weakref.ref(module), type(module), id(vars(module).get("forward")))
                 for name, module in model.named_modules())


def _entry(model: nn.Module) -> _ModelEntry:
    signature = _signature(model)
    entry = _ENTRIES.get(model)
    if entry is None or entry.signature != signature:
        entry = _ModelEntry(signature)
        _ENTRIES[model] = entry
    return entry


def model_memo(model: nn.Module) -> dict:
    """A dict for results derived from the model's structure, dropped when its modules change."""
    return _entry(model).memo


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype (float32 when not floating point) and device of the model's first parameter."""
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    return dtype, device


def forward_trace(model: nn.Module, input_size: tuple[int, int]) -> ForwardTrace:
    """The trace of ``model`` at ``input_size`` ``(H, W)`` (recorded on first use, then cached).

    Raises:
        LayerError: the input size is not positive.
        Exception: whatever the model's forward raises on the probe.
    """
    height, width = int(input_size[0]), int(input_size[1])
    if height < 1 or width < 1:
        raise LayerError("", f"input size must be positive, got {tuple(input_size)}")
    dtype, device = model_dtype_device(model)
    key = (height, width, dtype, str(device))
    with _RECORDING:
        entry = _entry(model)
        trace = entry.traces.pop(key, None)
        if trace is None:
            trace = _record(model, (height, width), dtype, device)
        entry.traces[key] = trace  # the most recently used last
        while len(entry.traces) > TRACES_PER_MODEL:
            del entry.traces[next(iter(entry.traces))]
    return trace


# ------------------------------------------------------------------------------------ recording
@dataclass
class _Call:
    """Mutable per-module state while the forward runs."""

    module: nn.Module
    spans: list = field(default_factory=list)
    open: list = field(default_factory=list)
    output: Any = None
    node: Any = None  # the first output's autograd node when it was returned
    input_nodes: list = field(default_factory=list)
    returns_input: bool = False
    version: int = 0
    output_bytes: int = 0
    first_args: tuple | None = None


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _record(model: nn.Module, input_size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> ForwardTrace:
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((1, 3, *input_size), generator=generator).to(device=device, dtype=dtype)
    calls: dict[str, _Call] = {}
    clock = [0]
    keep_inputs: set[str] = set()
    by_module: dict[int, str] = {}

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = calls[name]
            clock[0] += 1
            call.open.append(clock[0])
            if not call.spans and not call.open[:-1]:  # the first call
                call.input_nodes = [a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None]
                if name in keep_inputs:
                    call.first_args = (tuple(_detached(a) for a in args),
                                       {k: _detached(v) for k, v in kwargs.items()})

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            call = calls[name]
            clock[0] += 1
            call.spans.append((call.open.pop(), clock[0]))
            if isinstance(output, torch.Tensor):
                call.output_bytes += output.numel() * output.element_size()
            if len(call.spans) == 1:
                call.output = output
                if isinstance(output, torch.Tensor):
                    call.version, call.node = output._version, output.grad_fn
                    call.returns_input = any(output is a for a in args) or (
                        call.node is not None and any(call.node is n for n in call.input_nodes))

        return hook

    handles = []
    for name, module in model.named_modules():
        calls[name] = _Call(module)
        by_module[id(module)] = name
        if type(module).__module__.split(".")[0] not in _LIBRARY_PACKAGES:
            keep_inputs.add(name)
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name)))
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with denormals_flushed(device), torch.enable_grad():  # random weights make denormals
            x = probe.clone().requires_grad_(True)
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
    roots = [t.grad_fn for t in nested_tensors(output) if t.grad_fn is not None]
    on_every_path = _dominators_of_input(roots, x)
    producer: dict[int, str] = {}  # autograd node id -> first module (innermost) that returned it
    finished = sorted((name for name, call in calls.items() if call.spans), key=lambda n: calls[n].spans[0][1])
    for name in finished:
        node = calls[name].node
        if node is not None:
            producer.setdefault(id(node), name)
    records, cut_outputs, inputs = [], {}, {}
    copies: dict[int, torch.Tensor] = {}
    for name in finished + [name for name, call in calls.items() if not call.spans]:
        call = calls[name]
        first = call.output
        is_tensor = isinstance(first, torch.Tensor)
        node = call.node
        record = ModuleTrace(
            name=name,
            module_type=type(call.module).__name__,
            is_leaf=not any(True for _ in call.module.children()),
            spans=tuple(call.spans),
            output_shape=tuple(first.shape) if is_tensor else None,
            output_kind=type(first).__name__ if call.spans else "",
            returns_input=call.returns_input,
            changed_in_place=is_tensor and first._version != call.version,
            dominates_input=node is not None and id(node) in on_every_path,
            output_bytes=call.output_bytes,
            fed_by=tuple(dict.fromkeys(producer[id(n)] for n in call.input_nodes
                                       if id(n) in producer and producer[id(n)] != name)),
        )
        records.append(record)
        if name and record.is_feature_map and record.calls == 1 and record.dominates_input \
                and not record.changed_in_place:
            if id(first) not in copies:  # a container returning its last child's output shares one copy
                copies[id(first)] = first.detach() if device.type == "cpu" else first.detach().to("cpu")
            cut_outputs[name] = copies[id(first)]
        if call.first_args is not None:
            inputs[name] = call.first_args
    detached_output = (output.detach() if isinstance(output, torch.Tensor) else output)
    return ForwardTrace(input_size=input_size, dtype=dtype, device=device, modules=tuple(records), probe=probe,
                        output=detached_output, _cut_outputs=cut_outputs, _inputs=inputs)


# ---------------------------------------------------------------------------------- dominators
def _dominators_of_input(roots: list, x: torch.Tensor) -> set[int]:
    """Ids of the autograd nodes that lie on every path from the outputs back to ``x``."""
    virtual_root = object()
    successors, target, _nodes = _autograd_graph(virtual_root, roots, x)
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


def _autograd_graph(virtual_root: object, roots: list, x: torch.Tensor) -> tuple[dict[int, list[int]], int | None,
                                                                                 dict[int, Any]]:
    """The graph behind ``roots`` as ``{node id: [next node ids]}`` with ``virtual_root`` above
    all roots, the id of ``x``'s gradient accumulator (None when ``x`` is not reached), and the
    nodes themselves (keep them alive while their ids are used)."""
    successors: dict[int, list[int]] = {id(virtual_root): [id(r) for r in roots]}
    seen: dict[int, Any] = {id(virtual_root): virtual_root}
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
    return successors, target, seen


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
