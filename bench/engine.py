#!/usr/bin/env python3
"""Benchmark of the batched PAIR-X engine (``pairx_core.explain``) against in-run baselines.

Prints one JSON object per line on stdout (nothing else goes there); progress goes to stderr.

For every layer set and every ``k_colors`` value it measures, interleaved over ``--repeats``
rounds so that load from other processes hits all configurations alike:

- ``reference``: ``pairx_core.reference.explain_pair_reference`` on ``--reference-pairs`` pairs,
  one pair at a time (about as many passes as the published demo code: the published-style
  baseline);
- ``engine`` with ``batch_size=1`` (our engine, one pair at a time: the second baseline);
- ``engine`` with every batch size of ``--batch-sizes``.

Engine lines carry ``speedup_vs_reference`` and ``speedup_vs_engine_bs1``, ratios of median
seconds per pair measured in the same process with the same ``k_colors`` and layers. A final
``summary`` line gathers the seconds per pair. ``--soak N`` instead explains N pairs batch by
batch and prints the process RSS after each batch (memory growth check).

Examples::

    python bench/engine.py                                  # CPU, efficientnet_b0 at 128 px
    python bench/engine.py --batch-sizes 1,4,8,16 --pairs 16 --repeats 3
    python bench/engine.py --model miewid-arch --device cuda --memory-budget-gib 40
    python bench/engine.py --images PATH/TO/mantas --shared-gallery 2
    python bench/engine.py --soak 200 --batch-sizes 8
    python bench/engine.py --quick                          # seconds: smoke test
    python bench/engine.py --preset miewid --compare-ref e6ce287   # real size, against a commit

``--preset miewid`` is the workload users run: the MiewID architecture (EfficientNetV2-M with
GeM, random weights) at 440 px, explained at ``backbone.blocks.3`` with k_colors=10, 4 pairs per
batch, no reference and no one-pair baseline unless asked (they take minutes at this size).
``--compare-ref REV`` exports commit REV's ``pairx_core`` (``git archive``) to a temporary folder
and runs its engine in a worker process (``bench/engine_ref_worker.py``) on the same inputs and
settings, alternating round by round with this checkout's engine; its line is ``mode:
ref_engine`` and every engine line then carries ``ratio_vs_ref_engine`` (this engine's s/pair /
REV's) and the largest relative difference of the numbers (``max_rel_diff_vs_ref_engine``).
Every engine line carries ``phases``: seconds per pair in the forward (and set-up), the
relevance backward, matching and the pixel passes, from timers around the engine's steps.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence, get_args

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pairx_core  # noqa: E402
from pairx_core import EngineStats, explain  # noqa: E402
from pairx_core import engine as engine_module  # noqa: E402
from pairx_core.engine import MemoryFormat  # noqa: E402
from pairx_core.lrp import HookedEpsilonPlus  # noqa: E402
from pairx_core.runtime_settings import keep_freed_memory  # noqa: E402
from pairx_core import reference as reference_module  # noqa: E402
from pairx_core.models import load_model  # noqa: E402

LOG = logging.getLogger("bench.engine")
_JSON_OUT = sys.stdout  # the only writer of stdout; everything else is redirected to stderr

DEFAULT_CPU_MODEL = "timm:efficientnet_b0?size=128"
QUICK_MODEL = "timm:test_efficientnet?size=64"
DEFAULT_LAYERS = {"miewid": "backbone.blocks.3", "miewid-arch": "backbone.blocks.3"}
FALLBACK_LAYER = "backbone.blocks.2"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


# ------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark pairx_core.explain (pairs/s, s/pair, peak memory) with in-run baselines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help=f"model spec for pairx_core.models.load_model (default {DEFAULT_CPU_MODEL}; "
                             "'miewid-arch' = MiewID architecture at 440 px, random weights)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--layers", nargs="+", default=None, metavar="L[,L2]",
                        help="one measurement per argument; comma-separated names are explained together "
                             "(default: backbone.blocks.3 for miewid models, backbone.blocks.2 otherwise)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma list of pairs per batch (default 1,4,16 on CPU, 1,4,8,16,32 on GPU)")
    parser.add_argument("--k-colors", default=None,
                        help="comma list of k_colors values (default 10,0; --preset miewid: 10; --quick: 3,0)")
    parser.add_argument("--k-lines", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs per engine measurement (default: the largest batch size)")
    parser.add_argument("--reference-pairs", type=int, default=None,
                        help="pairs for the published-style reference baseline (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (median reported; default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration (default 1)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="memory_budget passed to explain (default: the engine's own share of free memory)")
    parser.add_argument("--tf32", action="store_true",
                        help="GPU only: allow TF32 in matmuls and cuDNN convolutions (off: full float32)")
    parser.add_argument("--memory-format", choices=get_args(MemoryFormat), default="auto",
                        help="engine layout (auto: channels_last for float32 on CPU)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (GPU runs; default False)")
    parser.add_argument("--autocast", choices=("off", "bfloat16"), default="off",
                        help="engine option: forward and backward passes under torch.autocast (bfloat16)")
    parser.add_argument("--pixel-pass-group", type=int, default=1, metavar="N",
                        help="engine option: N pixel passes per backward call (is_grads_batched)")
    parser.add_argument("--agreement", action="store_true",
                        help="per engine line, agreement_vs_fp32: top-k match sets and pixel-map correlation "
                             "against a strict float32 call (no TF32, no autocast, contiguous) on the same inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--malloc", choices=("kept", "default"), default="kept",
                        help="kept: freed memory stays mapped, as in the pipeline's task processes "
                             "(pairx_core.runtime_settings.keep_freed_memory); default: glibc's own thresholds")
    parser.add_argument("--skip-reference", action="store_true", help="do not run the reference baseline")
    parser.add_argument("--compare-hooks", action="store_true",
                        help="also run the engine at the largest batch size on zennit's hooks (the previous LRP "
                             "backward, HookedEpsilonPlus), interleaved with the others")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="use the photos under DIR (recursively) instead of random tensors; copies are "
                             "flipped/shifted/noised so that every image of a pair set stays unique")
    parser.add_argument("--shared-gallery", type=int, default=0, metavar="G",
                        help="pair each query with each of the same G gallery images (image reuse); "
                             "0 (default): every pair has two images of its own")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="soak mode: explain N pairs in batches of the largest batch size, print RSS "
                             "after each batch, then exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=("miewid",), default=None,
                        help="miewid: MiewID architecture at 440 px, backbone.blocks.3, k_colors=10, 4 pairs per "
                             "batch, 2 rounds, no reference and no batch-size-1 baseline unless given")
    parser.add_argument("--compare-ref", default=None, metavar="REV",
                        help="also run commit REV's engine (git archive of its pairx_core, in a worker process) "
                             "on the same inputs, alternating with this engine; lines get ratio_vs_ref_engine")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny smoke-test settings ({QUICK_MODEL}, 2 pairs, 1 repeat)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _resolve_defaults(args, parser)
    return args


def _int_list(text: str, parser: argparse.ArgumentParser, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what} must be a comma list of integers, got {text!r}")
    if not values:
        parser.error(f"{what} is empty")
    return values


def _resolve_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    on_gpu = args.device.startswith("cuda")
    args.engine_bs1 = True
    if args.preset == "miewid":
        args.model = args.model or "miewid-arch"
        args.batch_sizes = args.batch_sizes or "4"
        args.k_colors = args.k_colors or "10"
        args.repeats = args.repeats or 2
        args.skip_reference = args.skip_reference or args.reference_pairs is None
        args.engine_bs1 = "1" in args.batch_sizes.split(",")
    if args.quick:
        args.model = args.model or QUICK_MODEL
        args.batch_sizes = args.batch_sizes or "2"
        args.k_colors = args.k_colors or "3,0"
        args.pairs = args.pairs or 2
        args.reference_pairs = args.reference_pairs or 1
        args.repeats = args.repeats or 1
        args.warmup = args.warmup if args.warmup is not None else 1
        args.k_lines = min(args.k_lines, 5)
    args.model = args.model or DEFAULT_CPU_MODEL
    args.batch_sizes = _int_list(args.batch_sizes or ("1,4,8,16,32" if on_gpu else "1,4,16"), parser, "--batch-sizes")
    args.k_colors = _int_list(args.k_colors or "10,0", parser, "--k-colors")
    if min(args.batch_sizes) < 1 or min(args.k_colors) < 0:
        parser.error("batch sizes must be >= 1 and k_colors >= 0")
    if args.layers is None:
        kind = args.model.partition("?")[0].partition(":")[0]
        args.layers = [DEFAULT_LAYERS.get(kind, FALLBACK_LAYER)]
    args.layer_sets = [[name for name in item.split(",") if name] for item in args.layers]
    args.pairs = args.pairs or max(args.batch_sizes)
    args.reference_pairs = args.reference_pairs or 2
    args.repeats = args.repeats or 3
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.pairs < 1 or args.repeats < 1 or args.warmup < 0 or args.shared_gallery < 0:
        parser.error("--pairs and --repeats must be >= 1, --warmup and --shared-gallery >= 0")
    if (args.tf32 or args.cudnn_benchmark) and not on_gpu:
        parser.error("--tf32 and --cudnn-benchmark are for GPU runs only")


class Interrupted(BaseException):
    """SIGTERM (e.g. from ``timeout``): emit what was measured so far, then stop."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


