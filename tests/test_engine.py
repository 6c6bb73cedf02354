"""Engine: batched equals one-pair-at-a-time, dtypes, pass counts, model left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model_helpers import plain_stack, random_images, tiny_timm_efficientnet, tiny_timm_resnet
from pairx_core import EngineStats, explain
from pairx_core.errors import ConfigError, NumericalError, ShapeError, UnsupportedModelError
from pairx_core.reference import explain_pair_reference
from pairx_core.results import MATCH_COLUMNS

CASES = [  # the timm cases take minutes in float64 on 2 cores: left out of `scripts/test.sh --quick`
    pytest.param(tiny_timm_efficientnet, "backbone.blocks.3", marks=pytest.mark.slow),
    pytest.param(tiny_timm_resnet, "backbone.layer2", marks=pytest.mark.slow),
    (plain_stack, "features.4"),
]


@pytest.fixture(scope="module")
def effnet():
    return tiny_timm_efficientnet()


@pytest.mark.parametrize("make_model,layer", CASES, ids=["timm-effnet", "timm-resnet", "plain"])
def test_batched_equals_reference_float64(make_model, layer):
    model = make_model()
    x0, x1 = random_images(3, seed=1), random_images(3, seed=2)
    batched = explain(model, x0, x1, layer, k_colors=3, batch_size=3)
    for i, result in enumerate(batched):
        reference = explain_pair_reference(model, x0[i], x1[i], layer, 3)
        got = result.layers[layer]
        assert result.similarity == pytest.approx(reference["similarity"], abs=1e-12)
        for side in (0, 1):
            want = reference[f"relevance_{side}"]
            err = np.abs(getattr(got, f"relevance_{side}") - want).max() / np.abs(want).max()
            assert err < 1e-6
        w = got.feature_shape[2]
        got_pairs = list(zip(got.matches.row_0 * w + got.matches.col_0, got.matches.row_1 * w + got.matches.col_1))
        assert got_pairs == [(a, b) for a, b, _, _ in reference["matches"]]
        for side in (0, 1):
            a = getattr(got, f"pixel_relevance_{side}").ravel()
            b = reference[f"pixel_relevance_{side}"].ravel()
            assert np.corrcoef(a, b)[0, 1] >= 0.9999


def test_shapes_dtypes_and_columns(effnet):
    x0, x1 = random_images(2, seed=3), random_images(2, seed=4)
    result = explain(effnet, x0, x1, ["backbone.blocks.2", "backbone.blocks.4"], k_lines=5, k_colors=2)
    assert len(result) == 2
    for pair in result:
        assert -1.0 <= pair.similarity <= 1.0
        assert pair.embedding_0.dtype == np.float64
        for name, (channels, h, w) in {"backbone.blocks.2": (40, 8, 8), "backbone.blocks.4": (112, 4, 4)}.items():
            layer = pair.layers[name]
            assert layer.feature_shape == (channels, h, w)
            assert layer.relevance_0.shape == (h, w) and layer.relevance_0.dtype == np.float64
            assert layer.pixel_relevance_1.shape == (min(2, layer.n_matches), 64, 64)
            assert list(layer.matches.columns[: len(MATCH_COLUMNS)]) == list(MATCH_COLUMNS)
            assert (np.diff(layer.matches.relevance.to_numpy()) <= 0).all()
            assert layer.matches["rank"].tolist() == list(range(layer.n_matches))
            # cell centres in input pixels
            assert set(layer.matches.x_0 % (64 / w)) <= {64 / w / 2}


def test_float32_runs_and_keeps_dtype(effnet):
    model = tiny_timm_efficientnet(dtype=torch.float32)
    x0, x1 = random_images(2, dtype=torch.float32, seed=5), random_images(2, dtype=torch.float32, seed=6)
    result = explain(model, x0, x1, "backbone.blocks.3", k_colors=2)
    layer = result[0].layers["backbone.blocks.3"]
    assert layer.relevance_0.dtype == np.float32 and layer.pixel_relevance_0.dtype == np.float32
    assert np.isfinite(layer.relevance_0).all()


def test_batch_size_does_not_change_numbers(effnet):
    x0, x1 = random_images(4, seed=7), random_images(4, seed=8)
    one = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=2, batch_size=1)
    four = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=2, batch_size=4)
    for a, b in zip(one, four):
        la, lb = a.layers["backbone.blocks.3"], b.layers["backbone.blocks.3"]
        np.testing.assert_allclose(la.relevance_1, lb.relevance_1, rtol=1e-9, atol=0)
        np.testing.assert_allclose(la.pixel_relevance_0, lb.pixel_relevance_0, rtol=1e-9, atol=1e-300)
        assert la.matches[["row_0", "col_0", "row_1", "col_1"]].equals(lb.matches[["row_0", "col_0", "row_1", "col_1"]])


def test_shared_images_forwarded_once_and_numbers_unchanged(effnet):
    """A gallery image in several pairs is forwarded once; per-pair relevance still differs correctly."""
    query = random_images(3, seed=9)
    gallery = random_images(1, seed=10).expand(3, -1, -1, -1).clone()
    stats = EngineStats()
    shared = explain(effnet, query, gallery, "backbone.blocks.3", k_colors=2, batch_size=3, stats=stats)
    assert stats.forward_passes == 1 and stats.images_forwarded == 4
    assert stats.relevance_backwards == 3  # the gallery image needs one seed per pair
    for i, result in enumerate(shared):
        alone = explain(effnet, query[i:i + 1], gallery[i:i + 1], "backbone.blocks.3", k_colors=2)[0]
        np.testing.assert_allclose(result.layers["backbone.blocks.3"].relevance_1,
                                   alone.layers["backbone.blocks.3"].relevance_1, rtol=1e-9)
        np.testing.assert_allclose(result.layers["backbone.blocks.3"].pixel_relevance_1,
                                   alone.layers["backbone.blocks.3"].pixel_relevance_1, rtol=1e-9, atol=1e-300)


def test_pixel_maps_of_an_image_reused_by_its_later_batches(effnet):
    """An upload against several candidates in one-pair batches (the CPU's memory plan at real
    size): the maps of its cells an earlier batch computed are taken from there, since a map
    depends on image, layer and cell only; each pair's results equal the pair explained alone."""
    layer = "backbone.blocks.3"
    query = random_images(1, seed=13).expand(3, -1, -1, -1).clone()
    gallery = random_images(3, seed=14)
    gallery[2] = gallery[0]  # the third pair repeats the first: all of its maps are known
    stats = EngineStats()
    results = explain(effnet, query, gallery, layer, k_colors=3, batch_size=1, stats=stats)
    assert stats.batches == 3 and stats.images_forwarded == 6
    per_pair = [min(3, r.layers[layer].n_matches) for r in results]
    assert stats.pixel_maps_computed + stats.pixel_maps_reused == 2 * sum(per_pair)
    assert stats.pixel_maps_reused >= 2 * per_pair[2] > 0
    assert stats.pixel_backwards <= per_pair[0] + per_pair[1]  # the third batch makes no pass
    for i, result in enumerate(results):
        alone = explain(effnet, query[i:i + 1], gallery[i:i + 1], layer, k_colors=3)[0].layers[layer]
        got = result.layers[layer]
        assert got.matches[["row_0", "col_0", "row_1", "col_1"]].equals(alone.matches[["row_0", "col_0", "row_1",
                                                                                      "col_1"]])
        for side in ("pixel_relevance_0", "pixel_relevance_1"):
            assert getattr(got, side).shape == getattr(alone, side).shape
            np.testing.assert_allclose(getattr(got, side), getattr(alone, side), rtol=1e-9, atol=1e-300)


