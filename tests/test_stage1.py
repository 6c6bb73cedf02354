"""Stage 1 from cached activations equals the engine's full path (k_colors=0) on the same pairs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from model_helpers import plain_stack, random_images, tiny_timm_efficientnet, tiny_timm_resnet
from pairx_core import ExplainConfig, embed, explain
from pairx_core.metrics import plausibility
from pairx_core.models import load_model
from pairx_core.batch_plan import max_images_per_batch
from pairx_core.split import SplitWarning, can_split, plan_split, split_forward
from pairx_core.stage1 import SplitUnsupportedError, Stage1Stats, stage1

SIZE = 64


def _torchvision(name: str, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model, _ = load_model(f"torchvision:{name}?size={SIZE}")
    return model.to(dtype).eval()


def _miewid_arch(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_model(f"miewid-arch:?size={SIZE}")
    return model.to(dtype).eval()


def _compare(model, layer, dtype, n_pairs=3, rtol=1e-4, shared=False, config=ExplainConfig(k_colors=0)):
    """``shared``: the query is forwarded once for all its pairs (rules whose state lives in the
    graph); otherwise each pair forwards two rows."""
    images = random_images(n_pairs + 1, SIZE, dtype=dtype, seed=3)
    x0 = images[:1].expand(n_pairs, -1, -1, -1).contiguous()  # one query against several candidates
    x1 = images[1:]
    full = explain(model, x0, x1, layer, k_colors=0, memory_format="contiguous")
    _, features = embed(model, images, [layer], memory_format=config.memory_format)
    pairs = [(0, i + 1) for i in range(n_pairs)]
    stats = Stage1Stats()
    got = stage1(model, torch.as_tensor(features[layer]), pairs, layer, (SIZE, SIZE), config, stats=stats)
    if shared and n_pairs > 1:
        chunks = stats.batches
        assert stats.anchors == 1 and stats.rows_forwarded == n_pairs + 1
        assert stats.relevance_backwards == 2 * chunks  # the chunk's candidates, the anchor's seeds
    else:
        assert stats.anchors == 0 and stats.relevance_backwards == 1 and stats.rows_forwarded == 2 * n_pairs
    assert [r.index for r in got] == list(range(n_pairs))
    for a, b in zip(full, got):
        assert b.similarity == pytest.approx(a.similarity, rel=rtol, abs=rtol)
        la, lb = a.layers[layer], b.layers[layer]
        for ra, rb in ((la.relevance_0, lb.relevance_0), (la.relevance_1, lb.relevance_1)):
            scale = np.abs(ra).max()
            # float32: LRP divides by pre-activations; 1e-3 relative drift between two batchings is normal
            assert np.abs(ra - rb).max() <= (rtol * 10 if dtype == torch.float64 else 1e-2) * scale
        top = 10
        assert la.n_matches == lb.n_matches
        assert la.matches[["row_0", "col_0", "row_1", "col_1"]].head(top).equals(
            lb.matches[["row_0", "col_0", "row_1", "col_1"]].head(top))
        pa, pb = plausibility(la), plausibility(lb)
        assert pa.n_matches == pb.n_matches and pa.inliers == pb.inliers
        if pa.irm is not None:
            assert pb.irm == pytest.approx(pa.irm, rel=1e-6)


FLOAT64_CASES = [(plain_stack, "features.5"), (tiny_timm_resnet, "backbone.layer2")]
FLOAT32_CASES = [  # (model, layer, query forwarded once)
    (tiny_timm_efficientnet, "backbone.blocks.3", True),
    (lambda d: _torchvision("resnet18", d), "network.layer2", False),
    (lambda d: _torchvision("efficientnet_b0", d), "network.features.3", False),  # its pool keeps zennit's hook
]


@pytest.mark.parametrize("make_model,layer", FLOAT64_CASES, ids=["plain", "timm-resnet"])
def test_stage1_equals_engine_float64(make_model, layer):
    _compare(make_model(torch.float64), layer, torch.float64, rtol=1e-9)


@pytest.mark.parametrize("images_per_batch", [None, 2], ids=["one-chunk", "chunks-of-one"])
def test_stage1_with_the_query_forwarded_once_equals_engine_float64(images_per_batch):
    """timm EfficientNet's rules all keep their state in the graph: its query is forwarded once and
    its relevance for every candidate comes from that one forward (in one batched backward per
    chunk, or one backward per candidate when the memory plan allows two images per batch)."""
    config = ExplainConfig(k_colors=0, memory_budget=None if images_per_batch is None else 1)
    _compare(tiny_timm_efficientnet(torch.float64), "backbone.blocks.3", torch.float64, n_pairs=4, rtol=1e-9,
             shared=True, config=config)


@pytest.mark.parametrize("make_model,layer,shared", FLOAT32_CASES, ids=["timm-effnet", "tv-resnet", "tv-effnet"])
def test_stage1_equals_engine_float32(make_model, layer, shared):
    _compare(make_model(torch.float32), layer, torch.float32, rtol=1e-4, shared=shared)


def test_stage1_equals_engine_miewid_architecture():
    """efficientnetv2_rw_m (the MiewID backbone) at a small input, float32, one pair.

    With random weights this network is chaotic in float32: the full model's own embedding of an
    image changes by up to ~20 % with the batch it is forwarded in (measured), and as much with the
    memory layout. One pair keeps the batch the same in both paths (the query and the candidate)
    and both run contiguous, so the comparison is exact.
    """
    config = ExplainConfig(k_colors=0, memory_format="contiguous")  # the same kernels as the engine's path here
    _compare(_miewid_arch(torch.float32), "backbone.blocks.3", torch.float32, n_pairs=1, rtol=1e-4, config=config)


def test_no_lower_forward_and_model_restored():
    model = tiny_timm_efficientnet(torch.float32)
    layer = "backbone.blocks.3"
    before = [name for name, _ in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, features = embed(model, random_images(3, SIZE, dtype=torch.float32), [layer])
    calls = {"stem": 0, "block0": 0, "above": 0}
    model.backbone.conv_stem.register_forward_hook(lambda *a: calls.__setitem__("stem", calls["stem"] + 1))
    model.backbone.blocks[0].register_forward_hook(lambda *a: calls.__setitem__("block0", calls["block0"] + 1))
    model.backbone.blocks[4].register_forward_hook(lambda *a: calls.__setitem__("above", calls["above"] + 1))
    can_split(model, layer, (SIZE, SIZE), torch.float32)  # the one-off check runs the full model
    max_images_per_batch(model, torch.zeros(1, 3, SIZE, SIZE), None, torch.device("cpu"))  # so does the budget's
    calls.update(stem=0, block0=0, above=0)
    stage1(model, torch.as_tensor(features[layer]), [(0, 1), (0, 2), (1, 2)], layer, (SIZE, SIZE))
    assert calls["stem"] == 0 and calls["block0"] == 0
    # upper network only: query 0 once, its two candidates in one chunk, then the pair (1, 2)
    assert calls["above"] == 3
    assert [name for name, _ in model.named_modules()] == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_model_restored_on_error():
    model = plain_stack(torch.float32)
    plan = plan_split(model, "features.5", random_images(1, SIZE, dtype=torch.float32))
    originals = [id(m) for m in model.modules()]
    with pytest.raises(RuntimeError):
        split_forward(model, plan, torch.zeros(2, 7, 3, 3))  # wrong channel count for the head
    assert [id(m) for m in model.modules()] == originals


class _Bypass(nn.Module):
    """The embedding also sees the input directly: a layer is not a cut of this network."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.skip = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head((self.body(x) + self.skip(x)).mean(dim=(2, 3)))


