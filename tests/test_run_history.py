"""Run history stays true: a CLI run killed without a chance to report is marked crashed later.

The next command on the same host (same Prefect database) finds the killed command's flow runs
still ``RUNNING``, sees from their tags that their process is gone, and marks them ``Crashed``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "timm:efficientnet_b0?size=64"


def _states(home: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(home / "prefect.db") as db:
        return db.execute("SELECT flow_run.name, state_type, tags FROM flow_run").fetchall()


def test_a_killed_cli_run_is_marked_crashed_by_the_next_command(tmp_path):
    night = write_night(tmp_path / "night", 2, seed=8)
    out, home, marker = tmp_path / "out", tmp_path / "prefect-home", tmp_path / "paused"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    args = ["nightly", "--uploads", str(night / "uploads"), "--gallery", str(night / "gallery"), "--out", str(out),
            "--model", MODEL, "--layers", "backbone.blocks.3", "--allow-random-weights", "--workers", "0",
            "--k-colors", "0", "--top-k", "1", "--rerank-k", "0"]
    killed = subprocess.Popen([sys.executable, str(Path(__file__).with_name("pause_points.py")), *args],
                              env={**env, "PAIRX_TEST_PAUSE": "flows.nightly:plan_uploads",
                                   "PAIRX_TEST_PAUSE_MARKER": str(marker)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.stdout.read() if killed.poll() else ""
        time.sleep(0.1)
    killed.kill()
    killed.wait(timeout=30)
    assert {state for _, state, _ in _states(home)} == {"RUNNING"}  # what a SIGKILL leaves behind

    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    states = _states(home)
    dead = [state for _, state, tags in states if f"pairx-pid:{killed.pid}@" in tags]
    assert dead and set(dead) == {"CRASHED"}, states
    assert "RUNNING" not in {state for _, state, _ in states}, states
