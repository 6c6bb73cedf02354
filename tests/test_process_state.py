"""Process-wide state: the library scopes the settings it changes; a task process sets its torch
mode once, when it starts (not when it loads a model), and keeps the few models it used last."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

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
    from collections import OrderedDict

    from infra import model_runtime as runtime

    built = []

    def counting_factory():
        built.append(threading.get_ident())
        return plain_stack(dtype=torch.float32)

    monkeypatch.setattr(model_helpers, "counting_factory", counting_factory, raising=False)
    monkeypatch.setattr(runtime, "_MODELS", OrderedDict())
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


def test_the_model_cache_keeps_the_models_used_last(monkeypatch):
    from collections import OrderedDict

    from infra import model_runtime as runtime

    monkeypatch.setattr(runtime, "_MODELS", OrderedDict())
    monkeypatch.setenv("PAIRX_MODELS_KEPT", "2")
    specs = [f"python:model_helpers:plain_stack?size={size}" for size in (32, 40, 48)]
    first = runtime.get_model(specs[0], "cpu")
    runtime.get_model(specs[1], "cpu")
    assert runtime.get_model(specs[0], "cpu") is first  # used again: now the most recent
    runtime.get_model(specs[2], "cpu")  # a third model: the least recently used (specs[1]) goes
    assert [spec for spec, _ in runtime._MODELS] == [specs[0], specs[2]]
    assert runtime.get_model(specs[0], "cpu") is first
    monkeypatch.delenv("PAIRX_MODELS_KEPT")
    assert runtime.models_kept() == runtime.DEFAULT_MODELS_KEPT


def _run_python(script: str, **env: str) -> str:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), **env}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_loading_a_model_leaves_the_process_settings_alone():
    """A test or CLI process that loads a model keeps its thread count and floating-point mode."""
    script = (
        "import torch\n"
        "torch.set_num_threads(3)\n"
        "from infra.model_runtime import get_model\n"
        "from pairx_core.runtime_settings import denormals_are_flushed\n"
        "get_model('python:model_helpers:plain_stack?size=32', 'cpu')\n"
        "print(torch.get_num_threads(), denormals_are_flushed())\n"
    )
    assert _run_python(script, PAIRX_TORCH_THREADS="1").split()[-2:] == ["3", "False"]


def test_a_task_process_flushes_denormals_on_all_intra_op_threads():
    """Torch's intra-op threads keep the floating-point mode they start with: a task process sets
    flush-to-zero when it starts (the worker preload), or LRP runs slow on all threads but one."""
    script = (
        "import numpy as np, torch\n"
        "from infra.worker_setup import dask_setup\n"
        "dask_setup(None)\n"
        "torch.set_num_threads(2)\n"
        "values = np.full(1_000_000, 1e-310)\n"  # denormals, written without arithmetic
        "product = (torch.from_numpy(values) * 1.0).numpy()\n"  # split over both intra-op threads
        "print(np.mean(product.view(np.int64) == 0))\n"  # flushed: the bits are zero
    )
    assert float(_run_python(script).strip().splitlines()[-1]) == 1.0  # every thread's share flushed


def test_a_task_process_keeps_freed_memory_for_the_next_pass():
    """Each pixel-map pass frees and re-allocates the same large tensors, which came back as
    fresh, faulting pages: always under Dask's MALLOC_TRIM_THRESHOLD_, and for the engine's mix
    of sizes with glibc's defaults too (50,000-90,000 faults per 8-pair batch, bench/engine.py)."""
    script = (
        "import resource, torch\n"
        "torch.set_num_threads(1)\n"
        "def churn():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        blocks = [torch.ones(2_000_000) for _ in range(16)]\n"  # 16 x 8 MB, freed together
        "        del blocks\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "churn()\n"
        "default = churn()\n"
        "from infra.worker_setup import dask_setup\n"
        "dask_setup(None)\n"
        "churn()\n"
        "print(default, churn())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    for dask_setting in (None, "65536"):
        if dask_setting:
            env["MALLOC_TRIM_THRESHOLD_"] = dask_setting
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        default, kept = map(int, done.stdout.split()[-2:])
        if not sys.platform.startswith("linux"):
            continue  # glibc only
        if dask_setting:  # glibc's adaptive thresholds are off: 5 x 128 MB faulted in again
            assert default > 100_000, default
        assert kept < 2_000, (dask_setting, default, kept)


def test_a_command_that_runs_tasks_sets_its_process_up_before_the_model_check(monkeypatch, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from flows.cli import app
    from pairx_core import runtime_settings

    (tmp_path / "gallery" / "ind-0").mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 120, 60)).save(tmp_path / "gallery" / "ind-0" / "a.png")
    (tmp_path / "uploads").mkdir()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no flow may start
    calls = []
    monkeypatch.setattr(runtime_settings, "configure_task_process", lambda: calls.append("configured"))
    result = CliRunner().invoke(app, ["nightly", "--uploads", str(tmp_path / "uploads"),
                                      "--gallery", str(tmp_path / "gallery"), "--out", str(tmp_path / "out"),
                                      "--model", "kaggle:whatever"])
    assert result.exit_code == 2 and "unknown model kind" in result.output, result.output
    assert calls == ["configured"]
