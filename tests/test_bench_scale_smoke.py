"""Smoke tests of bench/decode.py and bench/gallery.py: tiny settings, valid JSON, work checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> list[dict]:
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]


def test_decode_bench_uses_draft_scales():
    records = {r["mode"]: r for r in _run("decode.py", "--width", "1600", "--height", "1200", "--size", "96",
                                             "--picture-long-side", "512", "--repeats", "1", "--batch", "2")}
    assert records["full"]["decode_scale"] == 1 and records["full"]["decoded_chip_size"] == [1600, 1200]
    assert records["draft"]["decode_scale"] == 2  # 800 >= 512 > 400: the picture floor decides
    assert records["draft_model_only"]["decode_scale"] == 8  # 150 >= 96: only the model input bounds it
    embed_step = records.pop("embed_step")  # the embed task's decode: full (before) and draft (after)
    assert embed_step["photos"] == 2 and embed_step["decode_scale_before_full"] == 1
    assert embed_step["ms_per_photo_before_full"] > 0 and embed_step["ms_per_photo_after_draft"] > 0
    detections = records.pop("detections")  # several boxes cut from one decode, against one decode per box
    assert detections["detections"] == 3 and detections["ms_boxes_one_decode"] > 0
    assert all(r["ms_decode_preprocess"] > 0 and r["batch_images_per_s"] > 0 for r in records.values())


def test_gallery_bench_counts_files_and_compacts():
    records = _run("gallery.py", "--galleries", "300", "--uploads", "20", "--dim", "64", "--nights", "2",
                   "--batch-pairs", "8", "--embed-batch", "10", "--repeats", "1")
    retrieval, growth, compaction = records
    assert retrieval["gallery"] == 300 and retrieval["matrix_bytes"] == 300 * 64 * 4 and retrieval["same_top_k"]
    # per night: 100 pairs / 8 -> 13 pairs + 13 matches files, 2 images, 1 candidates, 1 runs
    assert growth["files_per_night"] == 30 and growth["files_total"] == 60
    assert compaction["files_after"] == 2 * 5 and compaction["pairs_rows"] == 200


def test_rerank_bench_reports_hits_by_depth():
    records = {r["run"]: r for r in _run("rerank.py", "--uploads", "4", "--individuals", "5", "--gallery-photos", "1",
                                         "--size", "64", "--rerank-k", "4", "--top-k", "1", "--k-colors", "0",
                                         "--skip-full", "--depths", "2,9")}
    assert "full_all" not in records and records["setup"]["pairs_stage1"] == 4 * 4
    assert records["two_stage"]["pairs_stage2"] == 4  # the top-1 of each upload after re-ranking
    first = records["explain_first"]  # the night's order: top-1 explained, stage 1 for the other 3
    assert first["pairs_first"] == 4 and first["pairs_stage1"] == 4 * 3
    lifted_at_4 = records["ground_truth_by_depth"]["depths"]["4"]["lifted_per_upload"]
    assert first["pairs_lifted"] == round(lifted_at_4 * 4)  # uploads whose best is not the most similar
    assert records["ground_truth_by_depth"]["depths"]["1"]["lifted_per_upload"] == 0.0
    truth, by_depth = records["ground_truth"], records["ground_truth_by_depth"]["depths"]
    assert sorted(by_depth, key=int) == ["1", "2", "4", "9"]  # top_k and rerank_k always; 9 > rerank_k kept
    # the two ends of the depths are the rankings the ground-truth line reports
    assert by_depth["1"]["top_k_hit"] == truth["top_k_hit_rerank_over_top_k"]
    assert by_depth["4"]["top_k_hit"] == truth["top_k_hit_rerank_over_k"]
    assert by_depth["4"]["rank0_hit"] == truth["rank0_hit_rerank_over_k"]
    assert by_depth["9"] == by_depth["4"]  # deeper than the candidates judged: the same rows
    assert all(0.0 <= v <= 1.0 for hits in by_depth.values() for v in hits.values())
