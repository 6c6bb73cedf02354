"""bench/pipeline.py's night breakdown: every phase of a night as shares of its wall time."""

from __future__ import annotations

import pytest

from bench_scripts import load_bench_script


def _pipeline_bench():
    return load_bench_script("pipeline")


def test_shares_cover_every_phase_and_sum_to_one():
    stages = {"embed_wall": 30.0, "embeddings_read_wall": 0.5, "retrieval_wall": 0.5, "stage1_wall": 20.0,
              "stage1_engine": 19.0, "decode": 1.0, "engine": 30.0, "render": 2.0, "render_busy": 6.0,
              "write": 1.0, "candidates_wall": 1.0}
    shares = _pipeline_bench().night_breakdown(stages, explain_seconds=40.0, flow_seconds=100.0)
    assert shares == {"embedding": 0.3, "retrieval": 0.01, "stage1_rerank": 0.2, "write": 0.02, "decode": 0.01,
                      "engine": 0.3, "render": 0.02, "orchestration": 0.14}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_parallel_workers_share_out_the_fan_out_wall_time():
    # two workers: 60 s of task stages in a 30 s fan-out
    stages = {"engine": 50.0, "render": 10.0}
    shares = _pipeline_bench().night_breakdown(stages, explain_seconds=30.0, flow_seconds=40.0)
    assert shares["engine"] == pytest.approx(25 / 40, abs=1e-3) and shares["render"] == pytest.approx(5 / 40, abs=1e-3)
    assert shares["orchestration"] == pytest.approx(0.25, abs=1e-3)


def test_rerank_k_reaches_the_night_only_when_asked(tmp_path):
    import argparse

    bench = _pipeline_bench()
    options = dict(model="demo", layer="backbone.blocks.2", k_colors=3, top_k=2, batch_pairs=4, workers=0,
                   render_inline=False)
    default = bench.night_config(argparse.Namespace(rerank_k=None, **options), "up", "gal", tmp_path / "out")
    chosen = bench.night_config(argparse.Namespace(rerank_k=12, **options), "up", "gal", tmp_path / "out")
    assert default.rerank_k == 5 and chosen.rerank_k == 12
    assert (chosen.top_k, chosen.k_colors, chosen.out) == (2, 3, str(tmp_path / "out"))
