"""Cluster factory: sizing, addresses, worker environment, and the worker malloc fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra import cluster
from infra.cluster import ClusterPlan, gpu_annotation, make_task_runner, worker_env
from pairx_core.errors import ConfigError


def test_cpu_plan_never_oversubscribes(monkeypatch):
    monkeypatch.setattr(cluster, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert ClusterPlan.for_machine() == ClusterPlan(1, 1, 0)
    assert ClusterPlan.for_machine(workers=8) == ClusterPlan(2, 1, 0)


def test_gpu_plan_one_worker_per_gpu(monkeypatch):
    monkeypatch.setattr(cluster, "_cuda_devices", lambda: 2)
    assert ClusterPlan.for_machine() == ClusterPlan(2, 1, 2)
    with pytest.raises(ConfigError, match="3 GPU workers"):
        ClusterPlan.for_machine(workers=3)
    assert ClusterPlan.for_machine(device="cpu").gpus == 0
    assert gpu_annotation("cuda") == {"resources": {"GPU": 1}}
    assert gpu_annotation("cpu") == {}


def test_bad_scheduler_address_is_a_config_error():
    with pytest.raises(ConfigError, match="tcp://host:8786"):
        make_task_runner("localhost:8786")


def test_worker_env_carries_api_url_and_threads(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        env = worker_env(torch_threads=2)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["PAIRX_TORCH_THREADS"] == "2"


def _worker_settings(dask_worker) -> dict:
    import dask

    return {"malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "config": {key: dask.config.get(key) for key in cluster.QUIET_WORKER_CONFIG},
            "profiling": "profile" in dask_worker.periodic_callbacks}


@pytest.mark.timeout(120)
def test_local_workers_start_without_the_malloc_trim_setting_and_quiet(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_=65536 made the engine 3x slower in workers; its
    10 ms stack profiler and 20 ms ticks compete with the engine for the GIL."""
    # as a cluster started earlier in this process with Dask's defaults leaves it
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    import dask
    from distributed import Client, LocalCluster

    dask_defaults = {"distributed.worker.profile.enabled": True, "distributed.admin.tick.interval": "20ms",
                     "distributed.admin.system-monitor.interval": "500ms",
                     "distributed.worker.memory.monitor-interval": "100ms"}
    assert set(dask_defaults) == set(cluster.QUIET_WORKER_CONFIG)
    with dask.config.set(dask_defaults):  # as if nothing had set them before
        spawn_environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        runner = make_task_runner(workers=1, device="cpu")
        kwargs = {**runner.cluster_kwargs, "n_workers": 1}
        with runner.cluster_class(**kwargs) as local, Client(local) as client:
            assert isinstance(local, LocalCluster)
            (values,) = client.run(_worker_settings).values()
            # the settings were scoped to the workers' start: this process keeps its own
            assert {key: dask.config.get(key) for key in dask_defaults} == dask_defaults
            assert dask.config.get("distributed.nanny.pre-spawn-environ") == spawn_environ
            assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment restored
    assert values["malloc_trim"] is None
    assert values["config"] == cluster.QUIET_WORKER_CONFIG
    assert values["profiling"] is False


def _register_late_exit_handler() -> int:
    import atexit

    from tests.exit_marks_preload import _mark

    atexit.register(_mark, "registered_after_the_exit_hook")
    return os.getpid()


def _torch_settings() -> tuple[int, bool]:
    """Torch's intra-op thread count, and whether a thread started now flushes denormals."""
    import threading

    import torch

    from pairx_core.runtime_settings import denormals_are_flushed

    flushed = []
    thread = threading.Thread(target=lambda: flushed.append(denormals_are_flushed()))
    thread.start()
    thread.join()
    return torch.get_num_threads(), flushed[0]


@pytest.mark.timeout(120)
def test_a_closed_local_worker_runs_later_exit_handlers_then_skips_teardown(tmp_path):
    """Closing a LocalCluster waited 1.3-2 s per worker for Python to free torch and friends."""
    import dask
    from distributed import Client

    preload = str(Path(__file__).with_name("exit_marks_preload.py"))
    runner = make_task_runner(workers=1, device="cpu")
    env = {**runner.cluster_kwargs["env"], "EXIT_MARKS": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    with dask.config.set({"distributed.worker.preload": [preload]}):
        local = runner.cluster_class(**{**runner.cluster_kwargs, "n_workers": 1, "env": env})
    with local, Client(local) as client:
        (preloads,) = client.run(lambda: dask.config.get("distributed.worker.preload")).values()
        (pid,) = client.run(_register_late_exit_handler).values()
        (threads, flushed) = next(iter(client.run(_torch_settings).values()))
    # a user's preloads are kept, in order
    assert preloads == [preload, cluster.WORKER_SETUP_PRELOAD, cluster.WORKER_EXIT_PRELOAD]
    # set by the setup preload when the worker started (the nanny's OMP_NUM_THREADS=1 otherwise)
    assert threads == int(env.get("PAIRX_TORCH_THREADS", threads)) and flushed
    assert (tmp_path / "registered_after_the_exit_hook").read_text() == str(pid)  # Prefect's log flush, e.g.
    assert not (tmp_path / "registered_before_the_exit_hook").exists()  # os._exit came first