def test_pass_counts_per_batch(effnet):
    x0, x1 = random_images(4, seed=11), random_images(4, seed=12)
    stats = EngineStats()
    results = explain(effnet, x0, x1, ["backbone.blocks.2", "backbone.blocks.3"], k_colors=3, batch_size=4, stats=stats)
    assert stats.forward_passes == 1
    assert stats.relevance_backwards == 1
    # one pixel pass per distinct cell rank, never more than k_colors per layer when images are unique
    assert stats.pixel_backwards <= 2 * 3
    assert all(len(r.layers) == 2 for r in results)


class _PassCounter:
    """Counts, from outside the engine, forwards through ``module`` (and the images they carry)
    and the backward passes whose gradient reaches the module's output."""

    def __init__(self, module):
        self.forwards, self.images, self.backwards = 0, 0, 0
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output):
        self.forwards += 1
        self.images += output.shape[0]
        if output.requires_grad:
            output.register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backwards += 1


@pytest.mark.parametrize("k_colors", [3, 0])
def test_passes_counted_with_hooks(effnet, k_colors):
    """One forward per distinct image, one relevance backward that stops at the lowest requested
    layer, and pixel maps only as backward passes (no extra forward): counted by hooks on the
    stem (below every layer) and on the block above the highest layer."""
    query, gallery = random_images(3, seed=21), random_images(1, seed=22)
    x1 = gallery.expand(3, -1, -1, -1).clone()  # one gallery image shared by three pairs: 4 images
    layers = ["backbone.blocks.2", "backbone.blocks.3"]
    explain(effnet, query[:1], x1[:1], layers, k_colors=1)  # the once-per-model layer check runs here
    stem = _PassCounter(effnet.backbone.conv_stem)
    above = _PassCounter(effnet.backbone.blocks[4])
    try:
        stats = EngineStats()
        explain(effnet, query, x1, layers, k_colors=k_colors, batch_size=3, stats=stats)
    finally:
        stem.handle.remove()
        above.handle.remove()
    assert (stem.forwards, stem.images) == (1, 4)  # one forward, each distinct image once
    assert (above.forwards, above.images) == (1, 4)
    # relevance: one backward from the embeddings through the upper network; the shared gallery
    # image takes one seed per pair, carried by the same pass or extra rounds over the same graph
    assert above.backwards == stats.relevance_backwards >= 1
    # nothing below the lowest layer runs backward, except the pixel passes
    assert stem.backwards == stats.pixel_backwards
    if k_colors:
        # pass j carries the j-th distinct cell of EVERY image, so per layer there are at most as
        # many passes as the busiest image has cells: the gallery image, 3 pairs x k_colors (one
        # pass per image and cell would be 2 layers x (3 x k + 3 x k) = 36 here)
        assert 1 <= stem.backwards <= 2 * 3 * k_colors
    else:
        assert stem.backwards == 0


