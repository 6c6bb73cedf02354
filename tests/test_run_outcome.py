"""A run's outcome is true everywhere: Prefect state, exit code, ``runs.status``, ``errors`` rows.

Flow-level tests run the entry flows with ``workers=0`` (tasks in this process) on the session's
Prefect test server; the process tests run the installed ``pairx`` command and signal it.
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
PAIRX = Path(sys.executable).parent / "pairx"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_night(tmp_path_factory.mktemp("outcome-photos"), 3, seed=7)


def _config(photos, out, **kwargs):
    from flows.config import NightlyConfig

    values = dict(uploads=str(photos / "uploads"), gallery=str(photos / "gallery"), out=str(out), model=MODEL,
                  layers=[LAYER], k_colors=0, k_lines=5, top_k=1, workers=0, allow_random_weights=True)
    return NightlyConfig(**{**values, **kwargs})


def _runs(out):
    from infra.tables import read_table

    return read_table(str(out), "runs")


def test_errors_table_exists_on_a_night_without_errors(prefect_harness, photos, tmp_path):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    from flows.nightly import nightly

    out = tmp_path / "out"
    summary = nightly(_config(photos, out))
    assert summary["status"] == "completed" and summary["done"] == 3
    glob = f"{out}/tables/errors/**/*.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()[0][0] == 0
    assert len(pd.read_parquet(out / "tables" / "errors")) == 0
    assert ds.dataset(out / "tables" / "errors", format="parquet", partitioning="hive").count_rows() == 0
    runs = _runs(out)
    assert list(runs.status) == ["completed"] and runs.error.isna().all()


def test_failed_items_fail_the_prefect_run_with_counts(prefect_harness, photos, tmp_path):
    import shutil

    from prefect.client.orchestration import get_client

    from flows.common import ItemsFailedError
    from flows.nightly import nightly

    uploads = tmp_path / "uploads"
    shutil.copytree(photos / "uploads", uploads)
    (uploads / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "out"
    state = nightly(_config(photos, out, uploads=str(uploads)), return_state=True)
    assert state.is_failed()
    assert "1 item(s) failed, 3 done" in state.message and "tables/errors" in state.message
    with pytest.raises(ItemsFailedError) as raised:
        state.result()
    assert raised.value.summary["failed"] == 1
    runs = _runs(out)
    assert list(runs.status) == ["failed"] and runs.n_failed.iloc[0] == 1 and runs.n_done.iloc[0] == 3

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio

    mine = [a for a in asyncio.run(artifacts())
            if a.flow_run_id == state.state_details.flow_run_id and a.key == "pairx-nightly-summary"]
    assert [a.type for a in mine] == ["markdown"], [(a.key, a.type, a.task_run_id) for a in mine]
    assert "| failed | 1 |" in mine[0].data and "tables/errors" in mine[0].data


def test_crash_before_the_first_batch_is_recorded(prefect_harness, photos, tmp_path):
    from flows.nightly import nightly
    from infra.inputs import InputError

    out = tmp_path / "out"
    config = _config(photos, out, gallery=str(tmp_path / "no-gallery"))
    state = nightly(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(InputError):
        state.result()
    runs = _runs(out)
    assert list(runs.status) == ["crashed"]
    assert "gallery folder does not exist" in runs.error.iloc[0]


def test_interrupt_is_recorded_as_cancelled(prefect_harness, photos, tmp_path, monkeypatch):
    import flows.night_plan as night_plan_module
    import flows.nightly as nightly_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(night_plan_module, "list_uploads_counted", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        nightly_module.nightly(_config(photos, out))
    runs = _runs(out)
    assert list(runs.status) == ["cancelled"] and runs.error.iloc[0].startswith("KeyboardInterrupt")


def test_interrupt_counts_the_pairs_batches_wrote_before_they_were_gathered(prefect_harness, photos, tmp_path,
                                                                             monkeypatch):
    """A stop between a batch's write and the flow's gathering of its result loses no count."""
    from flows.nightly import nightly
    from flows.run_record import FlowSummary
    from infra.tables import read_table

    def interrupted(self, batch):
        raise KeyboardInterrupt  # the first result comes back: its pairs are written, not yet added

    monkeypatch.setattr(FlowSummary, "add", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        nightly(_config(photos, out, batch_pairs=1))
    runs = _runs(out)
    written = read_table(str(out), "pairs")
    assert list(runs.status) == ["cancelled"]
    assert len(written) >= 1 and set(written.run_id) == set(runs.run_id)
    assert runs.n_done.iloc[0] == len(written)


# ------------------------------------------------------------------------------ real processes
def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def long_night(photos, tmp_path_factory):
    """40 uploads against the 3-image gallery: 120 pairs, long enough to interrupt mid-way."""
    from pairx_core.synthetic import make_individuals, render_photo

    uploads = tmp_path_factory.mktemp("long-night")
    for ind in make_individuals(3, seed=7):
        for seed in range(2, 15):
            render_photo(ind, seed=seed, size=(64, 64)).image.save(uploads / f"{ind.id}-{seed}.png")
    return uploads


def _start_cli(photos, uploads, out, tmp_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.Popen([str(PAIRX), "nightly", "--uploads", str(uploads), "--gallery",
                             str(photos / "gallery"), "--out", str(out), "--model", MODEL, "--layers", LAYER,
                             "--allow-random-weights", "--workers", "0", "--k-colors", "10", "--top-k", "3",
                             "--rerank-k", "0",  # pairs start at once (stage 1 of 40 x 20 pairs would come first)
                             "--batch-pairs", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _server_of(proc: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        servers = [c for c in _children(proc.pid) if "uvicorn" in " ".join(c.cmdline())]
        if servers:
            return servers[0]
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError("the temporary Prefect server did not start")


@pytest.mark.slow
def test_sigterm_records_cancelled_and_sigkill_leaves_no_server(photos, long_night, tmp_path):
    import psutil

    from infra.tables import read_table

    out = tmp_path / "out"
    proc = _start_cli(photos, long_night, out, tmp_path)
    server = _server_of(proc)
    deadline = time.monotonic() + 180
    while not list((out / "tables").glob("pairs/*/*/part-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()  # until a first batch has written its pairs
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "recorded as cancelled" in output and "Traceback" not in output
    runs = _runs(out)
    assert list(runs.status) == ["cancelled"] and "SIGTERM" in runs.error.iloc[0]
    written = len(read_table(str(out), "pairs"))
    assert 0 < runs.n_done.iloc[0] <= written < 120  # the counts so far, written pairs included
    psutil.wait_procs([server], timeout=30)
    assert not server.is_running()

    killed = _start_cli(photos, long_night, tmp_path / "out-killed", tmp_path)
    server = _server_of(killed)
    killed.kill()
    killed.wait(timeout=30)
    gone, alive = psutil.wait_procs([server], timeout=30)
    assert not alive, "the temporary Prefect server outlived its SIGKILLed CLI"
