"""The CLI as a user meets it: checks before any work, one-line errors, exit codes, version.

Preflight failures happen before a Prefect server, a cluster or a model starts, so these tests
need none of them (each command here would fail the test if it started one: no API is set and
the tests never wait for a server).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

MODEL = "timm:efficientnet_b0?size=64"
PAIRX = Path(sys.executable).parent / "pairx"


@pytest.fixture
def runner(monkeypatch):
    # a dead API: a command that tried to run a flow would fail loudly instead of starting a server
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    return CliRunner()


@pytest.fixture
def photos(tmp_path):
    from pairx_core.synthetic import make_individuals, render_photo

    for ind in make_individuals(2, seed=1):
        (tmp_path / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=(64, 64)).image.save(tmp_path / "gallery" / ind.id / "a.png")
    (tmp_path / "uploads").mkdir()
    return tmp_path


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("pairx ")


def test_missing_uploads_folder_is_not_a_quiet_night(runner, photos, tmp_path):
    missing = tmp_path / "not-mounted"
    result = runner.invoke(app, ["nightly", "--uploads", str(missing), "--gallery", str(photos / "gallery"),
                                 "--out", str(tmp_path / "out"), "--model", "demo"])
    _one_line_error(result, str(missing), "uploads folder does not exist")


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"left,right\na.png,b.png\n", "lacks column(s) image_0, image_1"),
    (b"image_0,image_1\n", "has no rows"),
    (b"image_0,image_1,box_0\na.png,b.png,1 2 3\n", "row 2"),
    (b"image_0,image_1,box_0\na.png,b.png,5\n", "row 2, column box_0"),
    (b"image_0,image_1\na.png,b.png\n", "2 of the 2 images it references do not exist"),
])
def test_bad_pairs_tables_are_named(runner, tmp_path, content, fragment):
    table = tmp_path / "pairs.csv"
    table.write_bytes(content)
    result = runner.invoke(app, ["explain", str(table), "--out", str(tmp_path / "out"), "--model", "demo"])
    _one_line_error(result, str(table), fragment)


def test_missing_pairs_table(runner, tmp_path):
    result = runner.invoke(app, ["explain", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out"),
                                 "--model", "demo"])
    _one_line_error(result, "nope.csv", "not found")


def test_unknown_model_kind(runner, photos, tmp_path):
    result = runner.invoke(app, ["nightly", "--uploads", str(photos / "uploads"), "--gallery", str(photos / "gallery"),
                                 "--out", str(tmp_path / "out"), "--model", "kaggle:whatever"])
    _one_line_error(result, "unknown model kind 'kaggle'")


def test_random_weights_refused_with_a_hint(runner, photos, tmp_path):
    result = runner.invoke(app, ["nightly", "--uploads", str(photos / "uploads"), "--gallery", str(photos / "gallery"),
                                 "--out", str(tmp_path / "out"), "--model", "timm:resnet18"])
    _one_line_error(result, "random initialisation", "--allow-random-weights", "timm:resnet18?weights=")


def test_wrong_layer_suggests_names(runner, photos, tmp_path):
    result = runner.invoke(app, ["nightly", "--uploads", str(photos / "uploads"), "--gallery", str(photos / "gallery"),
                                 "--out", str(tmp_path / "out"), "--model", MODEL, "--allow-random-weights",
                                 "--layers", "backbone.blocks.33"])
    _one_line_error(result, "backbone.blocks.33", "backbone.blocks.3")


def test_bad_option_value_is_one_line(runner, photos, tmp_path):
    result = runner.invoke(app, ["nightly", "--uploads", str(photos / "uploads"), "--gallery", str(photos / "gallery"),
                                 "--out", str(tmp_path / "out"), "--model", "demo", "--top-k", "0"])
    _one_line_error(result, "top_k")


def test_secret_storage_options_refused_in_configs():
    from pydantic import ValidationError

    from flows.config import NightlyConfig

    with pytest.raises(ValidationError, match="look like credentials"):
        NightlyConfig(uploads="s3://b/u", gallery="s3://b/g", out="s3://b/o", model="demo",
                      storage_options={"key": "AKIA123", "client_kwargs": {"region_name": "eu-west-1"}})
    ok = NightlyConfig(uploads="s3://b/u", gallery="s3://b/g", out="s3://b/o", model="demo",
                       storage_options={"anon": False, "client_kwargs": {"region_name": "eu-west-1"}})
    assert ok.storage_options["anon"] is False


def test_layers_command_marks_the_default():
    result = CliRunner().invoke(app, ["layers", "--model", MODEL])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines()[1:] if line.strip()]
    defaults = [line for line in rows if line.startswith("*")]
    assert len(defaults) == 1 and "backbone.blocks.3" in defaults[0]
    assert any("backbone.blocks.2" in line for line in rows)


def test_preflight_in_a_real_process_is_quick_and_quiet(photos, tmp_path):
    """The installed ``pairx`` command: a missing folder fails with exit 2 and one stderr line.

    (No time is asserted; the README gives the measured seconds.)
    """
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    done = subprocess.run([str(PAIRX), "nightly", "--uploads", str(tmp_path / "gone"), "--gallery",
                           str(photos / "gallery"), "--out", str(tmp_path / "out"), "--model", "demo"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'gone'}: the uploads folder does not exist "
                                                "(not mounted? wrong path?)"]


def test_cache_info_and_prune_commands(tmp_path):
    import numpy as np

    from flows.cli import app
    from infra.cache import ActivationCache

    out = tmp_path / "out"
    ActivationCache(str(out / "cache"), "model-a", "prep1").put(["h1", "h2"], np.ones((2, 4), np.float32))
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "info", str(out)])
    assert result.exit_code == 0, result.output
    assert "model-a: 2 image(s), 1 batch(es)" in result.output
    result = runner.invoke(app, ["cache", "prune", str(out)])
    assert result.exit_code != 0  # nothing to prune said
    result = runner.invoke(app, ["cache", "prune", str(out), "--older-than", "1"])
    assert result.exit_code == 0 and "removed 0 batch(es)" in result.output
    result = runner.invoke(app, ["cache", "prune", str(out), "--model", "model-a"])
    assert result.exit_code == 2 and "--yes" in result.output  # the only model: the whole cache
    assert "model-a: 2 image(s)" in runner.invoke(app, ["cache", "info", str(out)]).output
    result = runner.invoke(app, ["cache", "prune", str(out), "--model", "model-a", "--yes"])
    assert result.exit_code == 0 and "removed model model-a" in result.output
    assert "0 model(s)" in runner.invoke(app, ["cache", "info", str(out)]).output


def test_summary_says_when_re_ranking_was_skipped(tmp_path):
    from flows.console import human_summary

    skipped = {"done": 4, "run_id": "r", "rerank": "off: rerank_k 2 is not more than top_k 3"}
    assert "re-ranking off: rerank_k 2 is not more than top_k 3" in human_summary("nightly", skipped, str(tmp_path))
    assert "re-ranking" not in human_summary("nightly", {"done": 4, "run_id": "r"}, str(tmp_path))
