"""Engine and benchmark switches prepared for GPU runs, checked on the CPU: bfloat16 autocast,
the agreement check against strict float32, and the switches of bench/engine.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench_scripts import load_bench_script
from model_helpers import plain_stack, random_images, tiny_timm_efficientnet
from pairx_core import ConfigError, EngineStats, ExplainConfig, explain

ROOT = Path(__file__).resolve().parents[1]
LAYER = "backbone.blocks.3"


def _bench_engine():
    return load_bench_script("engine")


def test_bfloat16_autocast_returns_float32_and_the_same_top_matches():
    model = tiny_timm_efficientnet(torch.float32)
    images = random_images(4, 64, dtype=torch.float32, seed=5)
    strict = explain(model, images[:2], images[2:], LAYER, k_colors=3, k_lines=5)
    fast = explain(model, images[:2], images[2:], LAYER, k_colors=3, k_lines=5, autocast="bfloat16")
    columns = ["row_0", "col_0", "row_1", "col_1"]
    for a, b in zip(strict, fast):
        la, lb = a.layers[LAYER], b.layers[LAYER]
        assert lb.relevance_0.dtype == lb.pixel_relevance_0.dtype == b.embedding_0.dtype == np.float32
        assert la.matches[columns].head(5).equals(lb.matches[columns].head(5))
        assert np.corrcoef(la.pixel_relevance_0.ravel(), lb.pixel_relevance_0.ravel())[0, 1] > 0.99
        assert b.similarity == pytest.approx(a.similarity, abs=1e-2)


def test_autocast_setting_is_checked():
    with pytest.raises(ConfigError, match="autocast"):
        ExplainConfig(autocast="float8")


def test_bfloat16_autocast_is_refused_on_cuda():
    """Measured on an H200: the rules' convolution backward is outside autocast's coverage (bf16
    input, float32 weight); a clear refusal instead of a RuntimeError deep in a backward pass."""
    from pairx_core.engine import _autocast

    with pytest.raises(ConfigError, match="CPU only"):
        _autocast(ExplainConfig(autocast="bfloat16"), torch.device("cuda"))


def test_agreement_against_strict_float32_of_the_same_call_is_complete():
    model = plain_stack(torch.float32)
    runner = SimpleNamespace(model=model, device=torch.device("cpu"), memory_budget=None,
                             x0=random_images(2, 16, dtype=torch.float32, seed=1),
                             x1=random_images(2, 16, dtype=torch.float32, seed=2),
                             args=SimpleNamespace(k_lines=4, memory_format="contiguous", autocast="off"))
    agreement = _bench_engine().agreement_vs_fp32(runner, ["features.3"], 2, 2, 2)
    assert agreement["pairs"] == 2 and agreement["top_k_match_overlap_min"] == 1.0
    assert agreement["pixel_maps_compared"] > 0 and agreement["pixel_map_corr_min"] == pytest.approx(1.0)
    assert agreement["similarity_max_abs_diff"] == 0.0


def test_bench_switches_for_gpu_variants():
    bench = _bench_engine()
    args = bench.parse_args(["--preset", "miewid", "--k-colors", "10,0", "--autocast", "bfloat16", "--agreement",
                             "--pixel-pass-group", "5"])
    assert args.k_colors == [10, 0] and args.autocast == "bfloat16" and args.agreement and args.pixel_pass_group == 5
    assert bench.parse_args(["--preset", "miewid"]).k_colors == [10]
    assert bench.parse_args([]).k_colors == [10, 0] and not bench.parse_args([]).cudnn_benchmark
    with pytest.raises(SystemExit):  # a GPU switch on the CPU is a usage error
        bench.parse_args(["--cudnn-benchmark"])


def test_gpu_scripts_parse():
    for script in ("gpu_matrix.sh", "gpu_check.sh", "gpu_env.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "bench" / script)]).returncode == 0


def test_grouped_pixel_passes_give_the_same_maps_float64():
    """Several pixel passes in one vmapped backward call (is_grads_batched): the same pixel maps."""
    model = tiny_timm_efficientnet(torch.float64)
    images = random_images(4, 64, seed=7)
    one, grouped = EngineStats(), EngineStats()
    single = explain(model, images[:2], images[2:], LAYER, k_colors=4, k_lines=5, stats=one)
    stacked = explain(model, images[:2], images[2:], LAYER, k_colors=4, k_lines=5, pixel_pass_group=3,
                      stats=grouped)
    assert one.pixel_backwards == grouped.pixel_backwards > 3  # a full group of 3 and a rest
    for a, b in zip(single, stacked):
        la, lb = a.layers[LAYER], b.layers[LAYER]
        for side in ("pixel_relevance_0", "pixel_relevance_1"):
            u, v = getattr(la, side), getattr(lb, side)
            assert u.shape == v.shape and np.abs(u - v).max() <= 1e-12 * np.abs(u).max()
    with pytest.raises(ConfigError, match="pixel_pass_group"):
        ExplainConfig(pixel_pass_group=0)
