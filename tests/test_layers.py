"""Usable layers: defaults per family, listing (checked against the engine's cut test), suggestions."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from torch import nn

from model_helpers import plain_stack, random_images, tiny_timm_efficientnet, tiny_timm_resnet
from pairx_core import explain
from pairx_core.layer_plan import check_cut as _check_cut
from pairx_core.errors import ConfigError, LayerError, RandomWeightsError, UnsupportedModelError
from pairx_core.layers import (
    check_layer_names,
    check_layers,
    default_layer,
    default_layer_for_spec,
    list_layers,
)
from pairx_core.models import HeadlessClassifier


def _torchvision(name: str) -> HeadlessClassifier:
    torch.manual_seed(0)
    network = torchvision.models.get_model(name, weights=None)
    if hasattr(network, "fc"):
        network.fc = nn.Identity()
    else:
        network.classifier = nn.Identity()
    return HeadlessClassifier(network).double().eval()


class _OwnTimmModel(nn.Module):
    """A user's model around a timm backbone under another attribute name."""

    def __init__(self, arch: str):
        super().__init__()
        import timm

        self.trunk = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
        self.head = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.head(self.trunk(x)).flatten(1)


def test_default_layer_per_family():
    assert default_layer(tiny_timm_efficientnet()) == "backbone.blocks.3"
    assert default_layer(tiny_timm_resnet()) == "backbone.layer3"
    assert default_layer(_torchvision("resnet18")) == "network.layer3"
    assert default_layer(_torchvision("efficientnet_b0")) == "network.features.4"
    assert default_layer(_OwnTimmModel("efficientnet_b0")) == "trunk.blocks.3"
    assert default_layer(_OwnTimmModel("resnet18")) == "trunk.layer3"


def test_default_layers_are_listed_usable_and_match_across_libraries():
    """The default is a usable cut, marked in the listing; timm and torchvision EfficientNet-B0
    defaults are the same stage (80 channels at stride 16)."""
    shapes = {}
    for model in (tiny_timm_efficientnet(), _torchvision("efficientnet_b0"), tiny_timm_resnet()):
        layers = list_layers(model, (64, 64))
        (chosen,) = [info for info in layers if info.is_default]
        assert chosen.name == default_layer(model)
        shapes[chosen.name] = (chosen.shape, chosen.stride)
    assert shapes["backbone.blocks.3"] == ((80, 4, 4), 16.0)
    assert shapes["network.features.4"] == ((80, 4, 4), 16.0)
    assert shapes["backbone.layer3"] == ((256, 4, 4), 16.0)


def test_declared_default_and_unknown_family():
    model = plain_stack()
    with pytest.raises(LayerError, match="no default layer"):
        default_layer(model)
    # unknown family with an input size: the stage closest to stride 16 (here 4), shallowest name
    assert default_layer(model, (64, 64)) == "features"
    model.pairx_default_layer = "features.5"
    assert default_layer(model) == "features.5"
    assert [info.name for info in list_layers(model, (32, 32)) if info.is_default] == ["features.5"]
    model.pairx_default_layer = "features.55"
    with pytest.raises(LayerError) as caught:
        default_layer(model)
    assert "features.5" in caught.value.suggestions


def test_default_layer_for_spec_without_building():
    assert default_layer_for_spec("miewid?weights=/nowhere.safetensors") == "backbone.blocks.3"
    assert default_layer_for_spec("hf://org/miewid") == "backbone.blocks.3"
    assert default_layer_for_spec("timm:efficientnet_b0?size=128") == "backbone.blocks.3"
    assert default_layer_for_spec("timm:resnet18") == "backbone.layer3"
    assert default_layer_for_spec("torchvision:resnet50") == "network.layer3"
    assert default_layer_for_spec("torchvision:efficientnet_b0") == "network.features.4"
    assert default_layer_for_spec("demo") == "backbone.blocks.2"
    assert default_layer_for_spec("python:somewhere:factory") is None
    assert default_layer_for_spec("timm:convnext_tiny") is None


def _module_outputs(model: nn.Module, probe: torch.Tensor) -> dict[str, tuple[torch.Tensor, bool, int]]:
    """name -> (output, returns its input, calls) of every submodule."""
    seen: dict[str, list] = {}

    def hook(name):
        def record(module, args, output):
            entry = seen.setdefault(name, [output, any(output is a for a in args), 0])
            entry[2] += 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(probe)
    for handle in handles:
        handle.remove()
    return {name: tuple(entry) for name, entry in seen.items()}


