"""Batched PAIR-X: one forward pass of a batch's unique images serves every step of the spec.

Per batch of pairs (the PAIR-X steps 1-5 of ``docs/engine.md``):

1. one forward of the batch's unique images under the LRP composite gives embeddings and the
   requested feature maps. The deepest requested layer's output is replaced by a detached leaf,
   so the part of the graph above it serves only the relevance backward and is freed after it;
   with ``k_colors=0`` the graph starts at the shallowest requested layer (nothing below needs one).
2. seeds ``d cos(e0, e1) / d e_i`` are computed analytically on the embeddings; relevance is
   pulled back only as far as the deepest layer (``torch.autograd.grad``), then from there to the
   shallower layers. An image that appears in several pairs of the batch gets one backward
   "round" per appearance; every round carries one seed for every image at once.
3. matching (mutual nearest neighbours over ``torch.cdist``) and ranking run on the device.
4. pixel maps: backward passes from the layer to the input over the retained lower graph; the
   j-th pass carries the j-th requested (image, cell) of every image at once. Pixel maps depend
   on (image, cell) only, so a cell shared by several pairs is computed once.

Numbers equal the one-pair-at-a-time computation (``pairx_core.reference``) to float tolerance.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from zennit.canonizers import Canonizer

from .batch_plan import inference_batch_size, max_images_per_batch, plan_batches
from .canonizers import select_canonizers
from .config import (
    ChannelReduction,
    EngineStats,
    ExplainConfig,
    MemoryFormat,
    ProgressCallback,
    resolve_config,
    runs_channels_last,
)
from .errors import ConfigError, NumericalError, ShapeError
from .layer_plan import LayerPlan, capture_hook, plan_layers
from .layers import check_layer_names
from .lrp import EngineEpsilonPlus, reuse_modified_forwards, windowed_relevance
from .matching import matches_table, mutual_nearest_neighbours, rank_matches, reduce_channels
from .model_context import prepared_model, resolve_device
from .results import LayerExplanation, PairExplanation

__all__ = [
    "ChannelReduction", "EngineStats", "ExplainConfig", "MemoryFormat", "ProgressCallback",
    "embed", "explain", "explain_indexed", "similarity_seeds",
]


# ------------------------------------------------------------------------------------ public API
def explain(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, layers: str | Sequence[str],
            config: ExplainConfig | None = None, *, device: torch.device | str | None = None,
            canonizers: Sequence[Canonizer] | None = None, progress: ProgressCallback | None = None,
            stats: EngineStats | None = None, **settings: Any) -> list[PairExplanation]:
    """Explain pairs ``(x0[i], x1[i])`` with PAIR-X.

    Args:
        model: any module mapping ``(B, 3, H, W)`` images to ``(B, D)`` embeddings.
        x0, x1: preprocessed images ``(P, 3, H, W)``; dtype is kept (float64 stays float64).
        layers: module name(s) (``model.get_submodule``) whose outputs ``(B, C, h, w)`` are matched.
        config: what to compute (:class:`ExplainConfig`; default: its defaults).
        device: where to compute (default: the model's device). The model is moved there for
            the call and moved back afterwards.
        canonizers: zennit canonizers to use instead of the automatic choice (an empty list
            means "the model is LRP-ready as it is").
        progress: called with ``(pairs_done, pairs_total)`` after each batch.
        stats: filled with pass counts and peak memory when given.
        **settings: :class:`ExplainConfig` fields overriding ``config``'s, e.g.
            ``explain(model, x0, x1, layer, k_colors=0, batch_size=8, epsilon=1e-9)``.

    Returns:
        one :class:`PairExplanation` per pair, in input order. Identical images (by content) are
        forwarded once.
    """
    _check_images("x0", x0)
    _check_images("x1", x1)
    if x0.shape != x1.shape:
        raise ShapeError("x1", tuple(x1.shape), f"same as x0 {tuple(x0.shape)}")
    images, pair_index = _deduplicate(x0, x1)
    return explain_indexed(model, images, pair_index, layers, config, device=device, canonizers=canonizers,
                           progress=progress, stats=stats, **settings)


def explain_indexed(
    model: nn.Module,
    images: torch.Tensor,
    pairs: torch.Tensor | np.ndarray | Sequence[tuple[int, int]],
    layers: str | Sequence[str],
    config: ExplainConfig | None = None,
    *,
    device: torch.device | str | None = None,
    canonizers: Sequence[Canonizer] | None = None,
    progress: ProgressCallback | None = None,
    stats: EngineStats | None = None,
    on_batch: Callable[[list[PairExplanation]], None] | None = None,
    **settings: Any,
) -> list[PairExplanation]:
    """Explain pairs given as indices into a set of unique images.

    Args:
        images: ``(N, 3, H, W)`` preprocessed images (each forwarded once per batch it serves).
        pairs: ``(P, 2)`` integer indices into ``images``.
        layers, config, device, canonizers, progress, stats, settings: as for :func:`explain`.
        on_batch: called with each batch's results (``result.index``: the row of ``pairs``) as
            soon as the batch is done, before the next batch starts; the caller may hand them to
            another thread (e.g. to draw pictures while the next batch computes).

    Returns:
        one :class:`PairExplanation` per row of ``pairs``, in order.
    """
    config = resolve_config(config, settings)
    _check_images("images", images)
    pair_array = _pair_array(pairs, images.shape[0])
    layer_names = _layer_names(model, layers)
    if images.dtype != next(iter(model.parameters()), images).dtype:
        raise ConfigError(
            f"images are {images.dtype} but the model's parameters are "
            f"{next(iter(model.parameters())).dtype}; convert one of them"
        )
    stats = stats if stats is not None else EngineStats()
    if len(pair_array) == 0:
        return []

    target = resolve_device(model, device)
    chosen = (list(canonizers) if canonizers is not None
              else select_canonizers(model, strict=config.strict_lrp, example_input=images[:1]))
    composite = EngineEpsilonPlus(epsilon=config.epsilon, stabilizer=config.stabilizer, canonizers=chosen)

    results: list[PairExplanation | None] = [None] * len(pair_array)
    with prepared_model(model, target, channels_last=config.use_channels_last(target, images.dtype)):
        probe = images[:1].to(target)
        plan = plan_layers(model, probe, layer_names)
        max_images = max_images_per_batch(model, probe, config.memory_budget, target, pixel_passes=config.k_colors > 0)
        done = 0
        batches = list(plan_batches(pair_array, config.batch_size, max_images))
        memo = PixelMapMemo([pair_array[b] for b in batches])
        for batch_index, batch_pairs in enumerate(batches):
            batch_results = _explain_batch(
                model, composite, images, pair_array[batch_pairs], plan, config, target, stats, memo, batch_index
            )
            for position, result in zip(batch_pairs, batch_results):
                result.index = int(position)
                results[position] = result
            done += len(batch_pairs)
            if on_batch is not None:
                on_batch(batch_results)
            if progress is not None:
                progress(done, len(pair_array))
    return [r for r in results if r is not None]


def embed(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str] = (),
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    memory_format: MemoryFormat = "auto",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Plain inference: embeddings ``(N, D)`` and the requested feature maps ``(N, C, h, w)`` of
    ``images`` ``(N, 3, H, W)``, ``batch_size`` images per forward (default:
    :func:`pairx_core.batch_plan.inference_batch_size`: 32, fewer on the CPU for large inputs).
    ``memory_format`` as for :class:`ExplainConfig` (``auto``: channels-last for float32 on the
    CPU, 7-10 % faster at 440 px); the arrays returned are C-contiguous either way."""
    _check_images("images", images)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    target = resolve_device(model, device)
    dtype = next(iter(model.parameters())).dtype
    layout = torch.channels_last if runs_channels_last(memory_format, target, dtype) else torch.contiguous_format
    features: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    embeddings: list[np.ndarray] = []
    captured: dict[str, torch.Tensor] = {}
    handles = []
    with prepared_model(model, target, channels_last=layout == torch.channels_last):
        if batch_size is None:
            batch_size = inference_batch_size(model, tuple(images.shape[-2:]), target)
        try:
            for name in layers:
                handles.append(model.get_submodule(name).register_forward_hook(capture_hook(captured, name)))
            with torch.inference_mode():
                for start in range(0, images.shape[0], batch_size):
                    chunk = images[start:start + batch_size].to(target, non_blocking=True)
                    embeddings.append(model(chunk.contiguous(memory_format=layout)).to("cpu").numpy())
                    for name in layers:
                        features[name].append(captured[name].to("cpu").contiguous().numpy())
        finally:
            for handle in handles:
                handle.remove()
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, 0))
    return emb, {name: np.concatenate(parts) for name, parts in features.items()}


