"""Feature-map matching and ranking (spec steps 3-4), batched over pairs: distances on the tensors'
device, the per-pair selection and ranking on the host."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import cell_index_centres


@dataclass
class Matches:
    """Mutual nearest-neighbour matches of one pair at one layer, sorted by relevance (descending).

    All tensors have shape ``(M,)``; cells are flat indices ``row * w + col`` of the ``(h, w)`` grid.
    """

    cell_0: torch.Tensor
    cell_1: torch.Tensor
    distance: torch.Tensor
    relevance: torch.Tensor

    def __len__(self) -> int:
        return int(self.cell_0.shape[0])


def reduce_channels(relevance: torch.Tensor, mode: str) -> torch.Tensor:
    """Channel relevance ``(..., C, h, w)`` -> map ``(..., h, w)``.

    ``abs_of_sum`` (published default): ``|sum_c R|``; ``sum_of_abs`` (later fork): ``sum_c |R|``.
    """
    if mode == "abs_of_sum":
        return relevance.sum(dim=-3).abs()
    if mode == "sum_of_abs":
        return relevance.abs().sum(dim=-3)
    raise ValueError(f"unknown channel_reduction {mode!r}")


def mutual_nearest_neighbours(
    descriptors_0: torch.Tensor, descriptors_1: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Cross-checked L2 nearest neighbours for a batch of pairs.

    The distances are computed on the descriptors' device; the (small) per-pair selection runs on
    the host after one transfer per array, so a batch costs three device-to-host copies instead
    of two synchronisations per pair.

    Args:
        descriptors_0, descriptors_1: ``(P, N, C)`` cell descriptors of image 0 and image 1.

    Returns:
        per pair ``(cells_0, cells_1, distance)``, each ``(M,)`` on the CPU, in increasing
        ``cells_0`` order.
    """
    # Exact distances (no |a|^2 + |b|^2 - 2ab shortcut): near-ties must resolve as they would
    # with a brute-force matcher, or top-k match sets drift between float32 runs.
    distances = torch.cdist(descriptors_0, descriptors_1, compute_mode="donot_use_mm_for_euclid_dist")
    nearest_01 = distances.argmin(dim=2)  # (P, N0)
    nearest_10 = distances.argmin(dim=1)  # (P, N1)
    back = torch.gather(nearest_10, 1, nearest_01)  # (P, N0)
    nearest_distance = torch.gather(distances, 2, nearest_01.unsqueeze(2)).squeeze(2)  # (P, N0)
    nearest_01, back, nearest_distance = (t.cpu() for t in (nearest_01, back, nearest_distance))
    cells_0 = torch.arange(descriptors_0.shape[1])
    mutual = back == cells_0.unsqueeze(0)
    results = []
    for p in range(descriptors_0.shape[0]):
        keep = mutual[p]
        results.append((cells_0[keep], nearest_01[p][keep], nearest_distance[p][keep]))
    return results


def rank_matches(
    cells_0: torch.Tensor,
    cells_1: torch.Tensor,
    distance: torch.Tensor,
    relevance_map_0: torch.Tensor,
    relevance_map_1: torch.Tensor,
) -> Matches:
    """Sort matches by ``R0(cell_0) * R1(cell_1)``, descending (stable: ties keep cell order).

    Args:
        relevance_map_0, relevance_map_1: ``(h, w)`` reduced relevance maps, on the cells' device
            (the CPU, as :func:`mutual_nearest_neighbours` returns them).
    """
    score = relevance_map_0.reshape(-1)[cells_0] * relevance_map_1.reshape(-1)[cells_1]
    order = torch.sort(score, descending=True, stable=True).indices
    return Matches(cells_0[order], cells_1[order], distance[order], score[order])


def cell_centres(cells: torch.Tensor, grid: tuple[int, int],
                 input_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``(x, y)`` of flat cell indices ``(M,)`` on an ``(h, w)`` grid over an ``(H, W)`` input.

    Tensor front of :func:`pairx_core.geometry.cell_index_centres` (its pixel convention):
    ``(M,)`` float64 CPU tensors each.
    """
    xy = cell_index_centres(cells.detach().cpu().numpy(), grid, input_size)
    return torch.from_numpy(np.ascontiguousarray(xy[:, 0])), torch.from_numpy(np.ascontiguousarray(xy[:, 1]))


def matches_table(matches: Matches, grid: tuple[int, int], input_size: tuple[int, int]):
    """The matches table (``pairx_core.results.MATCH_COLUMNS``) of ranked matches on an ``(h, w)``
    grid over an ``(H, W)`` input; cell centres in the input's pixels (:mod:`pairx_core.geometry`)."""
    from .results import matches_frame

    w = grid[1]
    x_0, y_0 = cell_centres(matches.cell_0, grid, input_size)
    x_1, y_1 = cell_centres(matches.cell_1, grid, input_size)
    cells_0 = matches.cell_0.cpu().numpy()
    cells_1 = matches.cell_1.cpu().numpy()
    return matches_frame({
        "rank": np.arange(len(cells_0)), "row_0": cells_0 // w, "col_0": cells_0 % w,
        "row_1": cells_1 // w, "col_1": cells_1 % w,
        "x_0": x_0.numpy(), "y_0": y_0.numpy(), "x_1": x_1.numpy(), "y_1": y_1.numpy(),
        "distance": matches.distance.detach().cpu().numpy().astype(np.float64),
        "relevance": matches.relevance.detach().cpu().numpy().astype(np.float64),
    })