def test_channels_last_same_explanations_and_model_restored():
    """float32 on CPU runs channels-last by default: same top matches and pixel maps as the
    contiguous layout, and the model's weights come back in their own layout and values."""
    model = tiny_timm_efficientnet(dtype=torch.float32)
    x0, x1 = random_images(3, seed=31).float(), random_images(3, seed=32).float()
    before = {name: (p.detach().clone(), p.stride()) for name, p in model.named_parameters()}
    layer = "backbone.blocks.3"
    layouts = []  # whether the stem saw channels-last input and weights, per forward
    stem = model.backbone.conv_stem
    handle = stem.register_forward_pre_hook(lambda module, args: layouts.append(
        (args[0].is_contiguous(memory_format=torch.channels_last) and args[0].stride(1) == 1,
         module.weight.is_contiguous(memory_format=torch.channels_last))))
    try:
        plain = explain(model, x0, x1, layer, k_colors=3, batch_size=3, memory_format="contiguous")
        plain_layouts, layouts[:] = layouts[:], []
        fast = explain(model, x0, x1, layer, k_colors=3, batch_size=3)  # auto: channels-last here
    finally:
        handle.remove()
    assert plain_layouts[-1] == (False, False) and layouts[-1] == (True, True)
    for a, b in zip(plain, fast):
        la, lb = a.layers[layer], b.layers[layer]
        assert a.similarity == pytest.approx(b.similarity, abs=1e-5)
        cells = ["row_0", "col_0", "row_1", "col_1"]
        assert la.matches[cells].head(10).equals(lb.matches[cells].head(10))
        # float32 with similarity near 1 (random model): the seed is a difference of nearly equal
        # vectors, so the maps agree in shape (correlation) and to ~1 % in scale (spec: Numerics)
        assert np.corrcoef(la.relevance_0.ravel(), lb.relevance_0.ravel())[0, 1] > 0.9999
        np.testing.assert_allclose(lb.relevance_0, la.relevance_0, rtol=2e-2)
        for pa, pb in zip(la.pixel_relevance_0, lb.pixel_relevance_0):
            assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] > 0.9999
    for name, parameter in model.named_parameters():
        assert parameter.stride() == before[name][1], name
        assert torch.equal(parameter, before[name][0]), name


