"""Checkpoints as users save them: the bare timm / torchvision network, in every usual container."""

from __future__ import annotations

import logging

import pytest
import torch

from pairx_core.errors import ModelLoadError
from pairx_core.models import load_model, seeded

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _bare_timm(arch: str, **kwargs) -> torch.nn.Module:
    import timm

    return seeded(lambda: timm.create_model(arch, pretrained=False, **kwargs), seed=7).eval()


@pytest.fixture(scope="module")
def resnet():
    """A fine-tuned (tiny) ResNet as timm builds it, classifier head included."""
    model = _bare_timm("test_resnet")
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.1, 0.1)  # differs from any fresh initialisation
    return model


def _save(kind: str, state: dict, folder) -> str:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = folder / "weights.safetensors"
        save_file(state, str(path))
        return str(path)
    path = folder / ("weights.pth" if kind == "state_dict" else "weights.pt")
    torch.save({"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
                "model": {"model": state, "optimizer": {"lr": 0.1}}}[kind], path)
    return str(path)


def _same_backbone(loaded: torch.nn.Module, bare: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.allclose(loaded.backbone(X), bare.forward_features(X), atol=1e-5)
        assert loaded(X).shape == (2, bare.num_features)


@pytest.mark.parametrize("kind", ["plain", "state_dict", "model", "safetensors"])
def test_bare_timm_checkpoint_with_head_loads(resnet, kind, tmp_path, caplog):
    path = _save(kind, resnet.state_dict(), tmp_path)
    with caplog.at_level(logging.INFO, logger="pairx_core.models"):
        loaded, _ = load_model(f"timm:test_resnet?size=64&weights={path}")
    _same_backbone(loaded, resnet)
    log = caplog.text
    assert "ignored: fc.bias, fc.weight" in log  # the classifier head the wrapper does not use
    assert "initial values: bn.bias" in log and "pooling.p" in log  # the neck, not in the file
    assert loaded.pooling.p.item() == pytest.approx(3.0)


def test_bare_resnet18_without_head_from_a_file_url(tmp_path):
    """``timm.create_model("resnet18", num_classes=0).state_dict()`` behind a local file URL."""
    from infra.model_store import load_model as load_with_urls

    bare = _bare_timm("resnet18", num_classes=0)
    path = _save("plain", bare.state_dict(), tmp_path)
    loaded, _ = load_with_urls(f"timm:resnet18?size=64&weights=file://{path}")
    _same_backbone(loaded, bare)


def test_head_named_other_than_fc_is_ignored_and_logged(tmp_path, caplog):
    bare = _bare_timm("test_efficientnet", num_classes=7)
    path = _save("safetensors", bare.state_dict(), tmp_path)
    with caplog.at_level(logging.INFO, logger="pairx_core.models"):
        loaded, _ = load_model(f"timm:test_efficientnet?size=64&weights={path}")
    _same_backbone(loaded, bare)
    assert "ignored: classifier.bias, classifier.weight" in caplog.text


def test_bare_torchvision_checkpoint_loads(tmp_path, caplog):
    import torchvision

    bare = seeded(lambda: torchvision.models.resnet18(weights=None), seed=3).eval()
    path = _save("state_dict", bare.state_dict(), tmp_path)
    with caplog.at_level(logging.INFO, logger="pairx_core.models"):
        loaded, _ = load_model(f"torchvision:resnet18?size=64&weights={path}")
    bare.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(loaded(X), bare(X), atol=1e-5)
    assert "ignored: fc.bias, fc.weight" in caplog.text


def test_a_checkpoint_that_does_not_fit_still_fails(resnet, tmp_path):
    other = _bare_timm("test_efficientnet")
    path = _save("plain", other.state_dict(), tmp_path)
    with pytest.raises(ModelLoadError, match="checkpoint keys do not match the architecture") as info:
        load_model(f"timm:test_resnet?size=64&weights={path}")
    assert "backbone.conv1.0.weight" in info.value.missing and "conv_stem.weight" in info.value.unexpected
    # the same network with one layer more: the extra keys are named
    deeper = {**resnet.state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ModelLoadError) as info:
        load_model("timm:test_resnet", weights=deeper)
    assert not info.value.missing and info.value.unexpected == ["backbone.layer5.0.conv1.weight"]
    # wrapper layout with a missing neck key: the neck is only optional for a bare network
    wrapped = {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    wrapped.update({"pooling.p": torch.ones(1), "bn.weight": torch.ones(resnet.num_features)})
    with pytest.raises(ModelLoadError) as info:
        load_model("timm:test_resnet", weights=wrapped)
    assert info.value.missing == ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
