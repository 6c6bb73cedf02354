"""Faults injected into real runs; afterwards the tables are checked by ``output_key``.

Every case must end with every expected pair exactly once, no duplicated matches or candidates
(after ``pairx gc``, which removes what killed batches left), and a truthful outcome. The
README's reliability table lists these cases.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"
PAIRX = Path(sys.executable).parent / "pairx"
TOP_K = 2


# ------------------------------------------------------------------------------ data and checks
@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A 3-individual gallery and 24 uploads: 48 pairs, long enough to interrupt mid-way."""
    return write_night(tmp_path_factory.mktemp("fault-night"), 3, seed=11, upload_seeds=range(1, 9))


def _config(night, out, **kwargs):
    from flows.config import NightlyConfig

    values = dict(uploads=str(night / "uploads"), gallery=str(night / "gallery"), out=str(out), model=MODEL,
                  layers=[LAYER], k_colors=2, k_lines=5, top_k=TOP_K, rerank_k=0, batch_pairs=4, workers=0,
                  allow_random_weights=True)
    return NightlyConfig(**{**values, **kwargs})


def check_exactly_once(out: str, expected_pairs: int, storage_options=None) -> dict:
    """Every pair once, no duplicated matches or candidates; returns lost and duplicated counts."""
    from infra.gc import collect_orphans
    from infra.tables import read_table

    collect_orphans(out, min_age_s=0, storage_options=storage_options)
    pairs = read_table(out, "pairs", storage_options=storage_options)
    matches = read_table(out, "matches", storage_options=storage_options)
    candidates = read_table(out, "candidates", storage_options=storage_options)
    outcome = {
        "lost": expected_pairs - pairs.output_key.nunique(),
        "duplicated_pairs": int(pairs.output_key.duplicated().sum()),
        "duplicated_matches": int(matches.duplicated(["output_key", "rank"]).sum()),
        "orphan_matches": int((~matches.commit_id.isin(set(pairs.commit_id))).sum()),
        "duplicated_candidates": int(candidates.duplicated(["query", "gallery_image"]).sum()),
    }
    assert outcome == {"lost": 0, "duplicated_pairs": 0, "duplicated_matches": 0, "orphan_matches": 0,
                       "duplicated_candidates": 0}, outcome
    assert len(matches) == int(pairs.n_matches.clip(upper=5).sum())  # each pair's top k_lines matches, once
    return outcome


