"""One-pair-at-a-time PAIR-X, written as literally as the spec reads: the baseline.

Each image gets its own forward passes; relevance is propagated all the way to the input and
read at the layer; the pixel maps of one image are backward passes over one forward of that
image (retained graph), as the published code does. It is independent of the batched engine's
bookkeeping, so the tests compare the two and ``bench/engine.py`` reports it as the
published-style baseline. Passes per pair: 2 plain forwards (embeddings, no graph), 2 LRP
forwards with a full LRP backward each (layer relevance), 2 LRP forwards with ``k_colors``
backwards from the layer each (pixel maps). The published code makes the same LRP passes; its
embedding forwards keep a graph and it runs one ordinary backward through them for the seeds,
which this baseline skips, so it is slightly cheaper than the published code, never dearer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import EpsilonPlus

from .canonizers import select_canonizers
from .matching import reduce_channels


def explain_pair_reference(
    model: nn.Module,
    x0: torch.Tensor,
    x1: torch.Tensor,
    layer: str,
    k_colors: int = 10,
    *,
    channel_reduction: str = "abs_of_sum",
    canonizers: Sequence[Canonizer] | None = None,
    strict_lrp: bool = False,
) -> dict:
    """Explain one pair ``x0, x1`` ``(3, H, W)`` at one layer.

    Returns a dict with ``similarity``, ``relevance_0/1`` ``(h, w)``, ``matches`` (list of
    ``(cell_0, cell_1, distance, relevance)`` sorted by relevance), ``pixel_relevance_0/1``
    ``(k, H, W)``; numpy arrays in the input dtype.
    """
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        chosen = list(canonizers) if canonizers is not None else select_canonizers(model, strict=strict_lrp)
        composite = EpsilonPlus(canonizers=chosen)
        with torch.no_grad():
            e0, e1 = model(x0[None]), model(x1[None])
        with torch.enable_grad():
            a, b = e0.clone().requires_grad_(True), e1.clone().requires_grad_(True)
            similarity = torch.nn.functional.cosine_similarity(a, b).sum()
            seed_0, seed_1 = torch.autograd.grad(similarity, (a, b))

        maps, features = [], []
        for image, seed in ((x0, seed_0), (x1, seed_1)):
            relevance, feature = _layer_relevance(model, composite, image, layer, seed)
            maps.append(reduce_channels(relevance, channel_reduction))
            features.append(feature)
        matches = _brute_force_matches(features[0], features[1], maps[0], maps[1])
        pixel = [[], []]
        for side, image in enumerate((x0, x1)):
            cells = [match[side] for match in matches[:k_colors]]
            pixel[side] = _pixel_relevances(model, composite, image, layer, cells)
        height, width = x0.shape[1:]
        empty = np.zeros((0, height, width), dtype=x0.detach().numpy().dtype)
        return {
            "similarity": float(similarity.detach()),
            "relevance_0": maps[0].numpy(),
            "relevance_1": maps[1].numpy(),
            "matches": matches,
            "pixel_relevance_0": np.stack(pixel[0]) if pixel[0] else empty,
            "pixel_relevance_1": np.stack(pixel[1]) if pixel[1] else empty,
        }
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)


def _layer_relevance(model, composite, image, layer, seed):
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["out"] = output

    with composite.context(model) as modified, torch.enable_grad():
        handle = model.get_submodule(layer).register_forward_hook(keep)
        try:
            x = image[None].clone().requires_grad_(True)
            embedding = modified(x)
            embedding.backward(seed)
        finally:
            handle.remove()
    output = store["out"]
    return output.grad[0].detach(), output[0].detach()


def _pixel_relevances(model, composite, image, layer, cells):
    """``|sum_RGB R|`` ``(H, W)`` per cell: one forward of ``image``, one backward per cell."""
    if not cells:
        return []
    store = {}
    with composite.context(model) as modified, torch.enable_grad():
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(out=o))
        try:
            x = image[None].clone().requires_grad_(True)
            modified(x)
        finally:
            handle.remove()
        output = store["out"]
        _, channels, h, w = output.shape
        maps = []
        for i, cell in enumerate(cells):
            seed = torch.zeros_like(output)
            row, col = divmod(cell, w)
            seed[0, :, row, col] = output[0, :, row, col].detach()
            (grad,) = torch.autograd.grad(output, x, seed, retain_graph=i < len(cells) - 1)
            maps.append(grad[0].sum(0).abs().detach().numpy())
    return maps


def _brute_force_matches(feature_0, feature_1, map_0, map_1):
    """Cross-checked nearest neighbours with numpy, then sort by relevance product (stable)."""
    c, h, w = feature_0.shape
    d0 = feature_0.reshape(c, -1).T.numpy()
    d1 = feature_1.reshape(c, -1).T.numpy()
    distances = np.sqrt(((d0[:, None, :] - d1[None, :, :]) ** 2).sum(-1))
    forward, backward = distances.argmin(1), distances.argmin(0)
    flat_0, flat_1 = map_0.reshape(-1).numpy(), map_1.reshape(-1).numpy()
    matches = [
        (i, int(forward[i]), float(distances[i, forward[i]]), float(flat_0[i] * flat_1[forward[i]]))
        for i in range(len(forward))
        if backward[forward[i]] == i
    ]
    order = sorted(range(len(matches)), key=lambda m: -matches[m][3])
    return [matches[m] for m in order]