def test_memory_format_auto_choice():
    from pairx_core.engine import ExplainConfig

    auto = ExplainConfig()
    assert auto.use_channels_last(torch.device("cpu"), torch.float32)
    assert not auto.use_channels_last(torch.device("cpu"), torch.float64)
    assert not auto.use_channels_last(torch.device("cuda"), torch.float32)
    assert ExplainConfig(memory_format="channels_last").use_channels_last(torch.device("cpu"), torch.float64)
    with pytest.raises(ConfigError, match="memory_format"):
        ExplainConfig(memory_format="nhwc")


def test_k_colors_zero_skips_pixel_work(effnet):
    x0, x1 = random_images(2, seed=13), random_images(2, seed=14)
    stats = EngineStats()
    without = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=0, stats=stats)
    with_pixels = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=2)
    assert stats.pixel_backwards == 0
    assert without[0].layers["backbone.blocks.3"].pixel_relevance_0.shape == (0, 64, 64)
    np.testing.assert_allclose(without[0].layers["backbone.blocks.3"].relevance_0,
                               with_pixels[0].layers["backbone.blocks.3"].relevance_0, rtol=1e-9)


def test_relevance_linear_in_seed_and_finite(effnet):
    """Relevance is linear in its seed: scaling an image's embedding side doesn't matter, but
    the LRP backward is linear, so pixel maps of a scaled cell scale exactly."""
    from pairx_core.engine import similarity_seeds

    e0, e1 = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    s, g0, g1 = similarity_seeds(e0, e1)
    s2, g0b, _ = similarity_seeds(3 * e0, e1)
    np.testing.assert_allclose(s, s2, rtol=1e-12)
    np.testing.assert_allclose(g0, 3 * g0b, rtol=1e-9)  # d cos / d e0 scales as 1/|e0|
    x0, x1 = random_images(1, seed=15), random_images(1, seed=16)
    layer = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=1)[0].layers["backbone.blocks.3"]
    assert np.isfinite(layer.relevance_0).all() and np.isfinite(layer.pixel_relevance_0).all()
    assert layer.relevance_0.max() > 0


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for name, m in model.named_modules()},
        [p.requires_grad for p in model.parameters()],
        model.training,
        {name: dict(vars(m)).keys() - {"_parameters", "_buffers", "_modules"} for name, m in model.named_modules()},
    )


