"""Errors are never silent: every failure path exits non-zero with one ``error:`` line.

Exit-2 cases run with and without ``--debug`` (with it: the traceback too, same exit code);
``--json`` puts a JSON error object on stdout; a night with failed items ends with the list of
the failed items and the errors table, not a Prefect traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

PAIRX = Path(sys.executable).parent / "pairx"

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # a run that started would fail loudly
    monkeypatch.setenv("PAIRX_IO_ATTEMPTS", "1")  # an unreachable URL fails at once
    return CliRunner()


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from night_helpers import write_night

    root = write_night(tmp_path_factory.mktemp("report-night"), 2, seed=9)
    (root / "pairs.csv").write_text(f"image_0,image_1\n{root}/uploads/a.png,{root}/uploads/b.png\n")
    return root


def _cases(night: Path, out: str) -> dict[str, tuple[list[str], str]]:
    nightly = ["nightly", "--uploads", str(night / "uploads"), "--gallery", str(night / "gallery"), "--out", out]
    return {
        "missing uploads": (["nightly", "--uploads", str(night / "nonexistent"), "--gallery", str(night / "gallery"),
                             "--out", out, "--model", "demo"], "uploads folder does not exist"),
        "missing pairs table": (["explain", str(night / "missing.csv"), "--out", out, "--model", "demo"],
                                "missing.csv"),
        "unreachable model": ([*nightly, "--model", f"{MODEL}&weights=http://127.0.0.1:9/w.safetensors"],
                              "127.0.0.1:9"),
        "random weights": ([*nightly, "--model", MODEL], "--allow-random-weights"),
    }


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("case", ["missing uploads", "missing pairs table", "unreachable model", "random weights"])
def test_each_bad_input_exits_2_with_one_line(runner, night, tmp_path, case, debug):
    args, fragment = _cases(night, str(tmp_path / "out"))[case]
    result = runner.invoke(app, (["--debug"] if debug else []) + args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert ("Traceback" in result.output) is debug, result.output


def test_json_mode_prints_the_error_object_on_stdout(runner, night, tmp_path):
    args, fragment = _cases(night, str(tmp_path / "out"))["missing uploads"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout[result.stdout.index("{"):])
    assert error["status"] == "error" and error["exit_code"] == 2 and fragment in error["error"]


def test_the_installed_command_with_debug_is_not_silent(night, tmp_path):
    """The console script itself (not only the app): a bad input with --debug exits 2 and says why."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    done = subprocess.run([str(PAIRX), "--debug", "nightly", "--uploads", str(tmp_path / "nonexistent"), "--gallery",
                           str(night / "gallery"), "--out", str(tmp_path / "out"), "--model", "demo"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: " in done.stderr and "uploads folder does not exist" in done.stderr
    assert "Traceback" in done.stderr


def _failing_night(night: Path, tmp_path: Path) -> Path:
    import shutil

    uploads = tmp_path / "uploads"
    shutil.copytree(night / "uploads", uploads)
    (uploads / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return uploads


@pytest.mark.integration
def test_json_lists_the_failed_items(prefect_harness, night, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    uploads = _failing_night(night, tmp_path)
    result = CliRunner().invoke(app, ["nightly", "--uploads", str(uploads), "--gallery", str(night / "gallery"),
                                      "--out", str(tmp_path / "out"), "--model", "demo", "--top-k", "1",
                                      "--k-colors", "0", "--workers", "0", "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["failed"] == 1 and summary["errors_table"].endswith("tables/errors")
    assert [(item["item"], item["stage"]) for item in summary["failed_items"]] == [(str(uploads / "corrupt.jpg"),
                                                                                    "load")]


@pytest.mark.integration
@pytest.mark.slow
def test_a_night_with_failed_items_ends_with_their_list_not_a_traceback(night, tmp_path):
    uploads = _failing_night(night, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([str(PAIRX), "nightly", "--uploads", str(uploads), "--gallery", str(night / "gallery"),
                           "--out", str(tmp_path / "out"), "--model", "demo", "--top-k", "1", "--k-colors", "0",
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert "failed items:" in lines and any("corrupt.jpg [load]" in line for line in lines), done.stdout
    assert any(line.startswith("errors: ") and "tables/errors" in line for line in lines)


def test_progress_counts_embedding_and_reranking_before_any_pair():
    """The bar (and its ETA) moves from the first finished batch of any phase."""
    from flows.console import progress_units
    from flows.run_record import FlowSummary

    summary = FlowSummary(run_id="r")
    assert progress_units(summary) == ("preparing", 0, None)
    summary.advance("embed", planned=100)
    summary.advance("embed", 32)
    assert progress_units(summary) == ("embedding", 32, 100)
    summary.advance("embed", 68)
    summary.advance("stage1", planned=40)
    summary.advance("stage1", 10)
    assert progress_units(summary) == ("re-ranking", 110, 140)
    summary.advance("stage1", 30)
    summary.advance("explain", planned=12)
    summary.advance("explain", 4)
    assert progress_units(summary) == ("pairs", 144, 152)
