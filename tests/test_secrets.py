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
