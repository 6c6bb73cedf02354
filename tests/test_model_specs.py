"""Random weights only on purpose, readable specs, weights digests, the demo's declared layer."""

from __future__ import annotations

import pytest
import torch

from model_helpers import tiny_timm_efficientnet
from pairx_core.errors import ModelLoadError, RandomWeightsError
from pairx_core.layers import default_layer
from pairx_core.models import (
    RandomWeightsWarning,
    ensure_weights,
    load_model,
    model_fingerprint,
    public_spec,
    random_weights_hint,
    weights_digest,
    would_use_random_weights,
)


@pytest.mark.parametrize(
    "spec,random",
    [
        ("timm:resnet18", True),
        ("timm:efficientnet_b0?size=128", True),
        ("timm:resnet18?weights=/data/resnet18.safetensors", False),
        ("torchvision:resnet50", True),
        ("torchvision:resnet50?weights=s3://bucket/r50.pt", False),
        ("miewid", True),
        ("miewid?weights=hf://org/miewid-msv3", False),
        ("miewid:/data/miewid.bin", False),
        ("hf://org/miewid-msv3", False),
        ("miewid-arch", True),
        ("demo", False),
        ("python:my_package.models:build", False),
    ],
)
def test_would_use_random_weights_from_the_spec_alone(spec, random):
    assert would_use_random_weights(spec) is random


def test_weights_argument_and_unknown_kind():
    assert would_use_random_weights("timm:resnet18", weights={"x": torch.zeros(1)}) is False
    with pytest.raises(ModelLoadError, match="unknown model kind"):
        would_use_random_weights("tensorflow:resnet")


def test_refusal_says_how_to_give_weights():
    with pytest.raises(RandomWeightsError) as caught:
        ensure_weights("timm:efficientnet_b0?size=128")
    message = str(caught.value)
    assert "timm:efficientnet_b0?size=128&weights=" in message
    assert "miewid?weights=" in message and "`demo`" in message
    assert caught.value.spec == "timm:efficientnet_b0?size=128"
    assert ensure_weights("timm:resnet18", allow_random_weights=True) is True
    assert ensure_weights("demo") is False
    assert "miewid?weights=" in random_weights_hint("miewid-arch")


def test_public_spec_removes_credentials():
    spec = "miewid?weights=https://alice:s3cret@host/w.safetensors?X-Amz-Signature=abc&token=zz&size=440"
    shown = public_spec(spec)
    assert "s3cret" not in shown and "alice" not in shown and "abc" not in shown and "zz" not in shown
    assert shown.startswith("miewid?weights=https://***@host/w.safetensors") and "size=440" in shown
    assert public_spec("timm:resnet18?size=128") == "timm:resnet18?size=128"
    with pytest.raises(RandomWeightsError) as caught:
        ensure_weights("timm:resnet18?api_key=hunter2")
    assert "hunter2" not in str(caught.value) and "hunter2" not in caught.value.spec


def test_weights_digest_follows_weights_not_class_names():
    a, b = tiny_timm_efficientnet(), tiny_timm_efficientnet()
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 16
    b.bn.running_mean.add_(1e-3)
    assert weights_digest(a) != weights_digest(b)
    wrapper = torch.nn.Sequential()
    wrapper.add_module("backbone", a.backbone)
    wrapper.add_module("pooling", a.pooling)
    wrapper.add_module("bn", a.bn)
    assert weights_digest(wrapper) == weights_digest(a)  # same weights, other classes
    assert model_fingerprint(wrapper) != model_fingerprint(a)


def test_python_api_still_warns_and_demo_declares_its_layer():
    with pytest.warns(RandomWeightsWarning):
        load_model("timm:resnet18?size=32")
    model, _ = load_model("demo")
    assert default_layer(model) == "backbone.blocks.2"
