"""Credentials given to the CLI never reach Prefect's database, its logs, or the tables."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY, SECRET = "AKIAPAIRXTESTKEY0042", "pairx-secret-value-7f3c9e"



def _api_dump(api: str) -> str:
    """Everything Prefect's API holds about runs: flow runs, task runs, logs, artifacts, variables."""
    texts = []
    for path in ("flow_runs/filter", "task_runs/filter", "logs/filter", "artifacts/filter", "variables/filter",
                 "deployments/filter", "block_documents/filter"):
        request = urllib.request.Request(f"{api}/{path}", data=json.dumps({"limit": 200}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            texts.append(response.read().decode())
    return "\n".join(texts)


def test_storage_credentials_stay_out_of_prefect_logs_and_tables(prefect_harness, s3_bucket, monkeypatch):
    import boto3
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    from flows.cli import app
    from infra.tables import TABLE_SCHEMAS, read_table
    from pairx_core.synthetic import make_individuals, render_photo

    client = boto3.client("s3")
    for ind in make_individuals(2, seed=5):
        for role, seed in (("gallery", 0), ("uploads", 1)):
            photo = render_photo(ind, seed=seed, size=(64, 64)).image
            import io

            buffer = io.BytesIO()
            photo.save(buffer, format="PNG")
            key = f"{role}/{ind.id}/a.png" if role == "gallery" else f"{role}/{ind.id}.png"
            client.put_object(Bucket=s3_bucket, Key=key, Body=buffer.getvalue())
    api = str(PREFECT_API_URL.value())
    monkeypatch.setenv("PREFECT_API_URL", api)
    out = f"s3://{s3_bucket}/out"
    result = CliRunner().invoke(app, [
        "--log-level", "INFO", "nightly", "--uploads", f"s3://{s3_bucket}/uploads",
        "--gallery", f"s3://{s3_bucket}/gallery", "--out", out, "--model", "demo", "--top-k", "1",
        "--k-colors", "1", "--workers", "1", "--storage-option", f"key={KEY}", "--storage-option", f"secret={SECRET}",
        "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["done"] == 2

    for secret in (KEY, SECRET):
        assert secret not in result.output
        assert secret not in _api_dump(api)
        for name in TABLE_SCHEMAS:
            frame = read_table(out, name)
            assert secret not in frame.to_json(default_handler=str, date_format="iso"), name
    # the run really used storage: its runs row is there, with the parameters (without credentials)
    runs = read_table(out, "runs")
    assert len(runs) == 1 and json.loads(runs.parameters.iloc[0])["model"] == "demo"


PASSWORD, SIGNATURE, WEIGHTS_KEY_ID = "pairx-pass-5be1c9", "pairxsig0c0ffee42", "AKIAPAIRXWEIGHTS0001"


@pytest.fixture
def credentialed_weights(tmp_path):
    """A weights file behind a local HTTP server, named by a signed URL with user info."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import quote

    from safetensors.torch import save_file

    from infra.model_store import load_model

    model, _ = load_model("timm:efficientnet_b0?size=64")
    served = tmp_path / "served"
    served.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, served / "w.safetensors")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the test's output is grepped: no request lines of its own
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    inner = (f"http://weights-user:{PASSWORD}@127.0.0.1:{server.server_address[1]}/w.safetensors?"
             f"X-Amz-Credential={WEIGHTS_KEY_ID}%2F20261204%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={SIGNATURE}")
    try:
        yield f"timm:efficientnet_b0?size=64&weights={quote(inner, safe='')}"
    finally:
        server.shutdown()


def test_a_debug_night_with_a_credentialed_model_url_leaks_nothing(prefect_harness, s3_bucket, credentialed_weights,
                                                                  tmp_path):
    """Tables, logs (DEBUG, botocore included, Dask worker too), Prefect's API and the site: no secret."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import boto3
    from prefect.settings import PREFECT_API_URL

    from infra.tables import TABLE_SCHEMAS, read_table
    from night_helpers import write_night

    night = write_night(tmp_path / "night", 2, seed=4)
    api = str(PREFECT_API_URL.value())
    out = f"s3://{s3_bucket}/out"
    env = {**os.environ, "PREFECT_API_URL": api}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pairx"), "--log-level", "DEBUG", "nightly", "--uploads",
         str(night / "uploads"), "--gallery", str(night / "gallery"), "--out", out, "--model", credentialed_weights,
         "--layers", "backbone.blocks.3", "--top-k", "1", "--k-colors", "1", "--workers", "1",
         "--storage-option", f"key={KEY}", "--storage-option", f"secret={SECRET}"],
        env=env, capture_output=True, text=True, timeout=600)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-5000:]
    assert "botocore" in logs and "X-Amz-Signature" in logs  # DEBUG really logged storage and the model URL

    client = boto3.client("s3")
    objects = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]
    stored = [client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read() for o in objects]
    assert any(o["Key"].endswith(".html") for o in objects)  # the review site was written
    tables = [read_table(out, name).to_json(default_handler=str, date_format="iso") for name in TABLE_SCHEMAS]
    prefect = _api_dump(api)
    assert "***" in read_table(out, "runs").parameters.iloc[0]
    for secret in (PASSWORD, SIGNATURE, WEIGHTS_KEY_ID, KEY, SECRET):
        assert secret not in logs, secret
        assert secret not in prefect, secret
        assert all(secret not in table for table in tables), secret
        assert all(secret.encode() not in blob for blob in stored), secret