def test_model_untouched_after_success_and_exception(effnet):
    model = tiny_timm_efficientnet()
    model.train()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    before = _snapshot(model)
    x0, x1 = random_images(1, seed=17), random_images(1, seed=18)
    explain(model, x0, x1, "backbone.blocks.3", k_colors=1)
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]

    # an exception in the middle of the backward passes: everything restored all the same
    import pairx_core.engine as engine

    original = engine._pixel_maps

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    engine._pixel_maps = boom
    try:
        with pytest.raises(RuntimeError, match="injected"):
            explain(model, x0, x1, "backbone.blocks.3", k_colors=1)
    finally:
        engine._pixel_maps = original
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def test_no_parameter_gradients(effnet):
    x0, x1 = random_images(1, seed=19), random_images(1, seed=20)
    explain(effnet, x0, x1, "backbone.blocks.3", k_colors=1)
    assert all(p.grad is None for p in effnet.parameters())


class _Attention(nn.Module):
    def forward(self, x):
        return x * x.mean()


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.odd = _Attention()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.odd(self.conv(x))).flatten(1)


def test_unsupported_architecture_named():
    model = _Unsupported().double()
    x = random_images(1, size=16)
    with pytest.raises(UnsupportedModelError, match="_Attention"):
        explain(model, x, x, "conv")
    # with the caller's own (empty) canonizer list it runs
    result = explain(model, x, random_images(1, size=16, seed=3), "conv", k_colors=1, canonizers=[])
    assert np.isfinite(result[0].layers["conv"].relevance_0).all()


def test_nan_raises():
    model = plain_stack()
    model.features[0].weight.data[0, 0, 0, 0] = float("nan")
    x = random_images(1)
    with pytest.raises(NumericalError):
        explain(model, x, random_images(1, seed=2), "features.4")


def test_bad_inputs():
    model = plain_stack()
    x = random_images(2)
    with pytest.raises(ShapeError):
        explain(model, x[:, :2], x[:, :2], "features.4")
    with pytest.raises(ShapeError):
        explain(model, x, x[:1], "features.4")
    with pytest.raises(ConfigError, match="no submodule"):
        explain(model, x, x, "features.99")
    with pytest.raises(ConfigError, match="float"):
        explain(model, x.float(), x.float(), "features.4")
    with pytest.raises(ConfigError):
        explain(model, x, x, "features.4", k_colors=-1)


def test_layer_inside_residual_block_rejected(effnet):
    x = random_images(1)
    with pytest.raises(ConfigError, match="bypassed"):
        explain(effnet, x, random_images(1, seed=2), "backbone.blocks.3.1.conv_pwl")


def test_memory_budget_cuts_batches(effnet):
    x0, x1 = random_images(6, seed=21), random_images(6, seed=22)
    stats = EngineStats()
    tight = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=0, memory_budget=1, stats=stats)
    assert stats.batches == 6 and max(stats.images_per_batch) == 2
    roomy = explain(effnet, x0, x1, "backbone.blocks.3", k_colors=0)
    for a, b in zip(tight, roomy):
        np.testing.assert_allclose(a.layers["backbone.blocks.3"].relevance_0, b.layers["backbone.blocks.3"].relevance_0,
                                   rtol=1e-9)


def test_strict_lrp_differs_but_finite():
    model = tiny_timm_efficientnet()
    x0, x1 = random_images(1, seed=23), random_images(1, seed=24)
    default = explain(model, x0, x1, "backbone.blocks.3", k_colors=0)[0].layers["backbone.blocks.3"]
    strict = explain(model, x0, x1, "backbone.blocks.3", k_colors=0, strict_lrp=True)[0]
    assert np.isfinite(strict.layers["backbone.blocks.3"].relevance_0).all()
    assert not np.allclose(default.relevance_0, strict.layers["backbone.blocks.3"].relevance_0)
    # canonizers never change what the model computes
    plain = explain(model, x0, x1, "backbone.blocks.3", k_colors=0)[0]
    assert strict.similarity == pytest.approx(plain.similarity, abs=1e-10)


