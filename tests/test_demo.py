"""The README's main command, ``pairx demo``, end to end in a temporary folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_pairx_demo_end_to_end(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the CLI starts its own temporary server
    pairx = Path(sys.executable).parent / "pairx"
    out = tmp_path / "demo"
    completed = subprocess.run([str(pairx), "demo", "--out", str(out), "--individuals", "4", "--top-k", "2",
                                "--json", "--auto-decide"], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout)
    assert summary["done"] == 8 and summary["failed"] == 0 and summary["status"] == "completed"
    assert 0.0 <= summary["top1_accuracy"] <= 1.0 and summary["true_pairs_scored"] >= 1
    # camera-trap frames through a detector file: 4 animals, empty frames, one failure, one false box dropped
    frames = summary["frames"]
    assert frames["n_detections"] == 4 and frames["n_empty"] >= 1 and frames["n_failures"] == 1
    assert summary["uploads"] == 4 and "detector failure" in summary["detections"]
    assert summary["index_html"].endswith("index.html") and summary["report"].endswith("report/index.html")
    # quiet by default: the first line says what will be done; no INFO lines of Dask or Prefect
    stderr = completed.stderr.splitlines()
    assert stderr[0].startswith("demo: 4 synthetic individuals")
    assert not [line for line in stderr if "INFO" in line and ("distributed" in line or "prefect" in line.lower())]

    index = (out / "index.html").read_text()
    pictures = re.findall(r"src='([^']+\.png)'", index)
    viz = [p for p in pictures if "/viz/" in p]
    assert len(viz) == 8  # one PAIR-X picture per (upload, candidate)
    assert all((out / p).exists() for p in pictures)  # relative links resolve without a server

    from infra.tables import read_table

    results = str(out / "results")
    candidates = read_table(results, "candidates")
    pairs = read_table(results, "pairs")
    # 4 uploads x 8 gallery photos judged by stage 1, the top 2 of each explained in full
    assert len(candidates) == 32 and len(pairs) == 8 and candidates["explained"].sum() == 8
    # one picture per pair, named by layer and the batch write that committed it
    assert all(Path(u).name == f"{layer}-{commit}.png" for u, layer, commit in zip(pairs.viz_uri, pairs.layer,
                                                                                  pairs.commit_id))
    # the page shows exactly the pictures the pairs table points at
    assert {str((out / p).resolve()) for p in viz} == {str(Path(u).resolve()) for u in pairs.viz_uri}
    # PAIR-X's top matches on true pairs land on the true spot more often than random cells
    assert summary["match_accuracy_top10"] > summary["match_accuracy_random"]

    # --auto-decide: ground truth decided every detection on its own (all 4 individuals are in the
    # gallery, and stage 1 judged all 8 gallery photos), so every review view has rows
    assert summary["decisions"] == {"match": frames["n_detections"]}
    import duckdb

    from infra.views import create_views

    views = create_views(duckdb.connect(), results)
    decided = views.execute("SELECT count(*), count(DISTINCT (query, detection_id)) FROM latest_decisions "
                            "WHERE detection_id IS NOT NULL").fetchone()
    assert decided == (frames["n_detections"], frames["n_detections"])  # one row per detection
    for view in ("latest_decisions", "review_progress", "model_precision", "plausibility_calibration"):
        assert views.execute(f"SELECT count(*) FROM {view}").fetchone()[0] > 0, view
    assert views.execute("SELECT DISTINCT reviewer FROM decisions").fetchall() == [("demo-ground-truth",)]
    assert "id='model-precision'" in (Path(results) / "report" / "index.html").read_text()

    # the same night again through `pairx nightly`: nothing new, and nothing but the summary said
    rerun = subprocess.run([str(pairx), "nightly", "--uploads", str(out / "data" / "uploads"), "--gallery",
                            str(out / "data" / "gallery"), "--out", results, "--model", "demo",
                            "--detections", str(out / "data" / "detections.json")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = (rerun.stdout + rerun.stderr).splitlines()
    assert any(line.startswith("nightly completed: 0 explained, 4 skipped, 0 failed") for line in said), said
    assert not [line for line in said if "WARNING" in line or "Still processing" in line], said


def test_demo_page_shows_the_nights_top_k_only(tmp_path):
    """The demo page shows each upload's final top_k: not a candidate only judged by stage 1, nor
    one explained first and then displaced by the re-ranking (it keeps its picture elsewhere)."""
    from flows.demo import write_index
    from infra.tables import write_table
    from test_report import _complete

    out = str(tmp_path / "out")
    rows = []
    for rank, (gallery, explained) in enumerate([("lifted", True), ("kept", True), ("displaced", True),
                                                  ("judged", False)]):
        rows.append(_complete("candidates", {
            "query": "/photos/u.png", "rank": rank, "gallery_image": f"/photos/{gallery}.png", "individual": gallery,
            "similarity": 0.9 - rank / 10, "irm": 0.5, "rerank_score": 0.7, "pair_id": f"p{rank}",
            "layer": "l", "viz_uri": f"/viz/{gallery}.png" if explained else None, "explained": explained,
            "top_k": 2, "model_id": "m", "run_id": "r"}))
    write_table(out, "candidates", rows, "m", "r")
    write_index(tmp_path, out, {"/photos/u.png": {"individual": "kept"}}, "l")
    page = (tmp_path / "index.html").read_text()
    assert "lifted.png" in page and "kept.png" in page
    assert "displaced.png" not in page and "judged.png" not in page
    assert "2 more candidate(s) ranked lower" in page
