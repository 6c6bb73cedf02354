"""The shipped demo model (``load_model("demo")``): loads offline, embeds, beats random init.

The figures behind the thresholds are in ``pairx_core/weights/demo.json`` and ``DEMO_MODEL.md``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pairx_core.demo_model.config import EVAL_SEED
from pairx_core.demo_model.evaluation import evaluation_photos, random_model, top1_accuracy
from pairx_core.models import WEIGHTS_DIR, MiewIdNet, load_model

CONFIG = json.loads((WEIGHTS_DIR / "demo.json").read_text())

#: small held-out evaluation: 20 identities, 1 gallery + 2 query photos each (40 queries)
SMALL_IDENTITIES = 20
SMALL_DIFFICULTY = 0.3
#: measured on the shipped weights: trained 0.525, random init 0.025 (chance 0.05); the
#: thresholds leave 7 queries of margin for other CPUs / BLAS builds
MIN_TRAINED_TOP1 = 0.35
MIN_GAIN_OVER_RANDOM = 0.25


@pytest.fixture(scope="module")
def demo():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        torch.manual_seed(0)
        model, preprocessing = load_model("demo")
    return model, preprocessing


def test_config_documents_the_model():
    for key in ("arch", "size", "mean", "std", "embedding_dim", "layer", "training", "evaluation"):
        assert key in CONFIG
    assert (WEIGHTS_DIR / "demo.safetensors").stat().st_size <= 20 * 1024 * 1024
    assert CONFIG["evaluation"]["trained_top1"] > CONFIG["evaluation"]["random_top1"]


def test_loads_offline_and_embeds(demo):
    model, preprocessing = demo
    assert isinstance(model, MiewIdNet) and not model.training
    assert preprocessing.size == tuple(CONFIG["size"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    gallery, _, _ = evaluation_photos(2, 0, preprocessing.size)
    with torch.no_grad():
        embeddings = model(preprocessing.batch(gallery))
    assert embeddings.shape == (2, CONFIG["embedding_dim"])
    assert torch.isfinite(embeddings).all()


def test_recommended_layer_has_a_mid_level_feature_map(demo):
    model, preprocessing = demo
    captured = {}

    def hook(module, args, output):
        captured["shape"] = tuple(output.shape)

    handle = model.get_submodule(CONFIG["layer"]).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *preprocessing.size))
    finally:
        handle.remove()
    _, channels, height, width = captured["shape"]
    assert [channels, height, width] == CONFIG["layer_feature_shape"]
    assert 8 <= height <= 16 and 8 <= width <= 16


def test_pairx_runs_on_the_demo_model(demo):
    from pairx_core import explain

    model, preprocessing = demo
    gallery, query, _ = evaluation_photos(1, 1, preprocessing.size, seed=EVAL_SEED + 7)
    x0, x1 = preprocessing.batch(gallery), preprocessing.batch(query)
    explanation = explain(model, x0, x1, layers=[CONFIG["layer"]], k_colors=3)[0].layers[CONFIG["layer"]]
    for array in (explanation.relevance_0, explanation.relevance_1,
                  explanation.pixel_relevance_0, explanation.pixel_relevance_1):
        assert np.isfinite(np.asarray(array)).all()
    assert np.abs(explanation.relevance_0).sum() > 0


def test_beats_random_initialisation_on_held_out_identities(demo):
    model, preprocessing = demo
    gallery, query, labels = evaluation_photos(
        SMALL_IDENTITIES, 2, preprocessing.size, seed=EVAL_SEED, difficulty=SMALL_DIFFICULTY
    )
    trained = top1_accuracy(model, preprocessing, gallery, query, labels)
    random = top1_accuracy(random_model(CONFIG["arch"]), preprocessing, gallery, query, labels)
    assert trained >= MIN_TRAINED_TOP1, (trained, random)
    assert trained >= random + MIN_GAIN_OVER_RANDOM, (trained, random)
