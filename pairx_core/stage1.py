"""Stage 1 of re-ranking: PAIR-X without pixel maps, from a layer's activations.

Given the activations ``(N, C, h, w)`` of images at one layer (read from the activation cache),
compute for pairs of them what the engine computes with ``k_colors=0`` (spec steps 1-4): the
embeddings and their cosine similarity, the intermediate relevance at the layer under the same
composite and canonizers, the mutual matches ranked by relevance, and (via
:func:`pairx_core.metrics.plausibility`) the plausibility metrics. Only the network above the
layer runs (:mod:`pairx_core.split`); no image is needed.

Batching differs from the engine. A query that appears in several pairs (one upload against its
candidates, the usual case) is an *anchor*: it is forwarded once and its graph is kept while its
candidates are forwarded in chunks; each chunk's candidates get one relevance backward, and the
anchor one backward per chunk carrying the chunk's seeds at once (``is_grads_batched``). So ``P``
pairs of one query forward ``P + 1`` rows, not ``2 P``; the forward and the rules' modified
forwards are about half of a row's cost. This needs rules whose state lives in each forward's
graph (:func:`pairx_core.lrp.state_lives_with_graph`); with zennit's own hooks in the composite
(e.g. residual sums of a ResNet), and for the other pairs, each pair contributes two rows (its
query and its candidate activations) and one forward and ONE relevance backward of ``2 P`` rows
serve ``P`` pairs. Rows are independent in eval mode, so the numbers are the same up to float
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
from .lrp import EngineEpsilonPlus, denominators_in_forward, state_lives_with_graph
from .matching import matches_table, mutual_nearest_neighbours, rank_matches, reduce_channels
from .model_context import prepared_model
from .results import LayerExplanation, PairExplanation
from .split import SplitPlan, can_split, split_forward

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
    #: queries forwarded once for several pairs (see the module docstring)
    anchors: int = 0


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
            outputs of the network above ``layer`` (the only graph stage 1 keeps).

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
    channels_last = config.use_channels_last(target, dtype)
    with prepared_model(model, target, channels_last=channels_last):
        plan = can_split(model, layer, input_size, dtype, target)
        if plan is None:
            raise SplitUnsupportedError(f"{type(model).__name__} cannot be run from layer {layer!r} upward")
        probe = torch.zeros((1, 3, *input_size), dtype=dtype, device=target)
        chosen = (list(canonizers) if canonizers is not None
                  else select_canonizers(model, strict=config.strict_lrp, example_input=probe))
        composite = EngineEpsilonPlus(epsilon=config.epsilon, stabilizer=config.stabilizer, canonizers=chosen)
        # no pixel maps: the graph above the layer only, as for the engine at k_colors=0
        images = max_images_per_batch(model, probe, config.memory_budget, target, pixel_passes=False, above=layer)
        with composite.context(model):
            anchors = _anchor_groups(pair_array) if state_lives_with_graph(composite) else {}
        job = _Stage1Job(model, composite, plan, values, layer, tuple(input_size), config, target, stats,
                         channels_last)
        by_position: dict[int, PairExplanation] = {}
        chunk = min(batch_pairs, max(1, images - 1))  # the anchor's row stays in memory beside a chunk
        for anchor, positions in anchors.items():
            for result in _stage1_anchor(job, anchor, positions, pair_array[positions, 1], chunk):
                by_position[result.index] = result
        rest = np.array([p for p in range(len(pair_array)) if p not in by_position], dtype=np.int64)
        batch_pairs = min(batch_pairs, max(1, images // 2))
        for start in range(0, len(rest), batch_pairs):
            positions = rest[start:start + batch_pairs]
            for result in _stage1_batch(job, pair_array[positions], positions):
                by_position[result.index] = result
    return [by_position[p] for p in range(len(pair_array))]


def stage1_from_images(model: nn.Module, images: torch.Tensor, pairs, layer: str,
                       config: ExplainConfig = ExplainConfig(k_colors=0), *, device=None) -> list[PairExplanation]:
    """The full path for models that cannot be split: the engine with ``k_colors=0``."""
    return explain_indexed(model, images, pairs, [layer], replace(config, k_colors=0), device=device)


@dataclass(frozen=True)
class _Stage1Job:
    """What every batch of one :func:`stage1` call shares."""

    model: nn.Module
    composite: EngineEpsilonPlus
    plan: SplitPlan
    values: torch.Tensor  # (N, C, h, w) activations
    layer: str
    input_size: tuple[int, int]
    config: ExplainConfig
    device: torch.device
    stats: Stage1Stats
    #: the rows run channels-last, as the model's weights (``ExplainConfig.memory_format``)
    channels_last: bool = False

    def leaf(self, rows) -> torch.Tensor:
        """``(len(rows), C, h, w)`` activations on the device, the leaf of a split forward."""
        rows_on_device = self.values[torch.as_tensor(rows)].to(self.device).detach()
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return rows_on_device.clone(memory_format=layout).requires_grad_(True)

    def forward(self, leaf: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(R, D)`` of the rows of ``leaf`` (inside the composite's context)."""
        self.stats.rows_forwarded += leaf.shape[0]
        # each row gets one relevance backward: z+ denominators from the forward's outputs
        with denominators_in_forward():
            return split_forward(self.model, self.plan, leaf)


