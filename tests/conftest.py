"""Shared pytest fixtures (kept generic: no project logic here).

- ``_test_environment`` (autouse, session): offline Hugging Face hub, Prefect home in a temp folder
  with analytics off, flush-to-zero denormals in torch.
- ``s3_server`` (session): a moto S3 server subprocess on a free port, with the AWS environment
  (dummy credentials, ``AWS_ENDPOINT_URL``) pointing at it while it runs.
- ``s3_bucket``: a fresh, empty bucket on that server for one test.
- ``_log_streams_repaired`` (autouse): log handlers left on a closed CliRunner stream go back to stderr.
- ``_compute_thread_released`` (autouse): a test that ran tasks lets the process's compute thread
  end, so the next test's own computations are not the oversubscribed ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _test_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with contextlib.ExitStack() as scoped:
        try:
            from pairx_core.runtime_settings import denormals_flushed
        except ImportError:  # no torch
            pass
        else:
            scoped.enter_context(denormals_flushed())
        yield
    patch.undo()


@pytest.fixture(autouse=True)
def _log_streams_repaired() -> Iterator[None]:
    """In-process CLI runs of flows (CliRunner) leave Prefect's console handler on the invocation's
    closed stream; later tests' log records would fail there. Point such handlers back at stderr."""
    from night_helpers import repair_log_streams

    yield
    repair_log_streams()


@pytest.fixture(autouse=True)
def _compute_thread_released() -> Iterator[None]:
    """The compute thread's OpenMP workers, left alive, would make the main thread's computations
    in later tests wait on sleeping workers (a 64 px engine test ran 10x slower)."""
    yield
    from infra.compute_thread import release_compute_thread

    release_compute_thread()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clear_s3fs_cache() -> None:
    """Close the cached s3fs clients' HTTP sessions, then forget the instances (a session left
    to the garbage collector is reported as "Unclosed client session" at exit)."""
    try:
        import s3fs
        from fsspec.asyn import sync
    except ImportError:
        return
    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3", None)
        if client is None:
            continue
        try:
            if fs.asynchronous:  # Zarr's stores: their sessions live on Zarr's own event loop
                from zarr.core.sync import sync as zarr_sync

                zarr_sync(client.__aexit__(None, None, None), timeout=5)
            elif fs.loop is not None and fs.loop.is_running():
                sync(fs.loop, client.__aexit__, None, None, None, timeout=5)
            else:
                continue
        except Exception:  # noqa: BLE001 - a session that will not close is only a warning at exit
            continue
        fs._s3 = None  # a later use opens a new session instead of reusing a closed one
    s3fs.S3FileSystem.clear_instance_cache()


def _wait_until_up(endpoint: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: good enough
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server; the AWS environment points at it while it runs."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.skip(f"moto_server not installed next to {sys.executable}")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as log_handle:
        proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
        )
    patch = pytest.MonkeyPatch()
    try:
        _wait_until_up(endpoint, proc, log)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        patch.setenv("NO_PROXY", no_proxy)
        patch.setenv("no_proxy", no_proxy)
        _clear_s3fs_cache()
        yield endpoint
    finally:
        patch.undo()
        _clear_s3fs_cache()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """Name of a fresh, empty bucket on the moto server (s3fs instance cache cleared around it)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    _clear_s3fs_cache()
    yield name
    _clear_s3fs_cache()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (fresh database) for the whole test run."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
