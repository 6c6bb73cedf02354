"""One forward trace serves layer listing, layer and batch planning, splitting and the canonizer check."""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
from torch import nn

from pairx_core.batch_plan import max_images_per_batch
from pairx_core.canonizers import UnknownModuleWarning, check_supported
from pairx_core.forward_trace import forward_trace
from pairx_core.layer_plan import plan_layers
from pairx_core.layers import check_layers, list_layers
from pairx_core.split import can_split

SIZE = 16


class SignSwitchActivation(nn.Module):
    """A custom activation whose forward ``torch.fx`` cannot trace (it branches on the data)."""

    def forward(self, x):
        if bool(x.detach().sum() > 0):
            return torch.relu(x)
        return x * 0.5


class TracedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.act = SignSwitchActivation()
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.pool(self.body(self.act(self.stem(x)))))


def _counted_model() -> tuple[TracedNet, list[int]]:
    torch.manual_seed(0)
    model = TracedNet().double().eval()
    stem_calls = [0]
    model.stem.register_forward_hook(lambda *_: stem_calls.__setitem__(0, stem_calls[0] + 1))
    return model, stem_calls


def test_all_planners_together_run_one_probe_forward():
    """Listing, checking and planning layers, planning a batch, splitting and the canonizer check
    on one model and input size: the network's input layer runs exactly once (the split check runs
    the upper network only)."""
    model, stem_calls = _counted_model()
    probe = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64)
    layers = [info.name for info in list_layers(model, (SIZE, SIZE))]
    assert "body" in layers and "body.0" in layers and "stem" in layers
    check_layers(model, ["body"], (SIZE, SIZE))
    assert plan_layers(model, probe, ["body.0", "body"]).ordered == ("body.0", "body")
    assert max_images_per_batch(model, probe, 1 << 30, torch.device("cpu")) >= 2
    assert can_split(model, "body", (SIZE, SIZE), torch.float64) is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_supported(model, example_input=probe) == {"act": "SignSwitchActivation"}
    assert any(issubclass(w.category, UnknownModuleWarning) for w in caught)
    assert stem_calls[0] == 1


def test_a_model_changed_in_place_is_traced_anew():
    model, stem_calls = _counted_model()
    first = forward_trace(model, (SIZE, SIZE))
    assert forward_trace(model, (SIZE, SIZE)) is first and stem_calls[0] == 1
    assert first.module("body.1").module_type == "ReLU"
    model.body[1] = nn.GELU()
    second = forward_trace(model, (SIZE, SIZE))
    assert second is not first and stem_calls[0] == 2
    assert second.module("body.1").module_type == "GELU"
    assert [info.module_type for info in list_layers(model, (SIZE, SIZE)) if info.name == "body.1"] == ["GELU"]
    assert forward_trace(model, (SIZE + 8, SIZE + 8)) is not second  # another input size: its own trace
    assert stem_calls[0] == 3


def test_trace_records_calls_shapes_lineage_and_keeps_cut_outputs():
    model, _ = _counted_model()
    trace = forward_trace(model, (SIZE, SIZE))
    body, inner = trace.module("body"), trace.module("body.0")
    assert body.output_shape == (1, 8, SIZE // 2, SIZE // 2) and body.calls == 1 and body.is_cut
    (start, end), (inner_start, inner_end) = body.spans[0], inner.spans[0]
    assert start < inner_start < inner_end < end  # nested in the call order
    assert trace.module("act").fed_by == ("stem",) and inner.fed_by == ("act",)
    assert trace.module("head").fed_by == ("pool.1",)  # the innermost module that produced it
    assert trace.module("head").output_shape == (1, 5) and not trace.module("head").is_feature_map
    expected = model.body(model.act(model.stem(trace.probe)))
    torch.testing.assert_close(trace.layer_output("body"), expected.detach())
    assert trace.layer_output("head") is None
    assert trace.first_inputs("act") is not None and trace.first_inputs("stem") is None  # library type


def test_a_trace_does_not_keep_its_model_alive():
    model, _ = _counted_model()
    forward_trace(model, (SIZE, SIZE))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
