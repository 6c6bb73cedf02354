"""Process-wide state: settings the library changes are scoped, and a worker builds a model once."""

from __future__ import annotations

import threading

import pytest
import torch

import model_helpers
from model_helpers import plain_stack
from pairx_core.layers import list_layers
from pairx_core.runtime_settings import denormals_are_flushed, denormals_flushed


@pytest.fixture
def denormals_kept():
    """Denormals kept (torch's default) for the test; the session's setting restored after."""
    before = denormals_are_flushed()
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(before)


def test_denormals_flushed_inside_the_block_and_restored_after(denormals_kept):
    tiny = torch.full((4,), 1e-310, dtype=torch.float64)
    assert not denormals_are_flushed() and (tiny * 1.0).ne(0).all()
    with denormals_flushed("cpu"):
        assert denormals_are_flushed() and (tiny * 1.0).eq(0).all()
        with denormals_flushed():
            assert denormals_are_flushed()
        assert denormals_are_flushed()  # the inner block restored the outer block's state
    assert not denormals_are_flushed()
    with pytest.raises(RuntimeError), denormals_flushed("cpu"):
        raise RuntimeError("restored on error too")
    assert not denormals_are_flushed()


def test_a_caller_that_flushes_keeps_flushing(denormals_kept):
    torch.set_flush_denormal(True)
    with denormals_flushed("cpu"):
        pass
    assert denormals_are_flushed()


def test_layer_scan_leaves_the_callers_setting_alone(denormals_kept):
    assert list_layers(plain_stack(), (32, 32))
    assert not denormals_are_flushed()


def test_a_worker_builds_each_model_once(monkeypatch):
    from tasks import runtime

    built = []

    def counting_factory():
        built.append(threading.get_ident())
        return plain_stack(dtype=torch.float32)

    monkeypatch.setattr(model_helpers, "counting_factory", counting_factory, raising=False)
    monkeypatch.setattr(runtime, "_MODELS", {})
    spec = "python:model_helpers:counting_factory?size=32"
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(runtime.get_model(spec, "cpu"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1  # four concurrent first calls, one build
    assert all(item is loaded[0] for item in loaded)
    assert runtime.get_model(spec, "cpu") is loaded[0]
    assert not any(p.requires_grad for p in loaded[0].model.parameters())