# ----------------------------------------------------------------------------------- output
def emit(record: dict[str, Any]) -> None:
    _JSON_OUT.write(json.dumps(record, sort_keys=False, default=_json_default) + "\n")
    _JSON_OUT.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _round(value: float | None, digits: int = 5) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


# ----------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS growth starts from a clean base."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """Samples RSS in a thread while the block runs: ``growth`` = peak RSS - RSS at entry."""

    METRIC = "cpu_peak_rss_growth_sampled_2ms"

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "RssPeak":
        _trim_heap()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` over the block (includes the model and the inputs)."""

    METRIC = "cuda_max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.peak = 0

    def __enter__(self) -> "CudaPeak":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _memory_probe(device: torch.device):
    return CudaPeak(device) if device.type == "cuda" else RssPeak()


# ----------------------------------------------------------------------------------- inputs
def _load_photos(directory: str, preprocessing, dtype: torch.dtype) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {directory}")
    photos = []
    for path in files:
        with Image.open(path) as image:
            photos.append(preprocessing.to_tensor(image.convert("RGB")))
    LOG.info("loaded %d photos from %s", len(photos), directory)
    return torch.stack(photos).to(dtype)


def image_pool(n: int, size: tuple[int, int], dtype: torch.dtype, seed: int,
               photos: torch.Tensor | None) -> torch.Tensor:
    """``n`` distinct images ``(n, 3, H, W)``: random normal tensors, or copies of the photos made
    distinct by a flip, a horizontal shift and a little noise from the second copy on."""
    generator = torch.Generator().manual_seed(seed)
    if photos is None:
        return torch.randn(n, 3, *size, generator=generator, dtype=dtype)
    out = []
    for i in range(n):
        copy, base = divmod(i, photos.shape[0])
        image = photos[base].clone()
        if copy:
            if copy % 2:
                image = image.flip(-1)
            image = image.roll(shifts=3 * copy, dims=-1)
            image = image + 0.02 * torch.randn(image.shape, generator=generator, dtype=dtype)
        out.append(image)
    return torch.stack(out)


def make_pairs(n_pairs: int, gallery: int, size, dtype, seed: int, photos) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``x0, x1`` ``(P, 3, H, W)`` and the number of distinct images among them.

    ``gallery == 0``: 2P distinct images. ``gallery == G``: ceil(P/G) queries, each paired with the
    same G gallery images (query-major order), P pairs in all.
    """
    if gallery <= 0:
        pool = image_pool(2 * n_pairs, size, dtype, seed, photos)
        return pool[0::2].contiguous(), pool[1::2].contiguous(), 2 * n_pairs
    n_queries = math.ceil(n_pairs / gallery)
    pool = image_pool(n_queries + gallery, size, dtype, seed, photos)
    queries, gallery_images = pool[:n_queries], pool[n_queries:]
    index = [(q, g) for q in range(n_queries) for g in range(gallery)][:n_pairs]
    x0 = torch.stack([queries[q] for q, _ in index])
    x1 = torch.stack([gallery_images[g] for _, g in index])
    used = len({q for q, _ in index}) + len({g for _, g in index})
    return x0, x1, used


# ------------------------------------------------------------------------------- baselines
class _OnDevice(nn.Module):
    """Runs ``inner`` on ``device`` for host inputs and returns host outputs.

    ``pairx_core.reference`` converts tensors to numpy as it goes (host only); wrapped like this
    its passes still run on the accelerator while every tensor it converts lives on the host.
    """

    def __init__(self, inner: nn.Module, device: torch.device):
        super().__init__()
        self.inner = inner
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.device)).to(x.device)


@contextlib.contextmanager
def _reference_on_host_tensors() -> Iterator[None]:
    """Make the reference's numpy conversions see host tensors (for GPU runs); undone on exit."""
    original_reduce = reference_module.reduce_channels
    original_match = reference_module._brute_force_matches

    def reduce_on_host(relevance, mode):
        return original_reduce(relevance, mode).to("cpu")

    def match_on_host(feature_0, feature_1, map_0, map_1):
        return original_match(feature_0.to("cpu"), feature_1.to("cpu"), map_0.to("cpu"), map_1.to("cpu"))

    reference_module.reduce_channels = reduce_on_host
    reference_module._brute_force_matches = match_on_host
    try:
        yield
    finally:
        reference_module.reduce_channels = original_reduce
        reference_module._brute_force_matches = original_match


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- measurements
class Runner:
    """Holds the model and inputs; runs one configuration once and returns seconds and counters."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, device: torch.device,
                 x0: torch.Tensor, x1: torch.Tensor):
        self.args = args
        self.model = model
        self.device = device
        self.x0, self.x1 = x0, x1
        self.memory_budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None
        self._reference_model = _OnDevice(model, device) if device.type == "cuda" else model
        self._reference_prefix = "inner." if device.type == "cuda" else ""
        self.ref_worker: RefWorker | None = None
        self.own_worker: RefWorker | None = None  # this checkout's engine, in a worker like the reference
        self.phases: dict[str, float] = {}
        self.keep_results = False
        self.cpu_seconds: float | None = None
        self.worker_max_rss: int | None = None
        self.last_results: dict[str, Any] | None = None

    def engine(self, layers: list[str], k_colors: int, batch_size: int, n_pairs: int,
               hooks: bool = False) -> tuple[float, EngineStats]:
        stats = EngineStats()
        self.phases = {phase: 0.0 for phase in _PHASES.values()}  # a step not taken (k_colors=0) stays 0
        with _hooked_composite() if hooks else contextlib.nullcontext(), _phase_timers(self.phases, self.device):
            _sync(self.device)
            cpu_start = time.process_time()
            start = time.perf_counter()
            results = explain(self.model, self.x0[:n_pairs], self.x1[:n_pairs], layers, k_lines=self.args.k_lines,
                              k_colors=k_colors, batch_size=batch_size, device=self.device,
                              memory_budget=self.memory_budget, stats=stats, memory_format=self.args.memory_format,
                              autocast=self.args.autocast, pixel_pass_group=self.args.pixel_pass_group)
            _sync(self.device)
            seconds = time.perf_counter() - start
        self.phases["forward_and_setup"] = seconds - sum(self.phases.values())
        self.cpu_seconds = time.process_time() - cpu_start
        if self.keep_results:
            self.last_results = _result_arrays(results)
        del results
        if self.ref_worker is not None:  # both engines start each call from a trimmed heap
            _trim_heap()
        return seconds, stats

    def ref_engine(self, layers: list[str], k_colors: int, batch_size: int, n_pairs: int,
                   save: str | None = None, own: bool = False) -> tuple[float, EngineStats]:
        worker = self.own_worker if own else self.ref_worker
        assert worker is not None
        answer = worker.call(layers=layers, k_colors=k_colors, batch_size=batch_size, n_pairs=n_pairs,
                                      k_lines=self.args.k_lines, memory_format=self.args.memory_format, save=save)
        stats = EngineStats()
        stats.pixel_backwards = answer["pixel_backwards"]
        stats.batches = answer["batches"]
        self.cpu_seconds = answer.get("cpu_seconds")
        self.worker_max_rss = answer.get("max_rss_bytes")
        return answer["seconds"], stats

    def reference(self, layers: list[str], k_colors: int, n_pairs: int) -> tuple[float, None]:
        """Published-style baseline: one pair and one layer at a time (layers: calls summed)."""
        context = _reference_on_host_tensors() if self.device.type == "cuda" else contextlib.nullcontext()
        _sync(self.device)
        start = time.perf_counter()
        with context:
            for i in range(n_pairs):
                for layer in layers:
                    reference_module.explain_pair_reference(
                        self._reference_model, self.x0[i], self.x1[i], self._reference_prefix + layer, k_colors
                    )
        _sync(self.device)
        return time.perf_counter() - start, None


_PHASES = {"_layer_relevance": "relevance_backward", "_ranked_matches": "matching", "_pixel_maps": "pixel_passes"}


@contextlib.contextmanager
def _phase_timers(phases: dict[str, float], device: torch.device) -> Iterator[None]:
    """Add the seconds spent in the engine's steps (module functions, wrapped for the block) to ``phases``."""
    originals = {name: getattr(engine_module, name) for name in _PHASES if hasattr(engine_module, name)}

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _sync(device)
                phases[_PHASES[name]] = phases.get(_PHASES[name], 0.0) + time.perf_counter() - start
        return wrapper

    for name, function in originals.items():
        setattr(engine_module, name, timed(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(engine_module, name, function)


@contextlib.contextmanager
def _strict_float32() -> Iterator[None]:
    """No TF32 and no cuDNN autotuning inside the block (restored on exit)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def agreement_vs_fp32(runner: "Runner", layers: list[str], k_colors: int, batch_size: int,
                      n_pairs: int) -> dict[str, float | None]:
    """This run's settings against a strict float32 call on the same ``n_pairs`` pairs.

    ``top_k_match_overlap``: per pair and layer, the share of the strict call's top ``k_lines``
    matches (cell pairs) that this call's top ``k_lines`` also holds (mean and min);
    ``pixel_map_corr``: Pearson correlation of each pixel map with the strict call's (mean and
    min, over maps of matches both calls rank alike; None with k_colors=0); ``similarity_max_abs_diff``.
    """
    import numpy as np

    args = runner.args
    common = dict(k_lines=args.k_lines, k_colors=k_colors, batch_size=batch_size, device=runner.device,
                  memory_budget=runner.memory_budget)
    x0, x1 = runner.x0[:n_pairs], runner.x1[:n_pairs]
    ours = explain(runner.model, x0, x1, layers, memory_format=args.memory_format, autocast=args.autocast,
                   pixel_pass_group=getattr(args, "pixel_pass_group", 1), **common)
    with _strict_float32():
        strict = explain(runner.model, x0, x1, layers, memory_format="contiguous", autocast="off", **common)
    overlaps, correlations, similarity = [], [], []
    columns = ["row_0", "col_0", "row_1", "col_1"]
    for a, b in zip(ours, strict):
        similarity.append(abs(a.similarity - b.similarity))
        for name in b.layers:
            la, lb = a.layers[name], b.layers[name]
            top_a = {tuple(r) for r in la.matches[columns].head(args.k_lines).values.tolist()}
            top_b = [tuple(r) for r in lb.matches[columns].head(args.k_lines).values.tolist()]
            if top_b:
                overlaps.append(sum(cell in top_a for cell in top_b) / len(top_b))
            order_a = [tuple(r) for r in la.matches[columns].head(k_colors).values.tolist()]
            for j, cell in enumerate(top_b[:k_colors]):
                if j < len(order_a) and order_a[j] == cell:
                    for side in ("pixel_relevance_0", "pixel_relevance_1"):
                        u, v = getattr(la, side)[j].ravel(), getattr(lb, side)[j].ravel()
                        if u.std() > 0 and v.std() > 0:
                            correlations.append(float(np.corrcoef(u, v)[0, 1]))
    return {
        "pairs": len(strict),
        "top_k_match_overlap_mean": _round(float(np.mean(overlaps)), 4) if overlaps else None,
        "top_k_match_overlap_min": _round(float(np.min(overlaps)), 4) if overlaps else None,
        "pixel_map_corr_mean": _round(float(np.mean(correlations)), 5) if correlations else None,
        "pixel_map_corr_min": _round(float(np.min(correlations)), 5) if correlations else None,
        "pixel_maps_compared": len(correlations),
        "similarity_max_abs_diff": _round(max(similarity), 7) if similarity else None,
    }


def _result_arrays(results) -> dict[str, Any]:
    """The numbers of a call's results, keyed like ``bench/engine_ref_worker.py`` saves them."""
    arrays = {}
    for p, result in enumerate(results):
        for name, layer in result.layers.items():
            for key in ("relevance_0", "relevance_1", "pixel_relevance_0", "pixel_relevance_1"):
                arrays[f"{p}|{name}|{key}"] = getattr(layer, key)
    return arrays


def max_relative_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    """Largest ``max|a - b| / max|b|`` over the arrays both hold (None when shapes differ)."""
    import numpy as np

    worst = 0.0
    for key, b in theirs.items():
        a = ours.get(key)
        if a is None or a.shape != b.shape:
            return None
        scale = float(np.abs(b).max()) if b.size else 0.0
        if scale > 0:
            worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


class RefWorker:
    """Another commit's engine in a worker process (``bench/engine_ref_worker.py``)."""

    def __init__(self, rev: str | None, args: argparse.Namespace, x0: torch.Tensor, x1: torch.Tensor):
        """``rev`` None: this checkout's own ``pairx_core`` (the same protocol on both sides)."""
        self.folder = Path(tempfile.mkdtemp(prefix="pairx_ref_engine_"))
        core = self.folder
        if rev is None:
            core, commit, rev = _ROOT, "working tree", "this checkout"
        else:
            commit = self._export(rev)
        self.commit = commit
        inputs = self.folder / "inputs.pt"
        torch.save({"x0": x0, "x1": x1}, inputs)
        command = [sys.executable, str(_ROOT / "bench" / "engine_ref_worker.py"), "--core", str(core),
                   "--model", args.model, "--inputs", str(inputs), "--device", args.device,
                   "--threads", str(torch.get_num_threads())]
        if args.malloc == "kept":
            command.append("--keep-freed-memory")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.process.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise SystemExit(f"--compare-ref: the worker for {rev} did not start (exit {self.process.poll()})")
        LOG.info("engine worker %s (%s) from %s", rev, commit[:10], ready["pairx_core"])

    def _export(self, rev: str) -> str:
        """Extract ``rev``'s ``pairx_core`` into this worker's folder; returns the full commit id."""
        try:
            commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=_ROOT, check=True,
                                    capture_output=True, text=True).stdout.strip()
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"--compare-ref: {rev!r} is not a commit of {_ROOT} ({error.stderr.strip()})") from None
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "pairx_core"], cwd=_ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(self.folder)], input=archive, check=True)
        return commit

    def call(self, **request) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference engine's worker ended (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.write("\n")
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def _hooked_composite() -> Iterator[None]:
    """Run the engine on zennit's hooks (the previous LRP backward) inside this block."""
    direct = engine_module.EngineEpsilonPlus
    engine_module.EngineEpsilonPlus = HookedEpsilonPlus
    try:
        yield
    finally:
        engine_module.EngineEpsilonPlus = direct


class Config:
    """One line of output: the reference, or the engine at one batch size (``engine_hooks``:
    the engine on zennit's hooks)."""

    def __init__(self, mode: str, batch_size: int | None, n_pairs: int):
        self.mode = mode
        self.batch_size = batch_size
        self.n_pairs = n_pairs
        self.times: list[float] = []
        self.stats: EngineStats | None = None
        self.memory_bytes: int | None = None
        self.memory_extra: dict[str, int] = {}
        self.error: str | None = None
        self.phases = {}
        self.cpu_times: list[float] = []

    @property
    def key(self) -> str:
        return "reference" if self.mode == "reference" else f"{self.mode}_bs{self.batch_size}"

    phases: dict[str, list[float]]

    def seconds_per_pair(self) -> float | None:
        return statistics.median(self.times) / self.n_pairs if self.times else None

    def run(self, runner: Runner, layers: list[str], k_colors: int, n_pairs: int | None = None):
        n = n_pairs or self.n_pairs
        if self.mode == "reference":
            return runner.reference(layers, k_colors, n)
        if self.mode in ("ref_engine", "engine_worker"):
            return runner.ref_engine(layers, k_colors, self.batch_size, n, save=getattr(self, "save", None),
                                     own=self.mode == "engine_worker")
        return runner.engine(layers, k_colors, self.batch_size, n, hooks=self.mode == "engine_hooks")


def _record_memory(config: Config, probe, stats: EngineStats | None) -> None:
    if isinstance(probe, CudaPeak):
        # the engine resets the peak per batch and keeps the maximum over batches in its stats
        peak = max(probe.peak, stats.peak_memory_bytes if stats is not None else 0)
        config.memory_bytes = max(config.memory_bytes or 0, peak)
        config.memory_extra = {"memory_before_bytes": probe.start}
    else:
        config.memory_bytes = max(config.memory_bytes or 0, probe.growth)
        config.memory_extra = {"peak_rss_bytes": probe.peak}


def measure_group(runner: Runner, layers: list[str], k_colors: int, args: argparse.Namespace,
                  unique_images: int, environment: dict[str, Any]) -> dict[str, float | None]:
    """Measure every configuration for one (layers, k_colors); emit their lines; return s/pair.

    Longer than 80 lines on purpose: it is the measurement protocol, read top to bottom
    (configurations, warm-up, timed rounds, printed figures); splitting it would scatter the
    order that makes the figures comparable.
    """
    configs: list[Config] = []
    if not args.skip_reference:
        configs.append(Config("reference", None, min(args.reference_pairs, args.pairs)))
    for batch_size in sorted(set(([1] if args.engine_bs1 else []) + args.batch_sizes)):
        configs.append(Config("engine", batch_size, args.pairs))
    if runner.ref_worker is not None:  # both engines in worker processes, nothing else in between
        configs = [config for config in configs if config.mode == "reference"]
        configs.append(Config("engine_worker", max(args.batch_sizes), args.pairs))
        configs.append(Config("ref_engine", max(args.batch_sizes), args.pairs))
    if args.compare_hooks:
        configs.append(Config("engine_hooks", max(args.batch_sizes), args.pairs))
    label = f"layers={','.join(layers)} k_colors={k_colors}"

    # warm-up: one batch of each configuration; the last warm-up call also measures memory
    # (a batch is the unit of peak memory: batches run one after another)
    for config in configs:
        warm_pairs = 1 if config.mode == "reference" else min(config.batch_size, args.pairs)
        for w in range(args.warmup):
            last = w == args.warmup - 1
            probe = _memory_probe(runner.device) if last else contextlib.nullcontext()
            try:
                with probe:
                    _, stats = config.run(runner, layers, k_colors, warm_pairs)
            except Exception as error:  # reported in the JSON line
                if config.mode != "reference":
                    raise
                config.error = f"{type(error).__name__}: {error}"
                LOG.warning("%s: reference failed (%s); speedup_vs_reference will be null", label, config.error)
                break
            if last:
                _record_memory(config, probe, stats)
        LOG.info("%s: warmed up %s", label, config.key)

    interrupted: Interrupted | None = None
    try:
        _timed_rounds(runner, configs, layers, k_colors, args, label)
    except Interrupted as error:
        interrupted = error
        LOG.warning("%s: interrupted (%s); emitting the rounds measured so far", label, error)

    spp = {config.key: config.seconds_per_pair() for config in configs}
    ref_engine = next((config for config in configs if config.mode == "ref_engine"), None)
    reference_spp = spp.get("reference")
    bs1_spp = spp.get("engine_bs1")
    memory_metric = CudaPeak.METRIC if runner.device.type == "cuda" else RssPeak.METRIC
    for config in configs:
        if interrupted is not None and not config.times:
            continue
        seconds = config.seconds_per_pair()
        record: dict[str, Any] = {
            "bench": "pairx_engine",
            "mode": config.mode,
            "model": args.model,
            "layers": layers,
            "k_colors": k_colors,
            "k_lines": args.k_lines,
            "batch_size": config.batch_size,
            "pairs": config.n_pairs,
            "unique_images": 2 * config.n_pairs if config.mode == "reference" else unique_images,
            "shared_gallery": args.shared_gallery,
            "repeats": len(config.times),
            "seconds_per_pair": _round(seconds),
            "seconds_per_pair_min": _round(min(config.times) / config.n_pairs) if config.times else None,
            "seconds_per_pair_all": [_round(t / config.n_pairs) for t in config.times],
            "pairs_per_s": _round(1.0 / seconds) if seconds else None,
            "speedup_vs_reference": _round(reference_spp / seconds, 3) if reference_spp and seconds else None,
            "speedup_vs_engine_bs1": _round(bs1_spp / seconds, 3) if bs1_spp and seconds else None,
            "speedup_vs_engine_hooks": (_round(spp[f"engine_hooks_bs{config.batch_size}"] / seconds, 3)
                                        if spp.get(f"engine_hooks_bs{config.batch_size}") and seconds else None),
            "peak_memory_bytes": config.memory_bytes,
            "peak_memory_metric": memory_metric,
            **config.memory_extra,
        }
        if config.phases:
            record["phases"] = {phase: _round(statistics.median(values) / config.n_pairs, 4)
                                for phase, values in config.phases.items()}
        if config.cpu_times:
            # CPU seconds of the process (all its threads) per pair: less sensitive than wall time
            # to other processes sharing the cores (not immune: caches and memory bandwidth are shared)
            record["cpu_seconds_per_pair"] = _round(statistics.median(config.cpu_times) / config.n_pairs)
        if ref_engine is not None and config.mode in ("engine", "engine_worker"):
            ref_spp = ref_engine.seconds_per_pair()
            if config.cpu_times and ref_engine.cpu_times:
                record["cpu_ratio_vs_ref_engine"] = _round(
                    statistics.median(config.cpu_times) / statistics.median(ref_engine.cpu_times), 3)
            record["ref_engine_commit"] = runner.ref_worker.commit
            record["ratio_vs_ref_engine"] = _round(seconds / ref_spp, 3) if ref_spp and seconds else None
            ours, theirs = getattr(config, "results", None), getattr(ref_engine, "results", None)
            if ours is not None and theirs is not None and config.batch_size == ref_engine.batch_size:
                record["max_rel_diff_vs_ref_engine"] = max_relative_difference(ours, theirs)
        if config.mode == "engine" and args.agreement and interrupted is None:
            record["agreement_vs_fp32"] = agreement_vs_fp32(runner, layers, k_colors, config.batch_size,
                                                            config.n_pairs)
        if config.mode == "ref_engine":
            record["ref_engine_commit"] = runner.ref_worker.commit
        if interrupted is not None:
            record["partial"] = True
        if config.mode == "reference":
            record["reference"] = "pairx_core.reference.explain_pair_reference, one pair at a time" + (
                ", one call per layer (summed)" if len(layers) > 1 else "")
            if config.error:
                record["error"] = config.error
        elif config.stats is not None:
            record.update(
                batches=config.stats.batches,
                images_per_batch=config.stats.images_per_batch,
                images_forwarded=config.stats.images_forwarded,
                forward_passes=config.stats.forward_passes,
                relevance_backwards=config.stats.relevance_backwards,
                pixel_backwards=config.stats.pixel_backwards,
            )
        record.update(environment)
        record["loadavg_1m"] = _round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        emit(record)
    if interrupted is not None:
        raise interrupted
    return spp


def _timed_rounds(runner: Runner, configs: list[Config], layers: list[str], k_colors: int,
                  args: argparse.Namespace, label: str) -> None:
    """``args.repeats`` rounds; each round runs every configuration once (interleaved)."""
    for repeat in range(args.repeats):
        for config in configs:
            if config.error:
                continue
            measure_memory = args.warmup == 0 and repeat == 0
            probe = _memory_probe(runner.device) if measure_memory else contextlib.nullcontext()
            last = repeat == args.repeats - 1
            runner.keep_results = last and runner.ref_worker is not None and config.mode == "engine"
            if last and config.mode in ("ref_engine", "engine_worker"):
                config.save = str(runner.ref_worker.folder / f"results_{label.replace(' ', '_')}.npz")
            try:
                with probe:
                    seconds, stats = config.run(runner, layers, k_colors)
            except Exception as error:  # reported in the JSON line
                if config.mode != "reference":
                    raise
                config.error = f"{type(error).__name__}: {error}"
                LOG.warning("%s: reference failed (%s); speedup_vs_reference will be null", label, config.error)
                continue
            if measure_memory:
                _record_memory(config, probe, stats)
            elif isinstance(stats, EngineStats) and runner.device.type == "cuda":
                config.memory_bytes = max(config.memory_bytes or 0, stats.peak_memory_bytes)
            config.times.append(seconds)
            if config.mode in ("ref_engine", "engine_worker"):
                config.memory_bytes, config.memory_extra = None, {"worker_max_rss_bytes": runner.worker_max_rss}
            if config.mode in ("engine", "ref_engine", "engine_worker") and runner.cpu_seconds is not None:
                config.cpu_times.append(runner.cpu_seconds)
            config.stats = stats if stats is not None else config.stats
            if config.mode == "engine":
                for phase, value in runner.phases.items():
                    config.phases.setdefault(phase, []).append(value)
                if runner.keep_results:
                    config.results = runner.last_results
            elif config.mode in ("ref_engine", "engine_worker") and getattr(config, "save", None):
                import numpy as np

                with np.load(config.save) as saved:
                    config.results = {key: saved[key] for key in saved.files}
            LOG.info("%s repeat %d/%d %-12s %.3f s/pair", label, repeat + 1, args.repeats, config.key,
                     seconds / config.n_pairs)


# ------------------------------------------------------------------------------------- soak
def soak(args: argparse.Namespace, model: nn.Module, device: torch.device, size, dtype, photos,
         environment: dict[str, Any]) -> None:
    """Explain ``args.soak`` pairs in separate calls of one batch each; RSS after every batch."""
    batch_size = max(args.batch_sizes)
    layers, k_colors = args.layer_sets[0], args.k_colors[0]
    memory_budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None
    n_batches = math.ceil(args.soak / batch_size)
    rss_values: list[int] = []
    done = 0
    warm_x0, warm_x1, _ = make_pairs(min(batch_size, args.soak), args.shared_gallery, size, dtype, args.seed, photos)
    # warm-up, not reported: the first call pays one-off costs
    explain(model, warm_x0, warm_x1, layers, k_lines=args.k_lines, k_colors=k_colors, batch_size=batch_size,
            device=device, memory_budget=memory_budget, memory_format=args.memory_format)
    del warm_x0, warm_x1
    for b in range(n_batches):
        n = min(batch_size, args.soak - done)
        x0, x1, _ = make_pairs(n, args.shared_gallery, size, dtype, args.seed + 1000 + b, photos)
        start = time.perf_counter()
        results = explain(model, x0, x1, layers, k_lines=args.k_lines, k_colors=k_colors, batch_size=batch_size,
                          device=device, memory_budget=memory_budget, memory_format=args.memory_format)
        _sync(device)
        seconds = time.perf_counter() - start
        del results, x0, x1
        done += n
        rss = _rss_bytes()
        rss_values.append(rss)
        record = {
            "bench": "pairx_engine", "mode": "soak", "batch": b, "pairs_done": done, "batch_size": batch_size,
            "k_colors": k_colors, "layers": layers, "seconds_per_pair": _round(seconds / n),
            "rss_bytes": rss, "rss_growth_since_first_batch_bytes": rss - rss_values[0],
        }
        if device.type == "cuda":
            record.update(cuda_allocated_bytes=torch.cuda.memory_allocated(device),
                          cuda_reserved_bytes=torch.cuda.memory_reserved(device))
        emit(record)
    half = rss_values[len(rss_values) // 2:]
    emit({
        "bench": "pairx_engine", "mode": "soak_summary", "pairs": done, "batches": n_batches,
        "batch_size": batch_size, "k_colors": k_colors, "layers": layers, "model": args.model,
        "rss_first_batch_bytes": rss_values[0], "rss_last_batch_bytes": rss_values[-1],
        "rss_growth_bytes": rss_values[-1] - rss_values[0],
        "rss_growth_per_batch_second_half_bytes": _round(_slope(half), 1) if len(half) > 1 else None,
        **environment,
    })


def _slope(values: list[int]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den if den else 0.0


# -------------------------------------------------------------------------------------- main
def _environment(args: argparse.Namespace, device: torch.device, size, dtype,
                 freed_memory_kept: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "dtype": str(dtype).removeprefix("torch."),
        "input_size": list(size),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "engine_version": getattr(pairx_core, "ENGINE_VERSION", None),
        "memory_budget_bytes": int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None,
        "inputs": f"photos:{args.images}" if args.images else "random_normal",
        "memory_format": args.memory_format,
        "freed_memory_kept": freed_memory_kept,
    }
    env["autocast"] = args.autocast
    env["pixel_pass_group"] = args.pixel_pass_group
    if device.type == "cuda":
        env["tf32"] = bool(args.tf32)
        env["cudnn_benchmark"] = bool(args.cudnn_benchmark)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s bench %(message)s", datefmt="%H:%M:%S")
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the JSON stream
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.simplefilter("default")
    logging.captureWarnings(True)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    else:
        torch.set_flush_denormal(True)  # LRP makes denormals; they slow CPUs badly
    if args.threads:
        torch.set_num_threads(args.threads)
    freed_memory_kept = args.malloc == "kept" and keep_freed_memory()
    dtype = torch.float64 if args.dtype == "float64" else torch.float32

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning: expected in a benchmark
        model, preprocessing = load_model(args.model)
    model = model.to(device=device, dtype=dtype).eval()
    size = tuple(preprocessing.size)
    photos = _load_photos(args.images, preprocessing, dtype) if args.images else None
    environment = _environment(args, device, size, dtype, freed_memory_kept)
    LOG.info("model %s on %s (%s, %s px), %d threads", args.model, device, environment["dtype"], size,
             environment["threads"])

    if args.soak:
        soak(args, model, device, size, dtype, photos, environment)
        return 0

    x0, x1, unique_images = make_pairs(args.pairs, args.shared_gallery, size, dtype, args.seed, photos)
    runner = Runner(args, model, device, x0, x1)
    if args.compare_ref:
        runner.ref_worker = RefWorker(args.compare_ref, args, x0, x1)
        runner.own_worker = RefWorker(None, args, x0, x1)
        environment["compare_ref"] = args.compare_ref
    summary = []
    status = 0
    try:
        for layers in args.layer_sets:
            for k_colors in args.k_colors:
                spp = measure_group(runner, layers, k_colors, args, unique_images, environment)
                summary.append({"layers": layers, "k_colors": k_colors,
                                "seconds_per_pair": {key: _round(value) for key, value in spp.items()}})
    except Interrupted:
        status = 124  # like timeout(1): the lines printed so far are complete, the run is not
    finally:
        for worker in (runner.ref_worker, runner.own_worker):
            if worker is not None:
                worker.close()
    record = {"bench": "pairx_engine", "mode": "summary", "model": args.model, "pairs": args.pairs,
              "reference_pairs": None if args.skip_reference else min(args.reference_pairs, args.pairs),
              "shared_gallery": args.shared_gallery, "groups": summary, **environment}
    if status:
        record["partial"] = True
    emit(record)
    return status


if __name__ == "__main__":
    sys.exit(main())
