"""Model zoo: MiewID checkpoint round trip, specs, safe loading, fingerprints."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pairx_core.errors import ModelLoadError
from pairx_core.models import (
    MiewIdNet,
    RandomWeightsWarning,
    load_model,
    model_fingerprint,
    read_state_dict,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def small_miewid_checkpoint(tmp_path_factory):
    """A randomly initialised MiewID-layout model (small backbone) saved as safetensors."""
    torch.manual_seed(0)
    model = MiewIdNet("efficientnet_b0").eval()
    model.pooling.p.data.fill_(2.5)
    path = tmp_path_factory.mktemp("ckpt") / "miewid.safetensors"
    save_checkpoint(model, path)
    return model, path


def test_miewid_layout_keys(small_miewid_checkpoint):
    model, path = small_miewid_checkpoint
    keys = set(read_state_dict(path))
    assert "pooling.p" in keys and "bn.running_var" in keys
    assert any(k.startswith("backbone.blocks.") for k in keys)
    assert not any(k.startswith(("backbone.classifier", "backbone.global_pool")) for k in keys)


def test_miewid_checkpoint_round_trip_strict(small_miewid_checkpoint):
    model, path = small_miewid_checkpoint
    loaded, prep = load_model(f"miewid?arch=efficientnet_b0&size=64&weights={path}")
    assert prep.size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert loaded.pooling.p.item() == pytest.approx(2.5)
    assert model_fingerprint(loaded) == model_fingerprint(model)


def test_training_heads_ignored_missing_and_unexpected_reported(small_miewid_checkpoint, tmp_path):
    model, _ = small_miewid_checkpoint
    state = dict(model.state_dict())
    state["final.kernel"] = torch.zeros(3, 3)  # ArcFace head of a training checkpoint: ignored
    state["temperature"] = torch.ones(1)
    from safetensors.torch import save_file

    ok = tmp_path / "with_heads.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ok))
    load_model("miewid?arch=efficientnet_b0", weights=str(ok))

    del state["bn.weight"]
    state["extra.layer"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(ModelLoadError) as info:
        load_model("miewid?arch=efficientnet_b0", weights=str(bad))
    assert info.value.missing == ["bn.weight"] and info.value.unexpected == ["extra.layer"]
    assert "bn.weight" in str(info.value) and "extra.layer" in str(info.value)


def test_pickled_code_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ModelLoadError, match="safely"):
        read_state_dict(path)


def test_torch_weights_only_file_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, prep = load_model("torchvision:resnet18?size=32")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    again, _ = load_model("torchvision:resnet18", weights=str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), again(x), atol=1e-6)
    assert model(x).shape == (1, 512)


def test_random_weights_warn_and_are_deterministic():
    with pytest.warns(RandomWeightsWarning):
        a, prep = load_model("timm:efficientnet_b0?size=64")
    with pytest.warns(RandomWeightsWarning):
        b, _ = load_model("timm:efficientnet_b0?size=64")
    assert prep.size == (64, 64)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.bn.bias.add_(1.0)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_unknown_specs():
    with pytest.raises(ModelLoadError, match="unknown model kind"):
        load_model("nope:thing")
    with pytest.raises(ModelLoadError):
        load_model("python:no_such_module_xyz:factory")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("miewid?arch=efficientnet_b0", weights="/no/such/file.safetensors")
    with pytest.raises(ModelLoadError, match="opener"):
        load_model("hf://conservationxlabs/miewid-msv2")


def test_python_factory_spec():
    model, prep = load_model("python:model_helpers:plain_stack")
    assert prep.size == (224, 224)
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 12)
