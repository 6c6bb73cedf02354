"""Users' own modules: single-activation modules run as the published method runs them (one
warning), modules combining two activations are refused naming the module and the operation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_helpers import random_images, tiny_timm_efficientnet
from pairx_core import explain
from pairx_core.canonizers import UnknownModuleWarning, check_supported, register_safe_module
from pairx_core.errors import UnsupportedModelError


class OwnGeM(nn.Module):
    """Generalised-mean pooling as re-ID code usually writes it (learnable exponent)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class OwnReIdModel(nn.Module):
    """timm backbone + own GeM + BatchNorm1d neck, built outside the zoo."""

    def __init__(self):
        super().__init__()
        import timm

        self.backbone = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0, global_pool="")
        self.pooling = OwnGeM()
        self.bn = nn.BatchNorm1d(self.backbone.num_features)

    def forward(self, x):
        return self.bn(self.pooling(self.backbone(x)).flatten(1))


def _unknown_warnings(caught) -> list:
    return [w for w in caught if issubclass(w.category, UnknownModuleWarning)]


@pytest.mark.slow
def test_own_gem_model_equals_the_zoo_miewid_path():
    zoo = tiny_timm_efficientnet()
    own = OwnReIdModel().double().eval()
    own.load_state_dict(zoo.state_dict())  # same weights, same names
    x0, x1 = random_images(1, size=32, seed=41), random_images(1, size=32, seed=42)
    layer = "backbone.blocks.2"  # (40, 4, 4) at 32 px
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = explain(zoo, x0, x1, layer, k_colors=2)
    assert len(expected[0].layers[layer].matches) >= 2
    assert not _unknown_warnings(caught)  # the zoo's own modules are registered
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = explain(own, x0, x1, layer, k_colors=2)
    (warning,) = _unknown_warnings(caught)
    assert warning.message.modules == {"pooling": "OwnGeM"} and "OwnGeM" in str(warning.message)
    for a, b in zip(expected, got):
        assert a.similarity == pytest.approx(b.similarity, abs=1e-12)
        la, lb = a.layers[layer], b.layers[layer]
        np.testing.assert_allclose(lb.relevance_0, la.relevance_0, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lb.relevance_1, la.relevance_1, rtol=1e-9, atol=1e-12)
        assert la.matches[["row_0", "col_0", "row_1", "col_1"]].equals(lb.matches[["row_0", "col_0", "row_1", "col_1"]])
        np.testing.assert_allclose(lb.pixel_relevance_0, la.pixel_relevance_0, rtol=1e-9, atol=1e-12)
    # one warning per model: a second call is quiet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_supported(own) == {"pooling": "OwnGeM"}
    assert not _unknown_warnings(caught)


class _Net(nn.Module):
    """stem conv -> ``middle`` -> GeM -> flatten: a tiny model around one module under test."""

    def __init__(self, middle: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), middle)
        self.pool = OwnGeM()

    def forward(self, x):
        return self.pool(self.blocks(self.stem(x))).flatten(1)


class MyGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class MyResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class MyMish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class MyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, C, hw)
        weights = torch.softmax(q.transpose(1, 2) @ x.flatten(2), dim=-1)  # (B, hw, hw)
        return (x.flatten(2) @ weights).reshape(b, c, h, w)


class MyDataDependentResidual(nn.Module):
    """Python control flow on values: fx cannot trace it, the autograd reader runs it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if float(x.detach().abs().max()) > 0:
            return self.conv(x) + x
        return x


class MyDataDependentActivation(nn.Module):
    def forward(self, x):
        if float(x.detach().abs().max()) > 0:
            return x.clamp(min=0) ** 2
        return x


def _model(middle: nn.Module) -> _Net:
    torch.manual_seed(0)
    return _Net(middle).double().eval()


@pytest.mark.parametrize(
    "middle,operation",
    [(MyGate(), "mul"), (MyResidual(), "add"), (MyAttention(), "matmul"), (MyDataDependentResidual(), "add")],
)
def test_combining_two_activations_is_refused_naming_module_and_operation(middle, operation):
    model = _model(middle)
    x = random_images(1, size=16)
    with pytest.raises(UnsupportedModelError) as caught:
        explain(model, x, random_images(1, size=16, seed=2), "blocks", k_colors=0)
    error = caught.value
    assert error.operation == operation and error.module_name == "blocks.1"
    assert str(error).startswith(f"{operation} of two activations in module 'blocks.1' ({type(middle).__name__})")
    # the caller's own canonizers (here: none, "run it as it is") lift the refusal
    result = explain(model, x, random_images(1, size=16, seed=2), "blocks", k_colors=0, canonizers=[])
    assert np.isfinite(result[0].layers["blocks"].relevance_0).all()


@pytest.mark.parametrize("middle", [MyMish(), MyDataDependentActivation()])
def test_custom_activations_run_by_their_gradient(middle):
    model = _model(middle)
    x0, x1 = random_images(1, size=16), random_images(1, size=16, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explain(model, x0, x1, "blocks", k_colors=1)
    (warning,) = _unknown_warnings(caught)
    assert warning.message.modules == {"blocks.1": type(middle).__name__, "pool": "OwnGeM"}
    # no rule is attached to them: same numbers as running the model with no canonizers at all
    plain = explain(_model(type(middle)()), x0, x1, "blocks", k_colors=1, canonizers=[])
    np.testing.assert_allclose(result[0].layers["blocks"].relevance_0, plain[0].layers["blocks"].relevance_0)


def test_registered_type_overrides_the_check():
    class AcceptedGate(MyGate):
        pass

    register_safe_module(AcceptedGate)
    with pytest.warns(UnknownModuleWarning, match="OwnGeM"):
        assert check_supported(_model(AcceptedGate())) == {"pool": "OwnGeM"}


def test_untraceable_forward_without_example_input_is_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="cannot be traced"):
        check_supported(_model(MyDataDependentActivation()))


def test_subclass_of_a_safe_type_with_its_own_forward_is_read():
    class GatedSequential(nn.Sequential):
        def forward(self, x):
            return x * super().forward(x)

    model = _model(GatedSequential(nn.Conv2d(8, 8, 1), nn.Sigmoid()))
    with pytest.raises(UnsupportedModelError, match="mul of two activations in module 'blocks.1'"):
        check_supported(model)