def test_sum_of_abs_option():
    model = plain_stack()
    x0, x1 = random_images(1, seed=25), random_images(1, seed=26)
    a = explain(model, x0, x1, "features.4", k_colors=0)[0].layers["features.4"]
    b = explain(model, x0, x1, "features.4", k_colors=0, channel_reduction="sum_of_abs")[0].layers["features.4"]
    assert (b.relevance_0 >= a.relevance_0 - 1e-12).all() and not np.allclose(a.relevance_0, b.relevance_0)


@pytest.mark.parametrize("name,layer", [("resnet18", "network.layer2"), ("efficientnet_b0", "network.features.3")])
def test_torchvision_models_supported(name, layer):
    """torchvision ResNet (zennit's canonizer) and EfficientNet (BN merge, SE, residual split)."""
    import torchvision

    from model_helpers import _randomise_batch_norms
    from pairx_core.models import HeadlessClassifier

    torch.manual_seed(0)
    network = torchvision.models.get_model(name, weights=None)
    if hasattr(network, "fc"):
        network.fc = nn.Identity()
    else:
        network.classifier = nn.Identity()
    model = HeadlessClassifier(network)
    _randomise_batch_norms(model)
    model = model.double().eval()
    with torch.no_grad():
        before = model(random_images(1, size=64))
    result = explain(model, random_images(2, seed=31), random_images(2, seed=32), layer, k_colors=1)
    explanation = result[0].layers[layer]
    assert np.isfinite(explanation.relevance_0).all() and explanation.n_matches > 0
    with torch.no_grad():  # canonizers undone, exactly
        assert torch.equal(model(random_images(1, size=64)), before)


def test_torchvision_mobilenet_v3_is_reported_unsupported():
    import torchvision

    from pairx_core.models import HeadlessClassifier

    network = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    network.classifier = nn.Identity()
    model = HeadlessClassifier(network).eval()
    x = random_images(1, size=32, dtype=torch.float32)
    with pytest.raises(UnsupportedModelError, match="MobileNetV3|InvertedResidual"):
        explain(model, x, x, "network.features.3")


def test_one_configuration_path(effnet):
    """``explain`` takes an ExplainConfig, keyword settings override it, every field is reachable
    (the rules' epsilon and stabilizer included), and unknown names are refused with the valid ones listed."""
    from pairx_core import ExplainConfig

    x0, x1 = random_images(1, seed=31).double(), random_images(1, seed=32).double()
    model = tiny_timm_efficientnet().double()
    layer = "backbone.blocks.3"
    by_config = explain(model, x0, x1, layer, ExplainConfig(k_colors=0, stabilizer=1e-3))[0].layers[layer]
    by_keyword = explain(model, x0, x1, layer, k_colors=0, stabilizer=1e-3)[0].layers[layer]
    default_stabilizer = explain(model, x0, x1, layer, ExplainConfig(k_colors=0))[0].layers[layer]
    overridden = explain(model, x0, x1, layer, ExplainConfig(k_colors=5, stabilizer=1e-3), k_colors=0)[0].layers[layer]
    np.testing.assert_array_equal(by_config.relevance_0, by_keyword.relevance_0)
    np.testing.assert_array_equal(by_config.relevance_0, overridden.relevance_0)
    assert overridden.pixel_relevance_0.shape[0] == 0  # the keyword won
    # the stabilizer sits in every z+ denominator: another value gives other relevance
    assert not np.allclose(by_config.relevance_0, default_stabilizer.relevance_0, rtol=1e-9, atol=0)
    with pytest.raises(ConfigError, match="k_colour.*ExplainConfig fields are"):
        explain(model, x0, x1, layer, k_colour=3)


def test_denormal_flushing_is_scoped(effnet):
    """The engine flushes denormals on CPU while it runs and puts the process setting back."""
    from pairx_core.runtime_settings import denormals_are_flushed as _flushing_denormals

    x0, x1 = random_images(1, seed=33), random_images(1, seed=34)
    previous = _flushing_denormals()
    try:
        for setting in (False, True):
            torch.set_flush_denormal(setting)
            explain(effnet, x0, x1, "backbone.blocks.3", k_colors=1)
            assert _flushing_denormals() is setting
    finally:
        torch.set_flush_denormal(previous)


