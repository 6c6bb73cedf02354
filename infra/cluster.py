"""Dask cluster and Prefect task-runner factory.

- default: a ``LocalCluster`` sized to the machine: one worker per GPU (one thread each, with a
  ``GPU=1`` resource) when CUDA is present; on CPU, ``workers x threads <= cores``.
- ``address="tcp://host:8786"``: an existing cluster (dask-jobqueue, dask-kubernetes, Coiled and
  dask-cuda all expose one). GPU work is annotated ``resources={"GPU": 1}`` so that it lands on
  workers started with ``--resources GPU=1``.

Workers must report to the flow's Prefect API: without ``PREFECT_API_URL`` each process worker
starts its own temporary server (~10 s) and its task runs never show in the flow's history
(measured: 21 s instead of 6 s for a 4-task flow with 2 workers). The factory passes the current
API URL to local workers.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any glibc malloc
threshold turns off glibc's adaptive mmap threshold, so every tensor over 128 KiB becomes a
fresh ``mmap`` with page faults on first touch: measured here, the engine ran 3x slower in a
worker than in a plain process (alloc-heavy loop 6.5x, conv 1.7x; most of the extra time in the
kernel). Local clusters are started without the variable; every task process sets glibc's
thresholds itself before its first model load
(``pairx_core.runtime_settings.keep_freed_memory``), which also undoes the variable on workers
of external clusters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pairx_core.errors import ConfigError

from .storage import STORAGE_OPTIONS_ENV

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


#: Dask's periodic worker callbacks, slowed down for workers that run long GIL-heavy tasks
QUIET_WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,  # samples every thread's stack every 10 ms
    "distributed.admin.tick.interval": "1s",  # event-loop health check, default 20 ms
    "distributed.admin.system-monitor.interval": "2s",  # dashboard CPU/memory/network, default 0.5 s
    "distributed.worker.memory.monitor-interval": "1s",  # memory limit checks, default 0.1 s
}


#: see :mod:`infra.worker_exit`: a closed worker process skips the interpreter's teardown
WORKER_EXIT_PRELOAD = "infra.worker_exit"
#: see :mod:`infra.worker_setup`: torch threads, denormals and allocator set when a worker starts
WORKER_SETUP_PRELOAD = "infra.worker_setup"


def local_cluster_config() -> dict:
    """Dask config for local workers.

    - no ``MALLOC_TRIM_THRESHOLD_`` (None unsets a variable; see the module docstring);
    - :data:`QUIET_WORKER_CONFIG`: each periodic callback wakes the worker's event loop, which
      must take the GIL from the engine's thread (zennit's hooks run Python between torch ops).
      Measured with 120 pairs: the worker's event-loop thread used ~8 CPU-s per 70 s run (6 %
      of this 2-core machine) with Dask's defaults;
    - the :data:`WORKER_SETUP_PRELOAD` and :data:`WORKER_EXIT_PRELOAD` preloads (after any
      preloads configured already): the worker's torch settings before its first task; closing a
      cluster then waits ~0.1 s per worker instead of 1.3-2 s of interpreter teardown.
    """
    import dask

    preloads = list(dask.config.get("distributed.worker.preload", None) or [])
    for preload in (WORKER_SETUP_PRELOAD, WORKER_EXIT_PRELOAD):
        if preload not in preloads:
            preloads.append(preload)
    return {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None, **QUIET_WORKER_CONFIG,
            "distributed.worker.preload": preloads}


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001  # pragma: no cover - torch import problems
        return 0


def worker_env(torch_threads: int | None = None) -> dict[str, str]:
    """Environment for local workers: the flow's Prefect API, analytics off, torch threads.

    Dask's nanny sets ``OMP_NUM_THREADS=1`` in workers; ``PAIRX_TORCH_THREADS`` tells
    the worker preload (``infra.worker_setup``) how many intra-op threads torch may use instead
    (cores / workers).
    """
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    except Exception:  # noqa: BLE001  # pragma: no cover - no Prefect settings: workers use their own
        url = None
    if url:
        env["PREFECT_API_URL"] = str(url)
    if torch_threads:
        env["PAIRX_TORCH_THREADS"] = str(torch_threads)
    for key in ("PREFECT_HOME", "DASK_TEMPORARY_DIRECTORY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "PREFECT_LOGGING_LEVEL",
                "DASK_LOGGING__DISTRIBUTED", "DO_NOT_TRACK", STORAGE_OPTIONS_ENV):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def make_task_runner(address: str | None = None, workers: int | None = None, device: str | None = None):
    """The task runner of a run: an existing cluster (``address``), a new ``LocalCluster`` of
    ``workers`` processes, or with ``workers=0`` Prefect's thread pool in this process (no Dask:
    quick local checks and debugging)."""
    from prefect_dask import DaskTaskRunner

    if workers == 0 and not address:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)

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
    return DaskTaskRunner(cluster_class=quiet_local_cluster, cluster_kwargs=cluster_kwargs)


def quiet_local_cluster(**cluster_kwargs):
    """A ``distributed.LocalCluster`` whose workers start under :func:`local_cluster_config`.

    The settings apply while the cluster starts its workers (each nanny reads its environment
    and the workers' Dask config then) and are restored afterwards: the calling process's Dask
    config is left as it was. A nanny copies its pre-spawn variables into the environment of the
    process that runs it, so a cluster started earlier in this process with Dask's defaults left
    ``MALLOC_TRIM_THRESHOLD_`` there for every later worker to inherit: it is also left out of this
    process's environment while the workers start.
    """
    import dask
    from distributed import LocalCluster

    inherited = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set(local_cluster_config()):
            return LocalCluster(**cluster_kwargs)
    finally:
        if inherited is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = inherited


def gpu_annotation(device: str | None) -> dict:
    """Dask annotations for GPU tasks (empty on CPU)."""
    if device == "cpu":
        return {}
    if device == "cuda" or (device is None and _cuda_devices()):
        return {"resources": {GPU_RESOURCE: 1}}
    return {}
