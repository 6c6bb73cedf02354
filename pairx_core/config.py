"""What one ``explain`` call computes (:class:`ExplainConfig`) and what it counted doing it
(:class:`EngineStats`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, get_args

import torch

from .errors import ConfigError

ChannelReduction = Literal["abs_of_sum", "sum_of_abs"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
Autocast = Literal["off", "bfloat16"]
ProgressCallback = Callable[[int, int], None]

@dataclass(frozen=True)
class ExplainConfig:
    """What to compute (validated on construction).

    Attributes:
        k_lines: matches drawn as lines (kept in the table in any case: all mutual matches are).
        k_colors: matches whose pixel relevance is computed; 0 skips that work entirely.
        channel_reduction: ``abs_of_sum`` (published) or ``sum_of_abs``.
        strict_lrp: stricter timm treatment (fused batch norms merged, residuals split).
        batch_size: pairs per batch; ``None`` plans batches from ``memory_budget``.
        memory_budget: bytes the engine may use for one batch; ``None``: a share of what is free.
        epsilon, stabilizer: zennit ``EpsilonPlus`` parameters.
        memory_format: layout of images and 4-D weights during the call. ``auto``:
            ``channels_last`` for float32 on CPU (oneDNN's NHWC kernels: 10-15 % faster on timm
            EfficientNets with k_colors=10, no change on ResNet-18; same top matches, pixel-map
            correlation 1.0), ``contiguous`` otherwise (float64 kernels gain nothing; GPUs are
            untested). The model's own tensors are restored after the call.
        pixel_pass_group: pixel passes per backward call (``torch.autograd.grad`` with
            ``is_grads_batched``: the seeds of several passes stacked, one vmapped call). Same
            maps; meant for GPUs, where one call of a small backward leaves the device idle; the
            backward's temporaries grow with the group. 1 (default): one call per pass.
        autocast: ``bfloat16`` runs the forward and backward passes under ``torch.autocast``
            (CPU only: on CUDA the rules' convolution backward falls outside autocast and the
            engine refuses it; results are returned as float32 and differ from float32 in single
            cells); ``off`` (default) computes in the inputs' dtype.
    """

    k_lines: int = 20
    k_colors: int = 10
    channel_reduction: ChannelReduction = "abs_of_sum"
    strict_lrp: bool = False
    batch_size: int | None = None
    memory_budget: int | None = None
    epsilon: float = 1e-6
    stabilizer: float = 1e-6
    memory_format: MemoryFormat = "auto"
    autocast: Autocast = "off"
    pixel_pass_group: int = 1

    def __post_init__(self) -> None:
        if self.k_lines < 0 or self.k_colors < 0:
            raise ConfigError(f"k_lines and k_colors must be >= 0, got {self.k_lines}, {self.k_colors}")
        if self.channel_reduction not in ("abs_of_sum", "sum_of_abs"):
            raise ConfigError(f"channel_reduction must be 'abs_of_sum' or 'sum_of_abs', got {self.channel_reduction!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be > 0 bytes, got {self.memory_budget}")
        if self.memory_format not in get_args(MemoryFormat):
            raise ConfigError(f"memory_format must be one of {get_args(MemoryFormat)}, got {self.memory_format!r}")
        if self.pixel_pass_group < 1:
            raise ConfigError(f"pixel_pass_group must be >= 1, got {self.pixel_pass_group}")
        if self.autocast not in get_args(Autocast):
            raise ConfigError(f"autocast must be one of {get_args(Autocast)}, got {self.autocast!r}")

    def use_channels_last(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a call on ``device`` with ``dtype`` runs channels-last."""
        return runs_channels_last(self.memory_format, device, dtype)


def runs_channels_last(memory_format: MemoryFormat, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``memory_format`` means channels-last on ``device`` with ``dtype`` (``auto``: float32
    on CPU; see :class:`ExplainConfig`).

    Raises:
        ConfigError: an unknown ``memory_format``.
    """
    if memory_format not in get_args(MemoryFormat):
        raise ConfigError(f"memory_format must be one of {get_args(MemoryFormat)}, got {memory_format!r}")
    if memory_format == "auto":
        return device.type == "cpu" and dtype == torch.float32
    return memory_format == "channels_last"


@dataclass
class EngineStats:
    """Counters filled by one ``explain`` call (for tests and benchmarks)."""

    batches: int = 0
    images_forwarded: int = 0
    forward_passes: int = 0
    relevance_backwards: int = 0
    pixel_backwards: int = 0
    #: pixel maps of an (image, layer, cell) computed, and taken from an earlier batch of the call
    pixel_maps_computed: int = 0
    pixel_maps_reused: int = 0
    peak_memory_bytes: int = 0
    images_per_batch: list[int] = field(default_factory=list)


def resolve_config(config: ExplainConfig | None, overrides: Mapping[str, Any]) -> ExplainConfig:
    """``config`` (default: :class:`ExplainConfig`'s defaults) with ``overrides`` applied by field
    name; an unknown name raises :class:`ConfigError` listing the valid ones."""
    base = config if config is not None else ExplainConfig()
    if not isinstance(base, ExplainConfig):
        raise ConfigError(f"config must be an ExplainConfig, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(ExplainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; ExplainConfig fields are {sorted(names)}")
    return dataclasses.replace(base, **overrides) if overrides else base
