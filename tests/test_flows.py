"""Flows end to end on CPU: Prefect (test harness) on a Dask LocalCluster with 2 process workers."""

from __future__ import annotations

import pandas as pd
import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory):
    root = write_night(tmp_path_factory.mktemp("photos"), 3, seed=1)
    (root / "uploads" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _config(cls, **kwargs):
    kwargs.setdefault("workers", 0)  # tasks in this process unless a test asks for a Dask cluster
    return cls(model=MODEL, layers=[LAYER], k_colors=2, k_lines=5, batch_pairs=2, allow_random_weights=True, **kwargs)


def _failed_summary(call) -> dict:
    """The summary of a run that must end Failed (some items failed)."""
    from flows.common import ItemsFailedError

    with pytest.raises(ItemsFailedError) as raised:
        call()
    return raised.value.summary


def test_explain_pairs_errors_rows_and_rerun(prefect_harness, photo_folders, tmp_path):
    from flows.config import ExplainPairsConfig
    from flows.explain_pairs import explain_pairs
    from infra.tables import read_table

    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({
        "image_0": ["uploads/ind-0000.png", "uploads/ind-0001.png", "uploads/broken.jpg", "uploads/missing.png"],
        "image_1": ["gallery/ind-0000/a.png", "gallery/ind-0001/a.png",
                    "gallery/ind-0000/a.png", "gallery/ind-0001/a.png"],
        "pair_id": ["p0", "p1", "p2", "p3"],
    }).to_csv(pairs, index=False)
    out = tmp_path / "out"
    config = _config(ExplainPairsConfig, pairs=str(pairs), image_root=str(photo_folders), out=str(out),
                     max_missing=0.5)  # 1 of 6 images missing: an errors row, not a refused run
    summary = _failed_summary(lambda: explain_pairs(config))
    assert summary["done"] == 2 and summary["failed"] == 2 and summary["status"] == "failed"
    table = read_table(str(out), "pairs")
    assert sorted(table.pair_id) == ["p0", "p1"]
    assert all((out / "viz").rglob("*.png"))
    errors = read_table(str(out), "errors")
    assert {"p2", "p3"} <= set(errors["item"])
    matches = read_table(str(out), "matches")
    assert set(matches.pair_id) == {"p0", "p1"} and (matches["rank"] < 5).all()
    again = _failed_summary(lambda: explain_pairs(config))  # the broken inputs are still broken
    assert again["done"] == 0 and again["skipped"] == 2 and again["failed"] == 2
    assert len(read_table(str(out), "pairs")) == 2  # nothing new written
    runs = read_table(str(out), "runs").sort_values("started_at")
    assert len(runs) == 2 and set(runs.flow) == {"explain_pairs"}
    assert list(runs.status) == ["failed", "failed"] and list(runs.n_failed) == [2, 2]
    assert runs.model_spec.tolist() == [MODEL, MODEL] and runs.random_weights.all()


def test_crop_boxes_are_recorded_and_reprocessed(prefect_harness, photo_folders, tmp_path):
    """A pair explained on a crop is re-explained on the same crop by ``reprocess``."""
    from flows.config import ExplainPairsConfig, ReprocessConfig
    from flows.explain_pairs import explain_pairs
    from flows.reprocess import reprocess
    from infra.tables import read_table

    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({
        "image_0": ["uploads/ind-0000.png", "uploads/ind-0001.png"],
        "image_1": ["gallery/ind-0000/a.png", "gallery/ind-0001/a.png"],
        "pair_id": ["cropped", "whole"],
        "box_0": ["8 16 40 32", ""],
        "theta_1": [0.0, 0.3],
    }).to_csv(pairs, index=False)
    out = tmp_path / "out"
    assert explain_pairs(_config(ExplainPairsConfig, pairs=str(pairs), image_root=str(photo_folders),
                                 out=str(out)))["done"] == 2
    redo = reprocess(ReprocessConfig(out=str(out), model=MODEL + "&seed=1", layers=[LAYER], k_colors=2, k_lines=5,
                                     workers=0, allow_random_weights=True))
    assert redo["done"] == 2
    table = read_table(str(out), "pairs").set_index(["model_id", "pair_id"]).sort_index()
    for model_id in table.index.get_level_values(0).unique():
        assert list(table.loc[(model_id, "cropped"), "box_0"]) == [8.0, 16.0, 40.0, 32.0]
        assert table.loc[(model_id, "whole"), "box_0"] is None
        assert table.loc[(model_id, "whole"), "theta_1"] == pytest.approx(0.3)
    matches = read_table(str(out), "matches")
    cropped = matches[matches.pair_id == "cropped"]
    assert cropped.model_id.nunique() == 2
    # match positions are in ORIGINAL pixels, so they lie inside the crop for both models
    assert cropped.x_0.between(8, 48).all() and cropped.y_0.between(16, 48).all()


def test_nightly_on_local_cluster_then_skip_and_reprocess(prefect_harness, photo_folders, tmp_path):
    import duckdb

    from flows.config import NightlyConfig, ReprocessConfig
    from flows.nightly import nightly
    from flows.reprocess import reprocess
    from infra.tables import read_table

    out = tmp_path / "out"
    config = _config(NightlyConfig, uploads=str(photo_folders / "uploads"), gallery=str(photo_folders / "gallery"),
                     out=str(out), top_k=2, workers=2)
    first = _failed_summary(lambda: nightly(config))
    assert first["done"] == 6 and first["failed"] == 1  # the broken upload
    # every phase of the night has its wall clock (bench/pipeline.py's night_breakdown)
    phases = ("embed_wall", "embeddings_read_wall", "retrieval_wall", "stage1_wall", "engine", "candidates_wall")
    assert set(phases) <= set(first["stage_seconds"])
    assert all(first["stage_seconds"][phase] > 0 for phase in ("embed_wall", "stage1_wall", "engine"))
    assert sum(first["stage_seconds"][p] for p in phases if p != "engine") < first["seconds"]
    assert len(first["workers"]) >= 1 and all(w.startswith("tcp://127.0.0.1:") for w in first["workers"])
    candidates = read_table(str(out), "candidates")
    # re-ranking (default rerank_k 20): all 3 gallery images judged per upload, the best 2 explained
    assert len(candidates) == 9 and set(candidates["rank"]) == {0, 1, 2}
    assert set(candidates.loc[candidates.explained, "rank"]) == {0, 1} and candidates.explained.sum() == 6
    assert set(candidates.individual) <= {"ind-0000", "ind-0001", "ind-0002"}
    count = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{out}/tables/pairs/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0][0]
    assert count == 6

    second = nightly(config)
    # the 3 good uploads are done, the broken one is reported once, not every night
    assert second["done"] == 0 and second["skipped"] == 4 and second["failed"] == 0
    retried = _failed_summary(lambda: nightly(config.model_copy(update={"retry_failed": True})))
    assert retried["done"] == 0 and retried["failed"] == 1 and retried["skipped"] == 3

    before = {p: p.stat().st_mtime_ns for p in (out / "tables" / "pairs").rglob("*.parquet")}
    redo = reprocess(ReprocessConfig(out=str(out), model=MODEL + "&seed=1", layers=[LAYER], k_colors=2,
                                     k_lines=5, batch_pairs=3, workers=2, allow_random_weights=True))
    assert redo["done"] == 6 and redo["failed"] == 0
    pairs = read_table(str(out), "pairs")
    assert pairs.model_id.nunique() == 2 and (pairs.groupby("model_id").size() == 6).all()
    assert {p: p.stat().st_mtime_ns for p in before} == before  # old partition untouched