def _small_timm_efficientnet() -> nn.Module:
    """A few timm EfficientNet blocks of each kind (depthwise, inverted residual with skip and SE)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e3_c16_se0.25"], ["ir_r2_k3_s2_e3_c24_se0.25"],
            ["ir_r3_k3_s2_e3_c32_se0.25"]]
    net = EfficientNet(decode_arch_def(arch), num_classes=0, global_pool="avg", stem_size=8, num_features=64)
    return net.double().eval()


def _small_timm_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0).double().eval()


@pytest.mark.parametrize("build", [_small_timm_efficientnet, _small_timm_resnet])
def test_listing_agrees_with_the_engine_cut_test(build):
    """Every 4-D module output is listed exactly when the engine's own detach-and-backward test
    accepts it (identities and modules run twice are left out: the engine refuses the latter)."""
    model = build()
    probe = random_images(1, size=32)
    listed = {info.name for info in list_layers(model, (32, 32))}
    accepted, refused = 0, 0
    candidates = []
    for name, (output, identity, calls) in _module_outputs(model, probe).items():
        if identity or calls != 1:
            continue
        if not (isinstance(output, torch.Tensor) and output.ndim == 4):
            assert name not in listed
            continue
        candidates.append(name)
    for name in candidates[:: max(1, len(candidates) // 24)]:  # an even sample keeps the test short
        try:
            _check_cut(model, probe, name)
            engine_accepts = True
        except (ConfigError, RuntimeError):  # RuntimeError: changed in place after the cut
            engine_accepts = False
        assert (name in listed) == engine_accepts, name
        accepted += engine_accepts
        refused += not engine_accepts
    assert accepted > 5 and refused > 5  # both outcomes really exercised


def test_listing_leaves_model_untouched_and_filters_leaves():
    model = tiny_timm_efficientnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list_layers(model, (64, 64))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    names = [info.name for info in layers]
    assert "backbone.blocks.3" in names and "backbone.blocks.3.1" in names
    assert "backbone.blocks.3.1.conv_pwl" not in names  # bypassed by the block's skip
    assert names.index("backbone.blocks.2") < names.index("backbone.blocks.3")  # forward order
    stages = [info.name for info in list_layers(model.eval(), (64, 64), include_leaves=False)]
    assert "backbone.blocks.3" in stages and "backbone.conv_stem" not in stages
    assert set(stages) < set(names)


def test_check_layers_names_the_layer_and_suggests():
    model = tiny_timm_efficientnet()
    check_layers(model, ["backbone.blocks.2", "backbone.blocks.3"], (32, 32))
    with pytest.raises(LayerError) as caught:
        check_layers(model, ["backbone.blocks.3", "backbone.block.3"], (32, 32))
    assert caught.value.layer == "backbone.block.3"
    assert "backbone.blocks.3" in caught.value.suggestions and "no submodule" in str(caught.value)
    with pytest.raises(LayerError, match="bypasses"):
        check_layers(model, ["backbone.blocks.3.1.conv_pwl"], (32, 32))
    with pytest.raises(LayerError, match=r"not a \(B, C, h, w\)"):
        check_layers(model, ["bn"], (32, 32))
    resnet = tiny_timm_resnet()
    with pytest.raises(LayerError) as caught:  # the EfficientNet default on a ResNet
        check_layers(resnet, ["backbone.blocks.3"], (32, 32))
    assert caught.value.suggestions[0] == "backbone.layer3"
    assert isinstance(caught.value, ConfigError)


def test_engine_suggests_names_before_any_work():
    model = tiny_timm_efficientnet()
    x = random_images(1, size=32)
    with pytest.raises(LayerError) as caught:
        explain(model, x, x, "backbone.blocks.33")
    assert "backbone.blocks.3" in caught.value.suggestions
    check_layer_names(model, ["backbone.blocks.3"])


def test_errors_round_trip_through_pickle():
    errors = [
        LayerError("backbone.block.3", "the model has no submodule of that name", ["backbone.blocks.3"]),
        UnsupportedModelError("my.Gate", "blocks.2.gate", "also add in 'x' (Res)", "mul"),
        UnsupportedModelError("my.Odd", "odd"),
        RandomWeightsError("timm:resnet18", "model 'timm:resnet18' has no weights"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error)
