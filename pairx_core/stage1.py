"""Stage 1 of re-ranking: PAIR-X without pixel maps, from a layer's activations.

Given the activations ``(N, C, h, w)`` of images at one layer (read from the activation cache),
compute for pairs of them what the engine computes with ``k_colors=0`` (spec steps 1-4): the
embeddings and their cosine similarity, the intermediate relevance at the layer under the same
composite and canonizers, the mutual matches ranked by relevance, and (via
:func:`pairx_core.metrics.plausibility`) the plausibility metrics. Only the network above the
layer runs (:mod:`pairx_core.split`); no image is needed.

Batching differs from the engine: each pair contributes two rows (its query and its candidate
activations), so one forward and ONE relevance backward of ``2 P`` rows serve ``P`` pairs, even
when one query appears in all of them (the engine would need one backward round per
appearance). Rows are independent in eval mode, so the numbers are the same up to float
rounding.

A model that cannot be split at the layer raises :class:`SplitUnsupportedError`; callers then
decode the images and use :func:`stage1_from_images` (the engine's full path, ``k_colors=0``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .batch_plan import max_images_per_batch
from .canonizers import select_canonizers
from .engine import ExplainConfig, explain_indexed, similarity_seeds, to_host
from .errors import ConfigError, NumericalError, PairXError, ShapeError
from .lrp import EngineEpsilonPlus
from .matching import matches_table, mutual_nearest_neighbours, rank_matches, reduce_channels
from .model_context import prepared_model
from .results import LayerExplanation, PairExplanation
from .split import can_split, split_forward

#: pairs per forward/backward of the upper network (2 rows each)
DEFAULT_STAGE1_BATCH = 16


class SplitUnsupportedError(PairXError):
    """The model cannot be run from this layer upward; use the full path (images needed)."""


@dataclass
class Stage1Stats:
    """Counters of one :func:`stage1` call (tests and benchmarks)."""

    batches: int = 0
    rows_forwarded: int = 0
    relevance_backwards: int = 0


def stage1(
    model: nn.Module,
    activations: torch.Tensor | np.ndarray,
    pairs: np.ndarray | Sequence[tuple[int, int]],
    layer: str,
    input_size: tuple[int, int],
    config: ExplainConfig = ExplainConfig(k_colors=0),
    *,
    batch_pairs: int = DEFAULT_STAGE1_BATCH,
    device: torch.device | str | None = None,
    canonizers=None,
    stats: Stage1Stats | None = None,
) -> list[PairExplanation]:
    """PAIR-X steps 1-4 for pairs of images given their activations at ``layer``.

    Args:
        model: the embedding model ``(B, 3, H, W) -> (B, D)``.
        activations: ``(N, C, h, w)`` outputs of ``layer`` for N images (float32 or float64;
            converted to the model's dtype).
        pairs: ``(P, 2)`` indices into ``activations``.
        layer: module name of the layer.
        input_size: ``(H, W)`` of the model input the activations came from (pixel positions of
            cells, and the split check's probe).
        config: ``k_lines``, ``channel_reduction``, ``strict_lrp``, ``epsilon``, ``stabilizer``
            are used; pixel maps are never computed.
        batch_pairs: most pairs per forward/backward; fewer when ``config.memory_budget`` (default:
            a share of the free memory) holds fewer images, estimated as for the engine from the
            whole model (an upper bound: stage 1 keeps only the graph above ``layer``).

    Returns:
        one :class:`PairExplanation` per pair (one layer, empty pixel maps), in order.

    Raises:
        SplitUnsupportedError: the model cannot be split at ``layer`` (see :func:`can_split`).
    """
    if batch_pairs < 1:
        raise ConfigError(f"batch_pairs must be >= 1, got {batch_pairs}")
    stats = stats if stats is not None else Stage1Stats()
    parameter = next(iter(model.parameters()))
    dtype = parameter.dtype
    target = torch.device(device) if device is not None else parameter.device
    values = torch.as_tensor(activations)
    if values.ndim != 4:
        raise ShapeError("activations", tuple(values.shape), "(N, C, h, w)")
    values = values.to(dtype)
    pair_array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if pair_array.size and (pair_array.min() < 0 or pair_array.max() >= values.shape[0]):
        raise ConfigError(f"pair indices must lie in [0, {values.shape[0]})")
    if len(pair_array) == 0:
        return []
    results: list[PairExplanation] = []
    with prepared_model(model, target):
        plan = can_split(model, layer, input_size, dtype, target)
        if plan is None:
            raise SplitUnsupportedError(f"{type(model).__name__} cannot be run from layer {layer!r} upward")
        probe = torch.zeros((1, 3, *input_size), dtype=dtype, device=target)
        chosen = (list(canonizers) if canonizers is not None
                  else select_canonizers(model, strict=config.strict_lrp, example_input=probe))
        composite = EngineEpsilonPlus(epsilon=config.epsilon, stabilizer=config.stabilizer, canonizers=chosen)
        # no pixel maps: the graph above the layer only, as for the engine at k_colors=0
        images = max_images_per_batch(model, probe, config.memory_budget, target, pixel_passes=False)
        batch_pairs = min(batch_pairs, max(1, images // 2))
        for start in range(0, len(pair_array), batch_pairs):
            batch = pair_array[start:start + batch_pairs]
            results.extend(_stage1_batch(model, composite, plan, values, batch, layer, input_size, config, target,
                                         stats, first_index=start))
    return results


def stage1_from_images(model: nn.Module, images: torch.Tensor, pairs, layer: str,
                       config: ExplainConfig = ExplainConfig(k_colors=0), *, device=None) -> list[PairExplanation]:
    """The full path for models that cannot be split: the engine with ``k_colors=0``."""
    return explain_indexed(model, images, pairs, [layer], replace(config, k_colors=0), device=device)


def _stage1_batch(model, composite, plan, values, batch, layer, input_size, config, device, stats,
                  first_index: int) -> list[PairExplanation]:
    n = len(batch)
    rows = torch.as_tensor(np.concatenate([batch[:, 0], batch[:, 1]]))
    leaf = values[rows].to(device).detach().clone().requires_grad_(True)  # (2P, C, h, w)
    with composite.context(model), torch.enable_grad():
        embeddings = split_forward(model, plan, leaf)
        stats.rows_forwarded += leaf.shape[0]
        similarity, seed_0, seed_1 = similarity_seeds(embeddings[:n], embeddings[n:])
        (relevance,) = torch.autograd.grad(embeddings, leaf, torch.cat([seed_0, seed_1]))
        stats.relevance_backwards += 1
    stats.batches += 1
    reduced = reduce_channels(relevance, config.channel_reduction)  # (2P, h, w)
    if not torch.isfinite(reduced).all():
        raise NumericalError(f"LRP relevance at layer {layer!r} is not finite (NaN or inf)")
    fm = leaf.detach()
    _, c, h, w = fm.shape
    descriptors = fm.reshape(2 * n, c, h * w).transpose(1, 2)  # (2P, hw, C)
    mnn = mutual_nearest_neighbours(descriptors[:n], descriptors[n:])  # on the host
    # one copy per array and batch (on a GPU, each small copy would be a synchronisation)
    reduced, similarity, embeddings = (to_host(t.detach()) for t in (reduced, similarity, embeddings))
    empty = np.zeros((0, *input_size), dtype=torch.empty((), dtype=fm.dtype).numpy().dtype)
    results = []
    for p, (c0, c1, dist) in enumerate(mnn):
        ranked = rank_matches(c0, c1, dist, reduced[p], reduced[n + p])
        explanation = PairExplanation(index=first_index + p, similarity=float(similarity[p]),
                                      embedding_0=embeddings[p].numpy(),
                                      embedding_1=embeddings[n + p].numpy())
        explanation.layers[layer] = LayerExplanation(
            layer=layer, relevance_0=reduced[p].numpy(), relevance_1=reduced[n + p].numpy(),
            matches=matches_table(ranked, (h, w), input_size), pixel_relevance_0=empty, pixel_relevance_1=empty,
            feature_shape=(int(c), int(h), int(w)), input_size=tuple(input_size), k_lines=config.k_lines)
        results.append(explanation)
    return results