def test_explain_pairs_on_s3(prefect_harness, photo_folders, s3_bucket):
    """Images, pairs table and outputs all on a real S3 API (moto server)."""
    import boto3

    from flows.config import ExplainPairsConfig
    from flows.explain_pairs import explain_pairs
    from infra.tables import read_table

    client = boto3.client("s3")
    for path in photo_folders.rglob("*.png"):
        client.put_object(Bucket=s3_bucket, Key=f"photos/{path.relative_to(photo_folders)}", Body=path.read_bytes())
    table = ("image_0,image_1\nuploads/ind-0000.png,gallery/ind-0000/a.png\n"
             "uploads/ind-0001.png,gallery/ind-0001/a.png\n")
    client.put_object(Bucket=s3_bucket, Key="pairs.csv", Body=table.encode())
    config = _config(ExplainPairsConfig, pairs=f"s3://{s3_bucket}/pairs.csv", image_root=f"s3://{s3_bucket}/photos",
                     out=f"s3://{s3_bucket}/out")
    summary = explain_pairs(config)
    assert summary["done"] == 2 and summary["failed"] == 0
    pairs = read_table(f"s3://{s3_bucket}/out", "pairs")
    assert len(pairs) == 2 and pairs.viz_uri.str.startswith(f"s3://{s3_bucket}/out/viz/").all()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/viz/")["Contents"]]
    assert len(keys) == 2 and all(k.endswith(".png") for k in keys)
    assert explain_pairs(config)["skipped"] == 2


