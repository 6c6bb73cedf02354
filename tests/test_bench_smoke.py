"""Smoke tests of the benchmark scripts: they run and print valid JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "engine.py"

MEASUREMENT_KEYS = {
    "bench", "mode", "model", "layers", "k_colors", "batch_size", "pairs", "seconds_per_pair",
    "pairs_per_s", "speedup_vs_reference", "speedup_vs_engine_bs1", "peak_memory_bytes",
    "peak_memory_metric", "device", "dtype", "input_size",
}
ENGINE_KEYS = {"batches", "images_per_batch", "forward_passes", "relevance_backwards", "pixel_backwards"}


@pytest.mark.slow
@pytest.mark.timeout(100)
def test_soak_mode_reports_rss_after_every_batch() -> None:
    """``--soak N``: N pairs in separate calls, one JSON line per batch and a summary."""
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--soak", "3", "--batch-sizes", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    batches = [r for r in records if r["mode"] == "soak"]
    assert [r["pairs_done"] for r in batches] == [1, 2, 3]
    assert all(r["rss_bytes"] > 0 and r["seconds_per_pair"] > 0 for r in batches)
    summary = records[-1]
    assert summary["mode"] == "soak_summary" and summary["pairs"] == 3 and summary["batches"] == 3


@pytest.mark.slow
@pytest.mark.timeout(100)
def test_quick_benchmark_prints_json_lines() -> None:
    """Tiny model (timm test_efficientnet, 64 px), 2 pairs: about 20 s on 2 shared cores."""
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every stdout line is JSON
    measurements = [r for r in records if r["mode"] in ("engine", "reference")]
    summaries = [r for r in records if r["mode"] == "summary"]
    assert len(summaries) == 1 and records[-1]["mode"] == "summary"

    # quick: k_colors 3 and 0; reference + engine bs1 + engine bs2 for each
    assert {r["k_colors"] for r in measurements} == {3, 0}
    for k in (3, 0):
        group = [r for r in measurements if r["k_colors"] == k]
        assert sorted((r["mode"], r["batch_size"] or 0) for r in group) == [
            ("engine", 1), ("engine", 2), ("reference", 0)]
    for record in measurements:
        assert MEASUREMENT_KEYS <= record.keys(), MEASUREMENT_KEYS - record.keys()
        assert record["bench"] == "pairx_engine"
        assert record["pairs_per_s"] > 0 and record["seconds_per_pair"] > 0
        assert record["speedup_vs_reference"] > 0 and record["speedup_vs_engine_bs1"] > 0
        assert record["peak_memory_metric"].startswith("cpu_peak_rss")
        assert record["peak_memory_bytes"] >= 0
        if record["mode"] == "engine":
            assert ENGINE_KEYS <= record.keys()
            assert record["forward_passes"] == record["batches"]
            if record["batch_size"] == 1:
                assert record["speedup_vs_engine_bs1"] == 1.0
            else:
                assert record["batches"] == 1 and record["images_per_batch"] == [4]
            assert (record["pixel_backwards"] == 0) == (record["k_colors"] == 0)
            assert {"forward_and_setup", "relevance_backward", "matching", "pixel_passes"} <= record["phases"].keys()
    assert summaries[0]["groups"][0]["seconds_per_pair"]["engine_bs1"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plausibility_benchmark_table_and_plot(tmp_path: Path) -> None:
    """Demo model, 8 held-out identities: JSON per bin, an overall line, a PNG plot."""
    plot = tmp_path / "auc.png"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plausibility.py"), "--individuals", "8", "--photos", "2",
         "--false-per-true", "1", "--bins", "2", "--out", str(plot)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    bins, overall = records[:-1], records[-1]
    assert [b["bin"] for b in bins] == [0, 1]
    # 8 true pairs (one per identity) and up to 16 hard negatives (shared ones counted once)
    assert 8 < overall["pairs"] <= 24
    assert sum(b["n_true"] + b["n_false"] for b in bins) <= overall["pairs"]
    for record in bins:
        for key in ("auc_irm", "auc_match_coverage", "auc_relevance_share", "auc_inliers"):
            assert record[key] != record[key] or 0.0 <= record[key] <= 1.0   # NaN when a class is empty
    assert 0.0 <= overall["random_baseline"] < 0.1
    assert overall["match_accuracy_top10"] > overall["random_baseline"]   # PAIR-X beats random cells
    from PIL import Image
    assert Image.open(plot).size[0] > 200


def _bench_engine_module():

    return load_bench_script("engine")


def test_miewid_preset_is_the_real_size_workload() -> None:
    args = _bench_engine_module().parse_args(["--preset", "miewid", "--threads", "2"])
    assert args.model == "miewid-arch" and args.layer_sets == [["backbone.blocks.3"]]
    assert args.k_colors == [10] and args.batch_sizes == [4] and args.pairs == 4
    assert args.skip_reference and not args.engine_bs1 and args.repeats == 2
    # asked for explicitly, the baselines come back
    args = _bench_engine_module().parse_args(["--preset", "miewid", "--batch-sizes", "1,4", "--reference-pairs", "1"])
    assert not args.skip_reference and args.engine_bs1


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_compare_ref_runs_another_commits_engine_alternating() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--skip-reference", "--k-colors", "3", "--compare-ref", "HEAD"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    # both engines run in worker processes of their own, nothing else is measured in between
    assert sorted(r["mode"] for r in records if r["mode"] != "summary") == ["engine_worker", "ref_engine"]
    (ref,) = [r for r in records if r["mode"] == "ref_engine"]
    (ours,) = [r for r in records if r["mode"] == "engine_worker"]
    assert ref["batch_size"] == ours["batch_size"] == 2
    assert ref["seconds_per_pair"] > 0 and len(ref["ref_engine_commit"]) == 40
    assert ours["ratio_vs_ref_engine"] > 0 and ours["cpu_ratio_vs_ref_engine"] > 0
    assert ours["max_rel_diff_vs_ref_engine"] < 1e-4  # HEAD's pairx_core: the same numbers


def test_window_bound_measures_the_box_of_non_zero_relevance() -> None:
    share = load_bench_script("window_bound").relevance_box_share
    relevance = torch.zeros(2, 3, 4, 4)
    relevance[0, 1, 1, 1] = 2.0  # image 0: cells (1, 1) and (2, 3) -> rows 1-2, columns 1-3: 6 of 16
    relevance[0, 2, 2, 3] = -1.0
    assert share(relevance) == pytest.approx((6 / 16 + 0.0) / 2)  # image 1 carries nothing


@pytest.mark.timeout(120)
def test_window_bound_runs_at_a_small_size() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "window_bound.py"), "--size", "64", "--k-colors", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads(completed.stdout.strip().splitlines()[-1])
    assert record["model"] == "miewid-arch?size=64" and record["k_colors"] == 2
    # seeds of one cell never fill every layer's map at 64 px, and the bound is below the time itself
    assert 0 < record["time_weighted_share"] < 1 and 0 < record["bound_ratio"] < 1
