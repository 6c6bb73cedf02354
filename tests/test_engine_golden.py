"""Golden numbers: a two-layer network whose PAIR-X results were worked out by hand.

Every other float64 check compares the engine with ``pairx_core.reference`` (code against code).
Here the expected relevances, matches and pixel maps are literal numbers derived on paper from
the method's definition, step by step in the comments below.

The network (float64, no biases, no canonizers):

- ``conv``: ``Conv2d(3, 2, kernel_size=(1, 2))``; only input channel 0 has weights:
  ``W[0] = [1, 2]``, ``W[1] = [1, -1]`` (over the two pixels a cell sees).
- ``Flatten`` then ``Linear(4, 2)`` with ``V = [[1, 0, 0, 1], [0, 1, 1, 0]]``; the flattened
  feature map is ``[f0(cell 0), f0(cell 1), f1(cell 0), f1(cell 1)]`` (channel-major).

Images are 1 x 3 pixels, channel 0 only (channels 1 and 2 are zero): A = [1, 2, 1],
B = [2, 1, 2]. Feature cell j sees pixels j and j + 1.

Step 1, features and embeddings:
  A: cell 0 = (1*1 + 2*2, 1*1 - 1*2) = (5, -1); cell 1 = (2 + 2, 2 - 1) = (4, 1)
  B: cell 0 = (2 + 2, 2 - 1) = (4, 1);         cell 1 = (1 + 4, 1 - 2) = (5, -1)
  flattened A = [5, 4, -1, 1] -> e_A = V a = (5 + 1, 4 - 1) = (6, 3)
  flattened B = [4, 5, 1, -1] -> e_B = (4 - 1, 5 + 1) = (3, 6)
  cos = (18 + 18) / (sqrt(45) sqrt(45)) = 0.8

Step 2, seeds d cos / d e:  d/de_A = e_B / 45 - 0.8 e_A / 45 = (-1.8, 3.6) / 45 = (-0.04, 0.08);
  d/de_B = e_A / 45 - 0.8 e_B / 45 = (0.08, -0.04).
  epsilon rule on the linear layer (epsilon ~ 0): R_j = a_j * sum_k V_kj g_k / z_k with z = e:
  A: g / z = (-0.04 / 6, 0.08 / 3) = (-1/150, 4/150)
     R = [5 * (-1/150), 4 * (4/150), -1 * (4/150), 1 * (-1/150)] = [-5, 16, -4, -1] / 150
     map (|sum over channels|): cell 0 = |-5 - 4| / 150 = 0.06, cell 1 = |16 - 1| / 150 = 0.1
  B: g / z = (0.08 / 3, -0.04 / 6) = (4/150, -1/150)
     R = [4 * 4, 5 * (-1), 1 * (-1), -1 * 4] / 150 = [16, -5, -1, -4] / 150
     map: cell 0 = |16 - 1| / 150 = 0.1, cell 1 = |-5 - 4| / 150 = 0.06

Step 3, matching: A's cells equal B's cells crosswise, so the mutual nearest neighbours are
  (A cell 0, B cell 1) and (A cell 1, B cell 0), both at distance 0.
Step 4, ranking by R_A * R_B: (1, 0) with 0.1 * 0.1 = 0.01 first, then (0, 1) with 0.06^2 = 0.0036.

Step 5, pixel maps (z+ on the convolution, stabiliser ~ 0; all pixels are positive, so only
  x+ with W+ counts: W+[0] = [1, 2], W+[1] = [1, 0]). The seed is the cell's feature vector.
  A cell 1 (pixels 1, 2 = 2, 1), seed (4, 1): z0 = 2*1 + 1*2 = 4, z1 = 2*1 + 1*0 = 2
     pixel 1: 2 * (1 * 4/4 + 1 * 1/2) = 3; pixel 2: 1 * (2 * 4/4 + 0) = 2   -> [0, 3, 2]
  A cell 0 (pixels 0, 1 = 1, 2), seed (5, -1): z0 = 1 + 4 = 5, z1 = 1
     pixel 0: 1 * (1 * 5/5 + 1 * (-1)/1) = 0; pixel 1: 2 * (2 * 5/5 + 0) = 4 -> [0, 4, 0]
  B cell 0 (pixels 0, 1 = 2, 1), seed (4, 1): as A cell 1 -> [3, 2, 0]
  B cell 1 (pixels 1, 2 = 1, 2), seed (5, -1): as A cell 0 -> [0, 0, 4]
  (each map sums to its seed's channel sum: z+ conserves relevance.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pairx_core import explain

TINY = 1e-12  # epsilon and stabiliser: their shift of the numbers is far below the tolerance


def _golden_model() -> nn.Module:
    conv = nn.Conv2d(3, 2, kernel_size=(1, 2), bias=False)
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0] = torch.tensor([1.0, 2.0])
        conv.weight[1, 0, 0] = torch.tensor([1.0, -1.0])
        linear.weight.copy_(torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]]))
    return nn.Sequential(conv, nn.Flatten(), linear).double().eval()


def _image(row: list[float]) -> torch.Tensor:
    image = torch.zeros(1, 3, 1, 3, dtype=torch.float64)
    image[0, 0, 0] = torch.tensor(row, dtype=torch.float64)
    return image


def test_hand_computed_pair():
    model = _golden_model()
    (result,) = explain(model, _image([1, 2, 1]), _image([2, 1, 2]), "0", canonizers=[], k_colors=2,
                        k_lines=2, epsilon=TINY, stabilizer=TINY)
    layer = result.layers["0"]
    assert abs(result.similarity - 0.8) < 1e-12
    np.testing.assert_allclose(result.embedding_0, [6, 3], rtol=1e-12)
    np.testing.assert_allclose(result.embedding_1, [3, 6], rtol=1e-12)
    np.testing.assert_allclose(layer.relevance_0, [[0.06, 0.1]], rtol=1e-9)
    np.testing.assert_allclose(layer.relevance_1, [[0.1, 0.06]], rtol=1e-9)

    matches = layer.matches
    assert matches[["col_0", "col_1"]].values.tolist() == [[1, 0], [0, 1]]
    assert matches.row_0.tolist() == [0, 0] and matches.row_1.tolist() == [0, 0]
    np.testing.assert_allclose(matches.relevance, [0.01, 0.0036], rtol=1e-9)
    np.testing.assert_allclose(matches.distance, [0, 0], atol=1e-12)

    np.testing.assert_allclose(layer.pixel_relevance_0[:, 0], [[0, 3, 2], [0, 4, 0]], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.pixel_relevance_1[:, 0], [[3, 2, 0], [0, 0, 4]], rtol=1e-9, atol=1e-9)
