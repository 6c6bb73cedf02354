"""SIGTERM and SIGINT stop a run wherever it is: exit 143 / 130, a ``cancelled`` row, the lease released.

Real ``pairx`` processes (with their own temporary Prefect server), held at a known point by
``tests/pause_points.py``: while the model and server start, while the run plans, while batches
run, and in a batch that does not notice interrupts (a task thread in native code): there the
process leaves after the grace time, or at once on a second signal.
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"
SHIM = Path(__file__).with_name("pause_points.py")
COMMON = ["--out", None, "--model", MODEL, "--layers", LAYER, "--allow-random-weights", "--workers", "0",
          "--k-colors", "0", "--k-lines", "5", "--batch-pairs", "2"]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = write_night(tmp_path_factory.mktemp("stop-night"), 3, seed=5, upload_seeds=range(1, 4))
    pairs = root / "pairs.csv"
    uploads = sorted((root / "uploads").glob("*.png"))
    gallery = sorted((root / "gallery").rglob("*.png"))
    pairs.write_text("image_0,image_1\n" + "".join(f"{u},{g}\n" for u in uploads for g in gallery))
    return root


def _command(command: str, night: Path, out: Path) -> list[str]:
    args = [str(night / "pairs.csv")] if command == "explain" else [
        "--uploads", str(night / "uploads"), "--gallery", str(night / "gallery"), "--top-k", "2", "--rerank-k", "0"]
    common = [str(out) if a is None else a for a in COMMON]
    return [command, *args, *common]


def _start(command: str, night: Path, out: Path, tmp_path: Path, pause: str, stubborn: bool = False):
    marker = tmp_path / "paused"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PAIRX_TEST_PAUSE=pause, PAIRX_TEST_PAUSE_MARKER=str(marker),
               PAIRX_TEST_PAUSE_STUBBORN="1" if stubborn else "0")
    proc = subprocess.Popen([sys.executable, str(SHIM), *_command(command, night, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the pause point was never reached"
        time.sleep(0.1)
    return proc


def _servers(proc) -> list:
    import psutil

    try:
        return [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _check_stopped(proc, out: Path, code: int, signal_name: str, servers: list, run_started: bool = True) -> str:
    import psutil

    from infra.tables import read_table

    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert f"interrupted ({signal_name}" in output and "Traceback" not in output, output
    assert not (out / "_pairx" / "lease.json").exists(), "the lease is still held"
    if run_started:
        runs = read_table(str(out), "runs")
        assert list(runs.status) == ["cancelled"], runs
        assert signal_name in runs.error.iloc[0]
    _, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, "the temporary Prefect server outlived the command"
    return output


@pytest.mark.parametrize("command, pause", [("nightly", "flows.nightly:plan_uploads"),
                                            ("explain", "flows.explain_pairs:read_pairs")])
def test_sigterm_while_planning(command, pause, night, tmp_path):
    out = tmp_path / "out"
    proc = _start(command, night, out, tmp_path, pause)
    servers = _servers(proc)
    proc.send_signal(signal.SIGTERM)
    _check_stopped(proc, out, 143, "SIGTERM", servers)


def test_sigint_while_the_server_starts(night, tmp_path):
    out = tmp_path / "out"
    proc = _start("explain", night, out, tmp_path, "infra.prefect_server:OwnedServer.wait_healthy")
    servers = _servers(proc)
    proc.send_signal(signal.SIGINT)
    _check_stopped(proc, out, 130, "SIGINT", servers, run_started=False)


@pytest.mark.parametrize("command, signals", [("explain", 1), ("nightly", 2)])
def test_sigterm_in_a_batch_that_does_not_stop(command, signals, night, tmp_path):
    """One signal: the process leaves after the grace time; two: at once. Row and lease either way."""
    out = tmp_path / "out"
    proc = _start(command, night, out, tmp_path, "tasks.explain:_run_engine", stubborn=True)
    servers = _servers(proc)
    for _ in range(signals):
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
    output = _check_stopped(proc, out, 143, "SIGTERM", servers)
    if signals == 1:  # the batch never returns: the grace time ran out (a second signal may end it sooner)
        assert "stopped at once" in output and "still running" in output