def test_unsplittable_model_warns_once_and_raises():
    model = _Bypass().eval()
    acts = torch.randn(2, 4, SIZE, SIZE)
    with pytest.warns(SplitWarning) as record:
        with pytest.raises(SplitUnsupportedError):
            stage1(model, acts, [(0, 1)], "body", (SIZE, SIZE))
        with pytest.raises(SplitUnsupportedError):
            stage1(model, acts, [(0, 1)], "body", (SIZE, SIZE))
    assert len([w for w in record if issubclass(w.category, SplitWarning)]) == 1


def test_stage1_batches_fit_the_memory_budget():
    """A budget that holds fewer images than the batch size gives more, smaller batches (a
    real-size night ran out of memory with 16 pairs of 440 px activations per batch)."""
    model = plain_stack()
    _, features = embed(model, random_images(4, SIZE), ["features.5"])
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2)]
    roomy, tight = Stage1Stats(), Stage1Stats()
    wide = stage1(model, torch.as_tensor(features["features.5"]), pairs, "features.5", (SIZE, SIZE), stats=roomy)
    narrow = stage1(model, torch.as_tensor(features["features.5"]), pairs, "features.5", (SIZE, SIZE),
                    ExplainConfig(k_colors=0, memory_budget=1), stats=tight)
    assert (roomy.batches, tight.batches) == (1, 4)
    assert [r.similarity for r in narrow] == pytest.approx([r.similarity for r in wide], rel=1e-12)


def test_stage1_memory_plan_counts_only_the_network_above_the_layer():
    """Stage 1 keeps the graph above the layer only; counting the whole model gave MiewID at 440 px
    one pair per batch on a machine with room for more."""
    from pairx_core.batch_plan import _activation_bytes

    model = plain_stack()  # float64, 64 px: features.5 is the ReLU after the second conv (16 x 32 x 32)
    probe = torch.zeros(1, 3, SIZE, SIZE)
    # above it: conv, batch norm, ReLU at 16 x 16 x 16, the pool and flatten (16), the head (12)
    assert _activation_bytes(model, probe, "features.5") == (3 * 16 * 16 * 16 + 16 + 16 + 12) * 8
    whole = _activation_bytes(model, probe)
    budget = int(whole * 4.0 * 2)  # two whole-model images
    assert max_images_per_batch(model, probe, budget, torch.device("cpu"), pixel_passes=False) == 2
    assert max_images_per_batch(model, probe, budget, torch.device("cpu"), pixel_passes=False,
                                above="features.5") > 2


@pytest.mark.parametrize("memory_format,expected", [("auto", True), ("contiguous", False)])
def test_stage1_and_embedding_run_channels_last_on_the_cpu_in_float32(memory_format, expected):
    """As the engine does (oneDNN's NHWC kernels: 7-10 % faster at 440 px): the convolutions above
    the layer get channels-last rows in stage 1, and those of the whole model in ``embed``."""
    model = tiny_timm_efficientnet(torch.float32)
    layer = "backbone.blocks.3"
    conv_above = model.get_submodule("backbone.conv_head")
    seen: list[bool] = []
    handle = conv_above.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        _, features = embed(model, random_images(3, SIZE, dtype=torch.float32), [layer], memory_format=memory_format)
        assert features[layer].flags["C_CONTIGUOUS"]  # the arrays handed out keep one layout
        stage1(model, torch.as_tensor(features[layer]), [(0, 1), (0, 2)], layer, (SIZE, SIZE),
               ExplainConfig(k_colors=0, memory_format=memory_format))
    finally:
        handle.remove()
    assert len(seen) >= 2 and set(seen) == {expected}
    assert all(p.is_contiguous() for p in model.parameters())  # the model's own layout is restored