def _anchor_groups(pairs: np.ndarray) -> dict[int, np.ndarray]:
    """Queries (side 0) that appear in two pairs or more, with the positions of their pairs."""
    queries, counts = np.unique(pairs[:, 0], return_counts=True)
    return {int(q): np.flatnonzero(pairs[:, 0] == q) for q, n in zip(queries, counts) if n > 1}


def _stage1_batch(job: _Stage1Job, batch: np.ndarray, positions: np.ndarray) -> list[PairExplanation]:
    """Pairs ``batch`` ``(P, 2)`` as ``2 P`` rows: one forward, one relevance backward."""
    n = len(batch)
    leaf = job.leaf(np.concatenate([batch[:, 0], batch[:, 1]]))  # (2P, C, h, w)
    with job.composite.context(job.model), torch.enable_grad():
        embeddings = job.forward(leaf)
        similarity, seed_0, seed_1 = similarity_seeds(embeddings[:n], embeddings[n:])
        (relevance,) = torch.autograd.grad(embeddings, leaf, torch.cat([seed_0, seed_1]))
        job.stats.relevance_backwards += 1
    job.stats.batches += 1
    return _pair_results(job, relevance, leaf.detach(), similarity, embeddings, positions)


def _stage1_anchor(job: _Stage1Job, anchor: int, positions: np.ndarray, candidates: np.ndarray,
                   chunk: int) -> list[PairExplanation]:
    """One query against its candidates: the query forwarded once, its graph kept for all of them."""
    anchor_leaf = job.leaf([anchor])  # (1, C, h, w)
    results: list[PairExplanation] = []
    with job.composite.context(job.model), torch.enable_grad():
        anchor_embedding = job.forward(anchor_leaf)  # (1, D)
        job.stats.anchors += 1
        for start in range(0, len(candidates), chunk):
            rows = candidates[start:start + chunk]
            n, last = len(rows), start + chunk >= len(candidates)
            leaf = job.leaf(rows)  # (n, C, h, w)
            embeddings = job.forward(leaf)
            similarity, seed_0, seed_1 = similarity_seeds(anchor_embedding.expand(n, -1), embeddings)
            (candidate_relevance,) = torch.autograd.grad(embeddings, leaf, seed_1)
            if n == 1:
                (anchor_relevance,) = torch.autograd.grad(anchor_embedding, anchor_leaf, seed_0, retain_graph=not last)
            else:  # the chunk's n seeds of the anchor in one backward call: (n, 1, C, h, w)
                (anchor_relevance,) = torch.autograd.grad(anchor_embedding, anchor_leaf, seed_0.unsqueeze(1),
                                                          retain_graph=not last, is_grads_batched=True)
                anchor_relevance = anchor_relevance[:, 0]
            job.stats.relevance_backwards += 2
            job.stats.batches += 1
            features = torch.cat([anchor_leaf.detach().expand(n, -1, -1, -1), leaf.detach()])
            results.extend(_pair_results(
                job, torch.cat([anchor_relevance, candidate_relevance]), features, similarity,
                torch.cat([anchor_embedding.detach().expand(n, -1), embeddings]), positions[start:start + chunk],
            ))
    return results


def _pair_results(job: _Stage1Job, relevance: torch.Tensor, features: torch.Tensor, similarity: torch.Tensor,
                  embeddings: torch.Tensor, positions: np.ndarray) -> list[PairExplanation]:
    """Matches and results of ``P`` pairs from their ``2 P`` rows (queries first, then candidates):
    ``relevance`` and ``features`` ``(2P, C, h, w)``, ``similarity`` ``(P,)``, ``embeddings`` ``(2P, D)``."""
    layer, input_size, n = job.layer, job.input_size, len(positions)
    reduced = reduce_channels(relevance, job.config.channel_reduction)  # (2P, h, w)
    if not torch.isfinite(reduced).all():
        raise NumericalError(f"LRP relevance at layer {layer!r} is not finite (NaN or inf)")
    _, c, h, w = features.shape
    descriptors = features.reshape(2 * n, c, h * w).transpose(1, 2)  # (2P, hw, C)
    mnn = mutual_nearest_neighbours(descriptors[:n], descriptors[n:])  # on the host
    # one copy per array and batch (on a GPU, each small copy would be a synchronisation)
    reduced, similarity, embeddings = (to_host(t.detach()) for t in (reduced, similarity, embeddings))
    empty = np.zeros((0, *input_size), dtype=torch.empty((), dtype=features.dtype).numpy().dtype)
    results = []
    for p, (c0, c1, dist) in enumerate(mnn):
        ranked = rank_matches(c0, c1, dist, reduced[p], reduced[n + p])
        explanation = PairExplanation(index=int(positions[p]), similarity=float(similarity[p]),
                                      embedding_0=embeddings[p].numpy(),
                                      embedding_1=embeddings[n + p].numpy())
        explanation.layers[layer] = LayerExplanation(
            layer=layer, relevance_0=reduced[p].numpy(), relevance_1=reduced[n + p].numpy(),
            matches=matches_table(ranked, (h, w), input_size), pixel_relevance_0=empty, pixel_relevance_1=empty,
            feature_shape=(int(c), int(h), int(w)), input_size=tuple(input_size), k_lines=job.config.k_lines)
        results.append(explanation)
    return results
