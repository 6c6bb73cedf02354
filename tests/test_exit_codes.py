"""No crash exits 0: a run recorded ``crashed`` exits 3 with one line naming the cause.

Whatever stopped it: an exception of any type, storage that stays down beyond the retries, or
the command's own temporary Prefect server dying mid-run (noticed at once, never a silent wait).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration]


MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return write_night(tmp_path_factory.mktemp("exit-night"), 2, seed=3)


def _nightly_args(night: Path, out: str, *extra: str) -> list[str]:
    return ["nightly", "--uploads", str(night / "uploads"), "--gallery", str(night / "gallery"), "--out", out,
            "--model", "demo", "--top-k", "1", "--k-colors", "0", "--workers", "0", *extra]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_exception_exits_3_with_one_line(prefect_harness, night, tmp_path, monkeypatch, debug):
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    import flows.nightly
    from flows.cli import app
    from infra.tables import read_table

    def broken(*args, **kwargs):
        raise ZeroDivisionError("planning divided by zero")

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    monkeypatch.setattr(flows.nightly, "plan_uploads", broken)
    out = str(tmp_path / "out")
    result = CliRunner().invoke(app, (["--debug"] if debug else []) + _nightly_args(night, out))
    assert result.exit_code == 3, result.output
    errors = _error_lines(result.output)
    assert len(errors) == 1 and "ZeroDivisionError: planning divided by zero" in errors[0], result.output
    assert ("Traceback" in result.output) is debug
    runs = read_table(out, "runs")
    assert list(runs.status) == ["crashed"] and "ZeroDivisionError" in runs.error.iloc[0]


@pytest.mark.slow
def test_storage_down_beyond_the_retries_exits_3(prefect_harness, night, s3_bucket, s3_server, monkeypatch):
    import s3fs
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    import flows.nightly
    from fault_proxy import BrownOut
    from flows.cli import app

    proxy = BrownOut(s3_server, seed=1).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("PAIRX_IO_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    s3fs.S3FileSystem.clear_instance_cache()
    plan_uploads = flows.nightly.plan_uploads

    def then_storage_goes_down(*args, **kwargs):
        proxy.failure_rate = 1.0  # the run holds its lease; from now on every request answers 503
        return plan_uploads(*args, **kwargs)

    monkeypatch.setattr(flows.nightly, "plan_uploads", then_storage_goes_down)
    try:
        result = CliRunner().invoke(app, _nightly_args(night, f"s3://{s3_bucket}/out"))
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    assert result.exit_code == 3, result.output
    assert proxy.failures >= 2
    errors = _error_lines(result.output)
    assert len(errors) == 1 and "recorded as crashed" in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_the_temporary_prefect_server_lost_mid_run_exits_3(night, tmp_path):
    """The command notices its server died, stops the run (recorded crashed), releases the lease."""
    import psutil

    from infra.tables import read_table

    marker, out = tmp_path / "paused", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PAIRX_TEST_PAUSE="tasks.explain:_run_engine", PAIRX_TEST_PAUSE_MARKER=str(marker))
    args = _nightly_args(night, str(out), "--rerank-k", "0")
    args[args.index("demo")] = MODEL
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("pause_points.py")), *args,
                             "--layers", LAYER, "--allow-random-weights"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():  # a batch runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.1)
    servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
    assert len(servers) == 1
    servers[0].send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output
    assert "the temporary Prefect server exited" in output and "recorded as crashed" in output, output
    assert not (out / "_pairx" / "lease.json").exists()
    runs = read_table(str(out), "runs")
    assert list(runs.status) == ["crashed"] and "Prefect server exited" in runs.error.iloc[0]
