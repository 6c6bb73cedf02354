"""The output lease: one writer per output root, on local disk and on a real S3 API."""

from __future__ import annotations

import json
import threading
import time

import pytest

from infra.lease import LEASE_PATH, OutputLockedError, output_lease
from infra.storage import StorageTarget


def _roots(tmp_path, request):
    return str(tmp_path / "out")


def test_second_writer_is_refused_then_gets_it_after_release(tmp_path):
    out = str(tmp_path / "out")
    first = output_lease(out, "run-1", "nightly")
    with pytest.raises(OutputLockedError) as raised:
        output_lease(out, "run-2", "nightly", wait_s=0.3, poll_s=0.05)
    assert raised.value.holder["run_id"] == "run-1" and "run-1" in str(raised.value)
    first.release()
    second = output_lease(out, "run-2", "nightly", wait_s=0)
    assert json.loads(StorageTarget.from_url(out).read_bytes(LEASE_PATH))["run_id"] == "run-2"
    second.release()
    assert not StorageTarget.from_url(out).exists(LEASE_PATH)


def test_waiting_writer_gets_the_lease_when_released(tmp_path):
    out = str(tmp_path / "out")
    first = output_lease(out, "run-1", "nightly")
    threading.Timer(0.5, first.release).start()
    second = output_lease(out, "run-2", "nightly", wait_s=30, poll_s=0.05)
    assert second.record["run_id"] == "run-2"
    second.release()


def test_lease_of_a_dead_process_or_expired_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    target = StorageTarget.from_url(out)
    import socket

    dead = {"run_id": "killed", "host": socket.gethostname(), "pid": 2 ** 22 + 12345, "token": "t",
            "expires_at": time.time() + 3600}
    target.write_bytes_atomic(LEASE_PATH, json.dumps(dead).encode())
    lease = output_lease(out, "run-new", "nightly", wait_s=0)
    assert lease.record["run_id"] == "run-new"
    lease.release()
    expired = {"run_id": "old", "host": "elsewhere", "pid": 1, "token": "u", "expires_at": time.time() - 1}
    target.write_bytes_atomic(LEASE_PATH, json.dumps(expired).encode())
    output_lease(out, "run-newer", "nightly", wait_s=0).release()


def test_renewal_pushes_the_expiry(tmp_path):
    out = str(tmp_path / "out")
    lease = output_lease(out, "run-1", "nightly", ttl_s=0.6)
    first_expiry = lease.record["expires_at"]
    deadline = time.monotonic() + 30  # renewals come every ttl/3; a busy machine may delay a few
    while True:
        stored = json.loads(StorageTarget.from_url(out).read_bytes(LEASE_PATH))
        if stored["expires_at"] > first_expiry or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stored["expires_at"] > first_expiry and not lease.lost
    lease.release()


@pytest.mark.integration
def test_exclusive_create_on_s3(s3_bucket):
    out = f"s3://{s3_bucket}/out"
    results = []

    def take(name):
        try:
            results.append(output_lease(out, name, "nightly", wait_s=0))
        except OutputLockedError:
            results.append(None)

    threads = [threading.Thread(target=take, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [lease for lease in results if lease is not None]
    assert len(held) == 1, "exactly one of four simultaneous runs may hold the lease"
    held[0].release()
    output_lease(out, "after", "nightly", wait_s=0).release()
