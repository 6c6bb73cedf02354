"""The README's deployment recipe, run for real: Prefect server, Dask scheduler + worker,
``prefect deploy`` from ``infra/prefect.yaml``, a process work pool and worker, a deployment run.

Every service is a subprocess on 127.0.0.1 started here and stopped at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: README "Switching the nightly schedule on", second step, as written there
RESUME_NIGHTLY = """
SCHEDULE_ID=$(.venv/bin/prefect deployment schedule ls nightly/nightly --output json |
              .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
.venv/bin/prefect deployment schedule resume nightly/nightly "$SCHEDULE_ID"
""".replace(".venv/bin/", f"{BIN}/")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a service exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout} s")


class Services:
    """Subprocesses with logs in one folder; all stopped by :meth:`stop`."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env, self.procs = folder, env, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # closed with the process
        proc = subprocess.Popen(list(args), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def _get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}{path}", timeout=5) as response:
        return json.load(response)


def _flow_run_id(created: str) -> str:
    return next(line.split()[-1] for line in created.splitlines() if "UUID" in line)


@pytest.fixture
def photo_night(tmp_path):
    from pairx_core.synthetic import make_individuals, render_photo

    root = tmp_path / "photos"
    for ind in make_individuals(3, seed=3):
        (root / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=(96, 96)).image.save(root / "gallery" / ind.id / "a.png")
        (root / "uploads").mkdir(exist_ok=True)
        render_photo(ind, seed=1, size=(96, 96)).image.save(root / "uploads" / f"{ind.id}.png")
    return root


@pytest.mark.integration
@pytest.mark.slow
def test_nightly_deployment_runs_on_the_dask_worker(photo_night, tmp_path):
    prefect_port, dask_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "DASK_TEMPORARY_DIRECTORY": str(tmp_path / "dask"), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    logs = Path(os.environ.get("PAIRX_TEST_SERVICE_LOGS", tmp_path / "logs"))
    logs.mkdir(parents=True, exist_ok=True)
    services = Services(logs, env)
    scheduler = f"tcp://127.0.0.1:{dask_port}"
    try:
        server = services.start("prefect-server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                "--port", str(prefect_port))
        dask_scheduler = services.start("dask-scheduler", str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                        "--port", str(dask_port), "--dashboard-address", ":0")
        dask_worker = services.start("dask-worker", str(BIN / "dask"), "worker", scheduler, "--nthreads", "1",
                                     "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard",
                                     "--preload", "infra.worker_setup")
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "prefect server", 90,
              [server])

        from distributed import Client

        with Client(scheduler, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            dask_workers = set(client.scheduler_info()["workers"])

        services.run(str(BIN / "prefect"), "work-pool", "create", "pairx-process", "--type", "process")
        out = tmp_path / "out"
        config = {"uploads": str(photo_night / "uploads"), "gallery": str(photo_night / "gallery"),
                  "out": str(out), "model": "demo", "top_k": 2, "rerank_k": 0, "k_colors": 2,
                  "cluster": scheduler}
        # README "Switching the nightly schedule on": real parameters at deploy time, then resume
        services.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                     "--name", "nightly", "--params", json.dumps({"config": config}))
        services.run("bash", "-c", RESUME_NIGHTLY)
        deployment = _get(api, "/deployments/name/nightly/nightly")
        assert deployment["parameters"] == {"config": config} and "REPLACE-ME" not in json.dumps(deployment)
        (schedule,) = deployment["schedules"]
        assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
        # the example deployment, still with its REPLACE-ME values: refused before anything runs
        services.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                     "--name", "reprocess")

        worker = services.start("prefect-worker", str(BIN / "prefect"), "worker", "start", "--pool", "pairx-process")
        # a run with the stored parameters (what the 02:00 schedule starts), and one of the example
        nightly_run = _flow_run_id(services.run(str(BIN / "prefect"), "deployment", "run", "nightly/nightly"))
        example_run = _flow_run_id(services.run(str(BIN / "prefect"), "deployment", "run", "reprocess/reprocess"))

        def state(flow_run_id: str) -> dict:
            return _get(api, f"/flow_runs/{flow_run_id}")["state"]

        for run in (nightly_run, example_run):
            _wait(lambda run=run: state(run)["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"),
                  "the deployment run",
                  300, [server, dask_scheduler, dask_worker, worker])
        assert state(nightly_run)["type"] == "COMPLETED", services.logs()
        refused = state(example_run)
        assert refused["type"] == "FAILED", refused
        assert "out" in refused["message"] and "example value" in refused["message"], refused["message"]
    finally:
        services.stop()

    from infra.tables import read_table

    runs = read_table(str(out), "runs")
    assert list(runs.status) == ["completed"] and runs.n_done.iloc[0] == 6
    assert len(read_table(str(out), "candidates")) == 6
    # the explain batches ran on the external Dask worker, not inside the Prefect worker's process
    assert set(runs.workers.iloc[0]) == dask_workers


def test_example_parameters_are_refused_naming_the_field():
    """Every REPLACE-ME value of infra/prefect.yaml is refused by the flow's config, by name."""
    import yaml
    from pydantic import ValidationError

    from flows.config import ExplainPairsConfig, NightlyConfig, ReprocessConfig

    classes = {"nightly": NightlyConfig, "explain_pairs": ExplainPairsConfig, "reprocess": ReprocessConfig}
    deployments = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        example = deployment["parameters"]["config"]
        with pytest.raises(ValidationError) as info:
            classes[deployment["name"]](**example)
        refused = {error["loc"][0] for error in info.value.errors()}
        assert refused == {k for k, v in example.items() if "REPLACE-ME" in str(v)}, deployment["name"]
        assert all("example value from infra/prefect.yaml" in e["msg"] for e in info.value.errors())
    real = NightlyConfig(uploads="/photos/uploads", gallery="/photos/gallery", out="/out", model="demo")
    assert real.uploads == "/photos/uploads"
    with pytest.raises(ValidationError, match=r"storage_options[\s\S]*example value"):
        NightlyConfig(uploads="/u", gallery="/g", out="/o", model="demo",
                      storage_options={"client_kwargs": {"endpoint_url": "https://REPLACE-ME.example"}})
