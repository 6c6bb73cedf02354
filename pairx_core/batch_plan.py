"""How many pairs go into one batch: the memory budget and the greedy batch plan.

A batch's memory is dominated by the retained graph of one forward of its unique images, so the
budget is turned into a number of images from the model's forward trace (bytes of every leaf
module's output, times an overhead factor for the graph, zennit's stored inputs and the rules'
caches).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .forward_trace import forward_trace

#: default fraction of free accelerator memory / available RAM the engine plans to use
DEFAULT_MEMORY_FRACTION_CUDA = 0.8
DEFAULT_MEMORY_FRACTION_CPU = 0.4
#: retained graph + zennit's stored inputs + cloned inputs, relative to the plain activations
GRAPH_OVERHEAD = 4.0
#: the same on CUDA, measured (H200, miewid-arch at 440 px, ``blocks.3``, 36 images per batch): peak
#: allocated memory was 0.27x (k_colors 10) and 0.13x (k_colors 0) of what 4.0 predicted; the
#: caching allocator frees the graph as the backward pass walks it. 1.2 keeps a margin over 0.27 x 4.0
GRAPH_OVERHEAD_CUDA = 1.2
#: CUDA without pixel maps (``k_colors=0``): no graph down to the input is kept; 0.13 x 4.0 = 0.52
#: measured, 0.6 with a margin
GRAPH_OVERHEAD_CUDA_NO_PIXELS = 0.6


#: on the CPU, the largest activation one plain-inference batch should allocate: glibc serves larger
#: blocks with fresh mmap'd pages (32 MiB is the ceiling of its mmap threshold), which the kernel
#: zero-fills at every allocation. MiewID architecture at 440 px: 0.34-0.37 s per image in batches of
#: 1-4 (largest activation 10.8 MB per image), 0.42-0.68 s in batches of 12 (docs/performance.md, section 8)
CPU_LARGEST_ALLOCATION = 32 * 1024 * 1024
#: images per plain-inference batch where memory does not bound it
INFERENCE_BATCH_CAP = 32


def inference_batch_size(model: nn.Module, input_size: tuple[int, int], device: torch.device,
                         cap: int = INFERENCE_BATCH_CAP) -> int:
    """Images per plain-inference batch (embedding): ``cap`` on accelerators; on the CPU as many as
    keep the largest module output under :data:`CPU_LARGEST_ALLOCATION` (from the forward trace at
    ``input_size`` ``(H, W)``), at least 1."""
    if device.type != "cpu":
        return cap
    trace = forward_trace(model, tuple(input_size))
    largest = max((record.output_bytes // record.calls for record in trace.modules if record.is_leaf and record.calls),
                  default=0)
    return max(1, min(cap, CPU_LARGEST_ALLOCATION // max(1, largest)))


def max_images_per_batch(model: nn.Module, probe: torch.Tensor, memory_budget: int | None, device: torch.device,
                         pixel_passes: bool = True, above: str | None = None) -> int:
    """Images per batch allowed by the memory budget (estimated from the forward trace at the probe's size).

    ``pixel_passes``: whether the batch keeps the graph down to the input (``k_colors > 0``).
    ``above``: a layer; only the network that runs after it is forwarded (stage 1 from cached
    activations), so only its outputs count.
    """
    if device.type == "cuda":
        overhead = GRAPH_OVERHEAD_CUDA if pixel_passes else GRAPH_OVERHEAD_CUDA_NO_PIXELS
    else:
        overhead = GRAPH_OVERHEAD
    per_image = max(1, int(_activation_bytes(model, probe, above) * overhead))
    budget = memory_budget or _default_budget(device)
    return max(2, budget // per_image)


def _activation_bytes(model: nn.Module, probe: torch.Tensor, above: str | None = None) -> int:
    """Bytes of the leaf-module outputs for one image ``probe (1, 3, H, W)`` (only its shape is used):
    all of them, or those of the modules whose every call starts after layer ``above`` ends."""
    trace = forward_trace(model, tuple(probe.shape[-2:]))
    layer = trace.module(above) if above is not None else None
    after = layer.spans[-1][1] if layer is not None and layer.spans else None
    return sum(record.output_bytes for record in trace.modules
               if record.is_leaf and (after is None or (record.spans and min(s for s, _ in record.spans) > after)))


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_MEMORY_FRACTION_CUDA)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        available = 8 << 30
    return int(available * DEFAULT_MEMORY_FRACTION_CPU)


def plan_batches(pairs: np.ndarray, batch_size: int | None, max_images: int) -> Iterator[list[int]]:
    """Greedy, in order: add pairs while the batch's unique images fit (and ``batch_size`` holds)."""
    current: list[int] = []
    current_images: set[int] = set()
    for position, (a, b) in enumerate(pairs.tolist()):
        grown = current_images | {a, b}
        too_many_pairs = batch_size is not None and len(current) >= batch_size
        if current and (too_many_pairs or len(grown) > max_images):
            yield current
            current, grown = [], {a, b}
        current.append(position)
        current_images = grown
    if current:
        yield current
