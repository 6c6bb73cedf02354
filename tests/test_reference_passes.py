"""The published-style baseline makes the published code's passes, no more (an honest yardstick)."""

from __future__ import annotations

import numpy as np

from model_helpers import plain_stack, random_images
from pairx_core.reference import explain_pair_reference


def test_reference_forwards_each_image_once_for_all_its_pixel_maps():
    model = plain_stack()
    x0, x1 = random_images(2, seed=1)
    forwards = []
    handle = model.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].requires_grad))
    try:
        result = explain_pair_reference(model, x0, x1, "features.4", k_colors=3)
    finally:
        handle.remove()
    assert result["pixel_relevance_0"].shape[0] == 3 and np.isfinite(result["pixel_relevance_0"]).all()
    # per side: one plain forward (embedding), one LRP forward for the layer's relevance, one LRP
    # forward whose graph serves all k_colors pixel maps (it used to be one forward per map: 10)
    assert len(forwards) == 6