# ----------------------------------------------------------------------------------- internals
def _check_images(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ShapeError(name, (), "(N, 3, H, W) torch.Tensor")
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ShapeError(name, tuple(tensor.shape), "(N, 3, H, W)")
    if not tensor.is_floating_point():
        raise ShapeError(name, tuple(tensor.shape), "(N, 3, H, W) floating point")


def _pair_array(pairs, n_images: int) -> np.ndarray:
    """``(P, 2)`` int64 indices, checked to lie in ``[0, n_images)``."""
    pair_array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2) if len(pairs) else np.zeros((0, 2), np.int64)
    if pair_array.size and (pair_array.min() < 0 or pair_array.max() >= n_images):
        raise ConfigError(f"pair indices must lie in [0, {n_images}), got {pair_array.min()}..{pair_array.max()}")
    return pair_array


def _layer_names(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The requested layer names, checked to be distinct modules of ``model``."""
    layer_names = [layers] if isinstance(layers, str) else list(layers)
    if not layer_names:
        raise ConfigError("at least one layer is required")
    if len(set(layer_names)) != len(layer_names):
        raise ConfigError(f"duplicate layer names in {layer_names}")
    check_layer_names(model, layer_names)  # LayerError with the nearest names
    return layer_names


def _deduplicate(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Unique images of both sides ``(N, 3, H, W)`` and ``(P, 2)`` indices into them."""
    stacked = torch.cat([x0, x1])
    host = stacked.detach().to("cpu").contiguous()
    first_seen: dict[bytes, int] = {}
    keep: list[int] = []
    index = np.empty(stacked.shape[0], dtype=np.int64)
    for i in range(stacked.shape[0]):
        digest = hashlib.blake2b(host[i].numpy().tobytes(), digest_size=16).digest()
        if digest not in first_seen:
            first_seen[digest] = len(keep)
            keep.append(i)
        index[i] = first_seen[digest]
    pairs = np.stack([index[: x0.shape[0]], index[x0.shape[0]:]], axis=1)
    return stacked[keep], pairs


def _rounds(slots: Sequence[int]) -> list[list[int]]:
    """Split positions so that within a round each image index appears at most once.

    ``slots[i]`` is the image of request ``i``; returns rounds of request positions.
    """
    rounds: list[list[int]] = []
    seen_count: dict[int, int] = {}
    for position, image in enumerate(slots):
        r = seen_count.get(image, 0)
        seen_count[image] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(position)
    return rounds


def similarity_seeds(e0: torch.Tensor, e1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities ``(P,)`` and their gradients w.r.t. each side ``(P, D)`` (analytic)."""
    with torch.enable_grad():
        a = e0.detach().clone().requires_grad_(True)
        b = e1.detach().clone().requires_grad_(True)
        similarity = torch.nn.functional.cosine_similarity(a, b, dim=1)
        grad_a, grad_b = torch.autograd.grad(similarity.sum(), (a, b))
    return similarity.detach(), grad_a, grad_b


class PixelMapMemo:
    """Pixel maps kept from one batch of an :func:`explain_indexed` call for its later batches.

    A pixel map depends on its image, layer and cell only (spec step 5: the seed is the image's own
    feature vector at the cell), not on the pair: an upload explained against several candidates
    in separate batches (the CPU's memory plan at real size) needs the maps of the cells its pairs
    share once. A map is kept only while a later batch still has its image.

    Args:
        batches: per batch, its ``(P, 2)`` pairs as indices into the call's images.
    """

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._last_batch: dict[int, int] = {}
        for index, pairs in enumerate(batches):
            for image in np.unique(pairs).tolist():
                self._last_batch[image] = index
        self._maps: dict[int, dict[tuple[str, int], torch.Tensor]] = {}  # image -> (layer, cell) -> (H, W)
        self._batch = -1
        self._images: list[int] = []

    def start_batch(self, index: int, unique_ids: np.ndarray) -> None:
        """Batch ``index`` begins; its local image ``i`` is the call's image ``unique_ids[i]``."""
        self._batch, self._images = index, [int(i) for i in unique_ids]
        self._maps = {image: maps for image, maps in self._maps.items() if self._last_batch[image] >= index}

    def known(self, layer: str) -> dict[tuple[int, int], torch.Tensor]:
        """``(local image, cell) -> (H, W)`` maps at ``layer`` that earlier batches computed."""
        return {(local, cell): value for local, image in enumerate(self._images)
                for (kept_layer, cell), value in self._maps.get(image, {}).items() if kept_layer == layer}

    def remember(self, layer: str, maps: Mapping[tuple[int, int], torch.Tensor]) -> None:
        """Keep this batch's maps ``(local image, cell) -> (H, W)`` whose image a later batch has."""
        for (local, cell), value in maps.items():
            image = self._images[local]
            kept = self._maps.setdefault(image, {}) if self._last_batch.get(image, -1) > self._batch else None
            if kept is not None and (layer, cell) not in kept:
                kept[(layer, cell)] = value.clone()  # a copy: the map is a view of the batch's block of maps


def _explain_batch(
    model: nn.Module,
    composite: EngineEpsilonPlus,
    images: torch.Tensor,
    pairs: np.ndarray,
    plan: LayerPlan,
    config: ExplainConfig,
    device: torch.device,
    stats: EngineStats,
    earlier: PixelMapMemo,
    batch_index: int,
) -> list[PairExplanation]:
    """Explain batch ``batch_index`` of pairs (indices into ``images``) with a single forward pass;
    pixel maps that ``earlier`` batches computed are taken from there."""
    unique_ids, local = np.unique(pairs.reshape(-1), return_inverse=True)
    earlier.start_batch(batch_index, unique_ids)
    local_pairs = local.reshape(-1, 2)
    need_pixels = config.k_colors > 0
    x = images[torch.as_tensor(unique_ids)].to(device, non_blocking=True)
    if config.use_channels_last(device, x.dtype):  # the model's weights were switched alike
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    feature_maps: dict[str, torch.Tensor] = {}  # attached outputs (graph below, if any)
    split_leaf: dict[str, torch.Tensor] = {}

    def layer_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not need_pixels and name == plan.shallowest:
                output = output.detach().requires_grad_(True)  # the graph starts here
            feature_maps[name] = output
            if name == plan.deepest:
                leaf = output.detach().requires_grad_(True)  # the graph above starts here
                split_leaf[name] = leaf
                return leaf
            return output if not need_pixels and name == plan.shallowest else None

        return hook

    with composite.context(model) as modified, torch.enable_grad(), _autocast(config, device):
        # registered after zennit's hooks, so a rule on the layer module itself still sees the
        # attached output before it is swapped for the leaf
        handles = [model.get_submodule(name).register_forward_hook(layer_hook(name)) for name in plan.ordered]
        try:
            x.requires_grad_(need_pixels)
            embeddings = modified(x)
        finally:
            for handle in handles:
                handle.remove()
        stats.forward_passes += 1
        stats.images_forwarded += x.shape[0]
        results = _relevance_and_matches(
            embeddings, x, feature_maps, split_leaf[plan.deepest], local_pairs, plan, config, stats, earlier
        )
    if device.type == "cuda":
        stats.peak_memory_bytes = max(stats.peak_memory_bytes, torch.cuda.max_memory_allocated(device))
    stats.batches += 1
    stats.images_per_batch.append(int(x.shape[0]))
    return results


def _autocast(config: ExplainConfig, device: torch.device):
    """``torch.autocast`` for ``config.autocast`` (the forward and every backward of a batch)."""
    if config.autocast == "bfloat16":
        if device.type != "cpu":
            # measured on an H200: the direct rules' convolution_backward is outside autocast's
            # coverage and fails on a bfloat16 input with float32 weights
            raise ConfigError(f"autocast='bfloat16' is supported on the CPU only, not on {device.type}")
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _relevance_and_matches(
    embeddings: torch.Tensor,
    x: torch.Tensor,
    feature_maps: dict[str, torch.Tensor],
    leaf: torch.Tensor,
    pairs: np.ndarray,
    plan: LayerPlan,
    config: ExplainConfig,
    stats: EngineStats,
    earlier: PixelMapMemo,
) -> list[PairExplanation]:
    """Spec steps 2-5 for one batch: relevance, matches, pixel maps, host-side results.

    Args:
        embeddings: ``(B, D)`` of the batch's unique images ``x`` ``(B, 3, H, W)``.
        feature_maps: the layers' outputs ``(B, C, h, w)`` with their graphs.
        leaf: the deepest layer's output as the leaf the upper graph starts from.
        pairs: ``(P, 2)`` indices into the batch's images.
        earlier: pixel maps earlier batches computed (not computed again), and where to keep
            this batch's for later ones.
    """
    pair_t = torch.as_tensor(pairs, device=embeddings.device)
    e0, e1 = embeddings[pair_t[:, 0]], embeddings[pair_t[:, 1]]
    similarity, seed_0, seed_1 = similarity_seeds(e0, e1)
    relevance = _layer_relevance(embeddings, feature_maps, leaf, pairs, torch.cat([seed_0, seed_1]), plan, config,
                                 stats)
    # results travel to the host once per batch and array (not per pair): on a GPU every small
    # copy is a synchronisation that leaves the device idle while Python prepares the next step
    relevance = {name: to_host(maps) for name, maps in relevance.items()}
    ranked = {name: _ranked_matches(feature_maps[name], pair_t, relevance[name]) for name in plan.ordered}
    pixel_maps: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    if config.k_colors > 0:
        # grouped passes (is_grads_batched) carry batched tensors, whose rectangles are not looked for
        windows = windowed_relevance() if config.pixel_pass_group == 1 else contextlib.nullcontext()
        with reuse_modified_forwards(), windows:
            for name in plan.ordered:
                pixel_maps[name] = _pixel_maps(x, feature_maps[name], ranked[name], pairs, config.k_colors, stats,
                                               config.pixel_pass_group, earlier.known(name))
                earlier.remember(name, pixel_maps[name])
    similarity, e0, e1 = (to_host(t.detach()) for t in (similarity, e0, e1))
    results = []
    for p in range(pairs.shape[0]):
        explanation = PairExplanation(
            index=p,
            similarity=float(similarity[p]),
            embedding_0=e0[p].numpy(),
            embedding_1=e1[p].numpy(),
        )
        for name in plan.ordered:
            explanation.layers[name] = _layer_explanation(
                name, feature_maps[name], x, ranked[name][p], relevance[name][p], pixel_maps.get(name, {}),
                tuple(int(i) for i in pairs[p]), config,
            )
        results.append(explanation)
    return results


def _layer_relevance(
    embeddings: torch.Tensor,
    feature_maps: dict[str, torch.Tensor],
    leaf: torch.Tensor,
    pairs: np.ndarray,
    seeds: torch.Tensor,
    plan: LayerPlan,
    config: ExplainConfig,
    stats: EngineStats,
) -> dict[str, torch.Tensor]:
    """Channel-reduced relevance ``(P, 2, h, w)`` per layer, per (pair, side).

    ``seeds`` ``(2 P, D)`` holds side 0 of every pair, then side 1. An image appearing several
    times gets one backward round per appearance; each round carries one seed per image.
    """
    n_pairs = pairs.shape[0]
    requests = [(p, side, int(pairs[p, side])) for p in range(n_pairs) for side in (0, 1)]
    rounds = _rounds([image for _, _, image in requests])
    relevance: dict[str, torch.Tensor] = {}
    shallower = [name for name in plan.ordered if name != plan.deepest]
    for r, positions in enumerate(rounds):
        seed = torch.zeros_like(embeddings)
        for position in positions:
            p, side, image = requests[position]
            seed[image] = seeds[p + side * n_pairs]
        (relevance_deep,) = torch.autograd.grad(embeddings, leaf, seed, retain_graph=r < len(rounds) - 1)
        stats.relevance_backwards += 1
        per_layer = {plan.deepest: relevance_deep}
        if shallower:
            grads = torch.autograd.grad(
                feature_maps[plan.deepest], [feature_maps[n] for n in shallower], relevance_deep, retain_graph=True
            )
            per_layer.update(zip(shallower, grads))
        for name, channel_relevance in per_layer.items():
            reduced = reduce_channels(channel_relevance, config.channel_reduction)  # (B, h, w)
            store = relevance.setdefault(
                name, torch.zeros((n_pairs, 2, *reduced.shape[1:]), device=reduced.device,
                                  dtype=torch.promote_types(reduced.dtype, torch.float32))  # autocast: float32
            )
            for position in positions:
                p, side, image = requests[position]
                store[p, side] = reduced[image]
    for name, maps in relevance.items():
        if not torch.isfinite(maps).all():
            raise NumericalError(f"LRP relevance at layer {name!r} is not finite (NaN or inf)")
    return relevance


def _ranked_matches(feature_map: torch.Tensor, pair_t: torch.Tensor, relevance: torch.Tensor) -> list:
    """Mutual nearest neighbours of each pair's cells, ranked by relevance (one list per pair).

    ``feature_map`` ``(B, C, h, w)``, ``pair_t`` ``(P, 2)``, ``relevance`` ``(P, 2, h, w)`` on the
    CPU; the matches come back on the CPU.
    """
    fm = feature_map.detach()
    b, c, h, w = fm.shape
    descriptors = fm.reshape(b, c, h * w).transpose(1, 2)  # (B, hw, C)
    mnn = mutual_nearest_neighbours(descriptors[pair_t[:, 0]], descriptors[pair_t[:, 1]])
    return [rank_matches(c0, c1, dist, relevance[p, 0], relevance[p, 1]) for p, (c0, c1, dist) in enumerate(mnn)]


def _layer_explanation(
    name: str,
    feature_map: torch.Tensor,
    x: torch.Tensor,
    matches,
    relevance: torch.Tensor,
    pixel_maps: dict[tuple[int, int], torch.Tensor],
    images: tuple[int, int],
    config: ExplainConfig,
) -> LayerExplanation:
    """One pair's result at one layer, on the host (``relevance`` ``(2, h, w)`` and the pixel maps
    already there)."""
    input_size = (int(x.shape[2]), int(x.shape[3]))
    grid = (int(feature_map.shape[2]), int(feature_map.shape[3]))
    k = min(config.k_colors, len(matches))

    def pixels(image: int, cells: torch.Tensor) -> np.ndarray:
        if not k:
            return np.zeros((0, *input_size), dtype=_numpy_dtype(x))
        return torch.stack([pixel_maps[(image, int(c))] for c in cells[:k]]).numpy()

    return LayerExplanation(
        layer=name,
        relevance_0=relevance[0].numpy(),
        relevance_1=relevance[1].numpy(),
        matches=matches_table(matches, grid, input_size),
        pixel_relevance_0=pixels(images[0], matches.cell_0),
        pixel_relevance_1=pixels(images[1], matches.cell_1),
        feature_shape=(int(feature_map.shape[1]), *grid),
        input_size=input_size,
        k_lines=config.k_lines,
    )


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, half-precision values (autocast) as float32.

    From a GPU through page-locked memory: a copy into pageable memory runs at a fraction of the
    bus's speed (140 ms for a batch's 190 MB of pixel maps on an H200).
    """
    if tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
    else:
        host = tensor.cpu()
    return host.float() if host.dtype in (torch.bfloat16, torch.float16) else host


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def _pixel_maps(
    x: torch.Tensor,
    feature_map: torch.Tensor,
    ranked: list,
    pairs: np.ndarray,
    k_colors: int,
    stats: EngineStats,
    group: int = 1,
    known: Mapping[tuple[int, int], torch.Tensor] | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """``|sum_RGB R|`` ``(H, W)`` for every (image, cell) among the pairs' top ``k_colors`` matches.

    The j-th backward pass carries the j-th distinct cell of every image at once; ``group``
    passes share one backward call (their seeds stacked, ``is_grads_batched``). Maps in ``known``
    (by ``(image, cell)``) are taken as they are.
    """
    known = known or {}
    cells_per_image: dict[int, list[int]] = {}
    reused: dict[tuple[int, int], torch.Tensor] = {}
    for p, matches in enumerate(ranked):
        k = min(k_colors, len(matches))
        for side, cells in ((0, matches.cell_0[:k]), (1, matches.cell_1[:k])):
            image = int(pairs[p, side])
            wanted = cells_per_image.setdefault(image, [])
            for cell in cells.tolist():
                if (image, cell) in known:
                    reused[(image, cell)] = known[(image, cell)]
                elif cell not in wanted:
                    wanted.append(cell)
    stats.pixel_maps_reused += len(reused)
    stats.pixel_maps_computed += sum(len(cells) for cells in cells_per_image.values())
    n_passes = max((len(c) for c in cells_per_image.values()), default=0)
    w = feature_map.shape[-1]
    values = feature_map.detach()
    reduced_groups: list[torch.Tensor] = []  # per group of passes (passes, B, H, W), on the device
    active_passes: list[list[tuple[int, int]]] = []
    for first in range(0, n_passes, group):
        passes = range(first, min(first + group, n_passes))
        # same memory format as the feature map (channels-last stays so): a contiguous seed would
        # make every backward operation below it mix formats, which is several times slower
        seeds = [torch.zeros_like(values) for _ in passes]
        active = [[(image, cells[j]) for image, cells in cells_per_image.items() if j < len(cells)] for j in passes]
        for seed, cells in zip(seeds, active):
            for image, cell in cells:
                row, col = divmod(cell, w)
                seed[image, :, row, col] = values[image, :, row, col]
        if len(seeds) == 1:
            grads = torch.autograd.grad(feature_map, x, seeds[0], retain_graph=True)[0].unsqueeze(0)
        else:
            grads = torch.autograd.grad(feature_map, x, torch.stack(seeds), retain_graph=True,
                                        is_grads_batched=True)[0]  # (passes, B, 3, H, W)
        stats.pixel_backwards += len(seeds)
        reduced_groups.append(grads.sum(dim=2).abs())  # (passes, B, H, W)
        active_passes.extend(active)
    if not reduced_groups:
        return reused
    # on a GPU: all passes in one copy and one synchronisation
    host = to_host(torch.cat(reduced_groups))
    if not torch.isfinite(host).all():
        raise NumericalError("LRP pixel relevance is not finite (NaN or inf)")
    computed = {(image, cell): host[j, image] for j, active in enumerate(active_passes) for image, cell in active}
    return {**reused, **computed}
