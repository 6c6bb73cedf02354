"""Dask cluster and Prefect task-runner factory.

- default: a ``LocalCluster`` sized to the machine: one worker per GPU (one thread each, with a
  ``GPU=1`` resource) when CUDA is present; on CPU, ``workers x threads <= cores``.
- ``address="tcp://host:8786"``: an existing cluster (dask-jobqueue, dask-kubernetes, Coiled and
  dask-cuda all expose one). GPU work is annotated ``resources={"GPU": 1}`` so that it lands on
  workers started with ``--resources GPU=1``.

Workers must report to the flow's Prefect API: without ``PREFECT_API_URL`` each process worker
starts its own temporary server (~10 s) and its task runs never show in the flow's history
(``shared/docs/STACK_NOTES.md``). The factory passes the current API URL to local workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pairx_core.errors import ConfigError

GPU_RESOURCE = "GPU"


@dataclass(frozen=True)
class ClusterPlan:
    """How many local workers, threads and GPUs to use."""

    n_workers: int
    threads_per_worker: int
    gpus: int

    @classmethod
    def for_machine(cls, workers: int | None = None, device: str | None = None) -> "ClusterPlan":
        cores = os.cpu_count() or 1
        gpus = _cuda_devices() if device in (None, "cuda") else 0
        if gpus:
            n = workers or gpus
            if n > gpus:
                raise ConfigError(f"{n} GPU workers requested but only {gpus} GPUs are visible")
            return cls(n, 1, gpus)
        # one thread per worker: a worker runs one engine call at a time (torch uses the cores)
        n = max(1, min(workers or 1, cores))
        return cls(n, 1, 0)


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch import problems
        return 0


def worker_env(torch_threads: int | None = None) -> dict[str, str]:
    """Environment for local workers: the flow's Prefect API, analytics off, torch threads.

    Dask's nanny sets ``OMP_NUM_THREADS=1`` in workers; ``PAIRX_TORCH_THREADS`` tells
    ``tasks.runtime`` how many intra-op threads torch may use instead (cores / workers).
    """
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    except Exception:  # pragma: no cover
        url = None
    if url:
        env["PREFECT_API_URL"] = str(url)
    if torch_threads:
        env["PAIRX_TORCH_THREADS"] = str(torch_threads)
    for key in ("PREFECT_HOME", "DASK_TEMPORARY_DIRECTORY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "PREFECT_LOGGING_LEVEL"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def make_task_runner(address: str | None = None, workers: int | None = None, device: str | None = None):
    """A ``DaskTaskRunner`` for an existing cluster (``address``) or a new ``LocalCluster``."""
    from prefect_dask import DaskTaskRunner

    if address:
        if not address.startswith(("tcp://", "tls://", "ws://", "wss://", "inproc://")):
            raise ConfigError(f"--cluster must be a scheduler address like tcp://host:8786, got {address!r}")
        return DaskTaskRunner(address=address)
    plan = ClusterPlan.for_machine(workers, device)
    cluster_kwargs = {
        "n_workers": plan.n_workers,
        "threads_per_worker": plan.threads_per_worker,
        "processes": True,
        "dashboard_address": None,
        "env": worker_env(torch_threads=max(1, (os.cpu_count() or 1) // plan.n_workers)),
    }
    if plan.gpus:
        cluster_kwargs["resources"] = {GPU_RESOURCE: 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def gpu_annotation(device: str | None) -> dict:
    """Dask annotations for GPU tasks (empty on CPU)."""
    if device == "cpu":
        return {}
    if device == "cuda" or (device is None and _cuda_devices()):
        return {"resources": {GPU_RESOURCE: 1}}
    return {}