def test_cuda_budget_counts_the_graph_as_measured_there(effnet):
    """On CUDA the caching allocator frees the graph during the backward pass: the same budget
    holds GRAPH_OVERHEAD / GRAPH_OVERHEAD_CUDA times the images it holds on the CPU (measured on an
    H200: a 40 GiB budget gave 6 images per batch and 8 GiB peak before, 24 images and 30 GiB after)."""
    from pairx_core import batch_plan

    probe = torch.zeros(1, 3, 64, 64, dtype=next(effnet.parameters()).dtype)
    per_image = batch_plan._activation_bytes(effnet, probe)
    budget = 200 * per_image
    on_cpu = batch_plan.max_images_per_batch(effnet, probe, budget, torch.device("cpu"))
    on_cuda = batch_plan.max_images_per_batch(effnet, probe, budget, torch.device("cuda"))
    assert on_cpu == int(200 / batch_plan.GRAPH_OVERHEAD)
    assert on_cuda == int(200 / batch_plan.GRAPH_OVERHEAD_CUDA) > 3 * on_cpu
    # without pixel maps no graph reaches the input (measured: half the peak): twice the images
    no_pixels = batch_plan.max_images_per_batch(effnet, probe, budget, torch.device("cuda"), pixel_passes=False)
    assert no_pixels == int(200 / batch_plan.GRAPH_OVERHEAD_CUDA_NO_PIXELS) >= 2 * on_cuda
    assert batch_plan.max_images_per_batch(effnet, probe, budget, torch.device("cpu"), pixel_passes=False) == on_cpu


def test_cpu_embedding_batches_keep_the_largest_activation_small(monkeypatch):
    """On the CPU, plain inference takes as many images per forward as keep the largest module
    output under batch_plan.CPU_LARGEST_ALLOCATION (bigger blocks come as fresh, zero-filled pages
    at every allocation); on accelerators, and for small inputs, INFERENCE_BATCH_CAP."""
    from pairx_core import batch_plan
    from pairx_core.engine import embed

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, stride=2, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    largest = 16 * 32 * 32 * 4  # the first convolution's (and the ReLU's) float32 output per 32 px image
    cpu = torch.device("cpu")
    assert batch_plan.inference_batch_size(model, (32, 32), cpu) == batch_plan.INFERENCE_BATCH_CAP
    assert batch_plan.inference_batch_size(model, (32, 32), torch.device("cuda")) == batch_plan.INFERENCE_BATCH_CAP
    monkeypatch.setattr(batch_plan, "CPU_LARGEST_ALLOCATION", 3 * largest + 100)
    assert batch_plan.inference_batch_size(model, (32, 32), cpu) == 3
    monkeypatch.setattr(batch_plan, "CPU_LARGEST_ALLOCATION", largest // 2)
    assert batch_plan.inference_batch_size(model, (32, 32), cpu) == 1  # never 0

    monkeypatch.setattr(batch_plan, "CPU_LARGEST_ALLOCATION", 3 * largest + 100)
    batches = []
    model[0].register_forward_hook(lambda module, args, output: batches.append(output.shape[0]))
    images = torch.rand(7, 3, 32, 32)
    embeddings, features = embed(model, images, ["0"])
    assert batches == [3, 3, 1]
    assert embeddings.shape == (7, 4) and features["0"].shape == (7, 16, 32, 32)
    batches.clear()
    alone, _ = embed(model, images, ["0"], batch_size=7)  # an explicit batch size is kept
    assert batches == [7] and np.allclose(alone, embeddings, atol=1e-6)
    with pytest.raises(ConfigError, match="batch_size"):
        embed(model, images, batch_size=0)