def _cli(night, out, tmp_path, *extra, api_url=None, uploads=None):
    """The installed CLI; without ``api_url`` it starts (and must not leak) its own Prefect server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.Popen(
        [str(PAIRX), "nightly", "--uploads", str(uploads or night / "uploads"), "--gallery", str(night / "gallery"),
         "--out", str(out), "--model", MODEL, "--layers", LAYER, "--allow-random-weights", "--k-colors", "2",
         "--k-lines", "5", "--top-k", str(TOP_K), "--rerank-k", "0", "--batch-pairs", "4", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        if proc is not None:
            assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)


# ------------------------------------------------------------------------------ (a) SIGKILL + rerun
def test_a_sigkill_of_the_cli_then_rerun(night, tmp_path):
    out = tmp_path / "out"
    killed = _cli(night, out, tmp_path, "--workers", "0")
    _wait_for(out / "tables" / "pairs", killed)
    killed.kill()
    killed.wait(timeout=30)
    rerun = _cli(night, out, tmp_path, "--workers", "0")
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    check_exactly_once(str(out), 24 * TOP_K)


# ------------------------------------------------------------------------------ (b) worker killed
def test_b_dask_worker_killed_mid_batch_then_rerun(prefect_harness, night, tmp_path):
    import psutil

    from flows.nightly import nightly

    out = tmp_path / "out"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(nightly(_config(night, out, workers=1))))
    runner.start()
    _wait_for(out / "tables" / "pairs")
    me = psutil.Process()
    workers = [p for p in me.children(recursive=True) if "multiprocessing" in " ".join(p.cmdline())]
    assert workers, "no Dask worker process found"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    runner.join(timeout=600)
    assert result.get("status") == "completed", result  # the nanny restarted it; its batch was recomputed
    again = nightly(_config(night, out))
    assert again["done"] == 0
    check_exactly_once(str(out), 24 * TOP_K)


# ------------------------------------------------------------------------------ (c) two at once
def test_c_two_identical_nights_at_once(prefect_harness, night, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from infra.tables import read_table

    out = tmp_path / "out"
    api = str(PREFECT_API_URL.value())
    first = _cli(night, out, tmp_path, "--workers", "0", "--json", api_url=api)
    second = _cli(night, out, tmp_path, "--workers", "0", "--json", api_url=api)
    outputs = [proc.communicate(timeout=600)[0] for proc in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    runs = read_table(str(out), "runs").sort_values("n_done")
    assert list(runs.status) == ["completed", "completed"]
    assert list(runs.n_done) == [0, 24 * TOP_K]  # one night did the work, the other waited and skipped it
    check_exactly_once(str(out), 24 * TOP_K)
    assert len(read_table(str(out), "candidates")) == 24 * TOP_K


# ------------------------------------------------------------------------------ (d) S3 brown-out
def test_d_s3_brown_out_then_recovery(prefect_harness, night, s3_bucket, s3_server, monkeypatch):
    import boto3

    from fault_proxy import BrownOut
    from flows.nightly import nightly

    client = boto3.client("s3")
    for path in night.rglob("*.png"):
        client.put_object(Bucket=s3_bucket, Key=f"data/{path.relative_to(night)}", Body=path.read_bytes())
    proxy = BrownOut(s3_server, seed=3).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    proxy.failure_rate = 0.5
    threading.Timer(15.0, lambda: setattr(proxy, "failure_rate", 0.0)).start()  # recovers after 15 s
    base = f"s3://{s3_bucket}"
    try:
        summary = nightly(_config(night, f"{base}/out", uploads=f"{base}/data/uploads", gallery=f"{base}/data/gallery",
                                  k_colors=0))
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    assert summary["status"] == "completed" and summary["done"] == 24 * TOP_K
    assert proxy.failures >= 5  # the brown-out really hit the run (absorbed by the client and our retries)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    check_exactly_once(f"{base}/out", 24 * TOP_K)


# ------------------------------------------------------------------------------ (e) damaged cache
def test_e_deleted_and_corrupted_cache_chunks_are_recomputed(prefect_harness, night, tmp_path):
    import numpy as np

    from flows.nightly import nightly
    from infra.tables import read_table

    clean, out = tmp_path / "clean", tmp_path / "out"
    first_uploads = tmp_path / "uploads-1"
    first_uploads.mkdir()
    for path in sorted((night / "uploads").glob("*.png"))[:3]:
        shutil.copy(path, first_uploads / path.name)
    nightly(_config(night, out, uploads=str(first_uploads), k_colors=0))
    chunks = sorted(p for p in (out / "cache").rglob("*") if p.is_file() and "/embeddings/c/" in str(p))
    assert len(chunks) >= 1
    chunks[0].unlink()  # a deleted chunk: zarr would read zeros
    for chunk in chunks[1:]:  # overwritten bytes: zarr would decode garbage
        raw = bytearray(chunk.read_bytes())
        raw[-16:] = bytes(range(16))
        chunk.write_bytes(bytes(raw))

    damaged = nightly(_config(night, out, k_colors=0))
    reference = nightly(_config(night, clean, k_colors=0))
    assert damaged["cache"]["damaged"] >= 1 and reference["cache"]["damaged"] == 0
    runs = read_table(str(out), "runs").sort_values("started_at")
    assert runs.cache_damaged.iloc[-1] >= 1
    mine = read_table(str(out), "candidates")
    mine = mine[mine["query"].str.startswith(str(night))]  # tonight's uploads (night 1 used copies)
    mine = mine.set_index(["query", "gallery_image"]).similarity.sort_index()
    truth = read_table(str(clean), "candidates").set_index(["query", "gallery_image"]).similarity.sort_index()
    assert np.isfinite(mine).all() and (mine.abs() > 0.01).all()
    np.testing.assert_allclose(mine.to_numpy(), truth.to_numpy(), atol=1e-5)  # same answers as a clean cache
    check_exactly_once(str(out), 24 * TOP_K)


# ------------------------------------------------------------------------------ (f) between writes
def test_f_failure_between_a_batch_writes_then_rerun(prefect_harness, night, tmp_path, monkeypatch):
    import tasks.explain as explain_module
    from flows.nightly import nightly

    out = tmp_path / "out"
    real_write = explain_module.write_table
    state = {"failed": 0}

    def failing_write(out_url, name, rows, *args, **kwargs):
        if name == "pairs" and state["failed"] < 1:
            state["failed"] += 1
            raise OSError(5, "injected I/O error between the matches and the pairs write")
        return real_write(out_url, name, rows, *args, **kwargs)

    monkeypatch.setattr(explain_module, "write_table", failing_write)
    state_ = nightly(_config(night, out), return_state=True)
    assert state_.is_failed() and state["failed"] == 1
    monkeypatch.setattr(explain_module, "write_table", real_write)
    from infra.tables import read_table

    runs = read_table(str(out), "runs")
    assert list(runs.status) == ["crashed"] and "injected" in runs.error.iloc[0]
    # the failed batch removed its matches file before the error went up: no orphan even before gc
    pairs, matches = read_table(str(out), "pairs"), read_table(str(out), "matches")
    assert matches.commit_id.isin(set(pairs.commit_id)).all()
    summary = nightly(_config(night, out))
    assert summary["status"] == "completed"
    check_exactly_once(str(out), 24 * TOP_K)


# ------------------------------------------------------------------------------ (g) read-only root
@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs root and setpriv to drop to "
                                                                             "an unprivileged user")
def test_g_read_only_output_root(night):
    """An unprivileged user whose output folder is not writable: exit 2 in preflight, nothing written."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="pairx-readonly-"))
    try:
        shared.chmod(0o755)
        shutil.copytree(night, shared / "night")
        out = shared / "out"
        out.mkdir()  # owned by root, mode 755: read-only for the user below
        home = shared / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        env = {**os.environ, "PREFECT_HOME": str(home), "HOME": str(home), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(PAIRX), "nightly", "--uploads",
             str(shared / "night" / "uploads"), "--gallery", str(shared / "night" / "gallery"), "--out", str(out),
             "--model", MODEL, "--allow-random-weights"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "read-only" in done.stderr and str(out) in done.stderr
        assert list(out.iterdir()) == []  # nothing written, nothing half-written
    finally:
        shutil.rmtree(shared, ignore_errors=True)
