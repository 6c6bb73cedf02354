"""A nightly rerun with nothing new: recorded from listings and tables, without Prefect or torch.

The short path needs the model's facts remembered by an earlier run on the same output, keyed by
what decides them (spec, layers, the weights file's size and mtime, versions); anything else takes
the normal path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from night_helpers import write_night

from flows.config import NightlyConfig
from flows.night_plan import MODELS_FILE, model_key, record_quiet_night, remember_model, remembered_model
from flows.preflight import ModelPlan
from infra.tables import read_table

LAYER = "backbone.blocks.3"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_night(tmp_path_factory.mktemp("quiet"), 2, seed=5, uploaders=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from pairx_core.models import load_model, save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "effnet.safetensors"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_model("timm:efficientnet_b0?size=64")
    save_checkpoint(model, path)
    return path


def _config(photos: Path, out: Path, weights: Path, **extra) -> NightlyConfig:
    return NightlyConfig(uploads=str(photos / "uploads"), gallery=str(photos / "gallery"), out=str(out),
                         model=f"timm:efficientnet_b0?size=64&weights={weights}", layers=[LAYER], **extra)


def _night(photos: Path, out: Path, weights: Path, home: Path) -> tuple[dict, str]:
    """One ``pairx nightly --json`` in a fresh interpreter that reports its imports (stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows.cli", "nightly", "--uploads", str(photos / "uploads"),
         "--gallery", str(photos / "gallery"), "--out", str(out),
         "--model", f"timm:efficientnet_b0?size=64&weights={weights}", "--layers", LAYER, "--k-colors", "1",
         "--k-lines", "3", "--top-k", "1", "--rerank-k", "0", "--workers", "0", "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_rerun_with_nothing_new_takes_the_short_path(photos, weights, tmp_path):
    out = tmp_path / "out"
    first, _ = _night(photos, out, weights, tmp_path / "prefect")
    assert first["done"] == 1 and "model" in first["startup"]
    assert (out / MODELS_FILE).exists()

    second, imports = _night(photos, out, weights, tmp_path / "prefect")
    assert second["startup"].keys() >= {"quiet_night"} and "model" not in second["startup"]
    assert second["short_path"] and second["done"] == 0 and second["skipped"] == 1
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in imports.splitlines() if "|" in line}
    assert not imported & {"torch", "prefect", "distributed", "timm"}, imported & {"torch", "prefect"}

    runs = read_table(str(out), "runs").sort_values("started_at")
    assert list(runs.status) == ["completed", "completed"]
    assert list(runs.n_skipped) == [0, 1] and list(runs.n_done) == [1, 0]
    assert runs.model_id.nunique() == 1 and runs.weights_digest.nunique() == 1
    assert runs.iloc[1].run_id == second["run_id"]


def test_other_weights_or_new_uploads_take_the_normal_path(photos, weights, tmp_path):
    out = tmp_path / "out"
    config = _config(photos, out, weights)
    assert record_quiet_night(config) is None  # nothing remembered yet
    remember_model(config, ModelPlan("model-a", (LAYER,), {"model_spec": config.model}))
    assert remembered_model(config).model_id == "model-a"
    # the upload was never explained for model-a: there is work, nothing is written
    assert record_quiet_night(config) is None
    assert not (out / "tables" / "runs").exists()
    # the weights file changed (new mtime): another key, so the facts are not reused
    key = model_key(config)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert model_key(config) != key and remembered_model(config) is None
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # other layers: another key too
    assert model_key(_config(photos, out, weights).model_copy(update={"layers": ["backbone.blocks.2"]})) != key


def test_remote_or_random_weights_are_never_remembered(photos, tmp_path):
    base = dict(uploads=str(photos / "uploads"), gallery=str(photos / "gallery"), out=str(tmp_path / "out"))
    assert model_key(NightlyConfig(**base, model="timm:resnet18", allow_random_weights=True)) is None
    assert model_key(NightlyConfig(**base, model="miewid?weights=s3://bucket/w.safetensors")) is None
    assert model_key(NightlyConfig(**base, model="python:my_models:build")) is None
