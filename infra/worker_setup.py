"""Dask worker preload: the torch settings of a process that runs pipeline tasks, made when the
worker starts, before any task or model load
(:func:`pairx_core.runtime_settings.configure_task_process`).

Local clusters get it from :func:`infra.cluster.local_cluster_config`; workers of an existing
cluster get it with ``dask worker --preload infra.worker_setup``.
"""

from __future__ import annotations

from pairx_core.runtime_settings import configure_task_process


def dask_setup(worker) -> None:
    configure_task_process()