def test_gpu_annotated_tasks_land_on_gpu_workers(prefect_harness, photo_folders, tmp_path):
    """Resource annotations are honoured on an existing cluster: verified, not assumed."""
    from distributed import Client, Nanny, Scheduler, SpecCluster
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from flows.common import FlowSummary, explain_items
    from infra.cluster import worker_env
    from tasks.explain import PairItem, RunSettings

    workers = {
        "cpu": {"cls": Nanny, "options": {"nthreads": 1, "env": worker_env()}},
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "env": worker_env(), "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        info = client.scheduler_info()["workers"]
        gpu_address = next(addr for addr, w in info.items() if w.get("resources", {}).get("GPU"))

        items = [PairItem(f"p{i}", str(photo_folders / "uploads" / f"ind-000{i % 3}.png"),
                          str(photo_folders / "gallery" / f"ind-000{(i + 1) % 3}" / "a.png")) for i in range(4)]
        settings = RunSettings(out=str(tmp_path / "out"), model=MODEL, layers=(LAYER,), run_id="r", k_colors=0,
                               device="cpu", render=False)

        @flow(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        def annotated() -> FlowSummary:
            summary = FlowSummary(run_id="r", model_id="m")
            explain_items(items, settings, 1, summary, {"resources": {"GPU": 1}})
            return summary

        summary = annotated()
        assert summary.done + summary.skipped == 4  # p3 repeats p0: skipped by its output key
        assert summary.workers == {gpu_address}


def test_cli_exit_code_and_help(prefect_harness, photo_folders, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    runner = CliRunner()
    for command in ("explain", "nightly", "reprocess", "demo", "layers"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--model" in result.output + ("--model" if command == "demo" else "")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image_0,image_1\nuploads/ind-0000.png,gallery/ind-0000/a.png\nuploads/broken.jpg,gallery/ind-0001/a.png\n")
    args = ["explain", str(pairs), "--out", str(tmp_path / "out"), "--image-root", str(photo_folders),
            "--model", MODEL, "--layers", LAYER, "--k-colors", "0", "--workers", "1", "--allow-random-weights"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 1, result.output
    assert '"done": 1' in result.output and '"failed": 1' in result.output and '"status": "failed"' in result.output
    again = runner.invoke(app, args)  # the human summary
    assert again.exit_code == 1
    assert "explain_pairs failed: 0 explained, 1 skipped, 1 failed" in again.output
    assert f"errors: {tmp_path / 'out'}/tables/errors" in again.output
    bad = runner.invoke(app, args + ["--storage-option", "novalue"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output
