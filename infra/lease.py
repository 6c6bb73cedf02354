"""One writer per output root at a time: a lease object in the output root.

``OUT/_pairx/lease.json`` holds who writes ``OUT`` now (run id, host, pid, expiry). It is
created with an exclusive create that works on local disks (``O_EXCL``) and on S3 (a conditional
PUT with ``If-None-Match: *``), so two runs that start together cannot both get it. The holder
renews the expiry in a background thread; a run that finds the lease held waits (polling) until
it is released or stale, up to ``wait_s``, then raises :class:`OutputLockedError` naming the
holder. A lease is stale when its expiry has passed, or at once when its holder ran on this host
and its process is gone (a SIGKILLed CLI). Taking over a stale lease deletes it after checking it
is still the same stale lease, then creates a new one exclusively.

Why a lease rather than only idempotent commits: two nights on the same output would each
explain every pair (twice the work) and each write its own ranked ``candidates`` list per upload;
with the lease the second night waits and then skips everything the first one wrote.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from pairx_core.errors import PairXError

from .storage import StorageTarget, storage_errors, with_retries

__all__ = ["LEASE_PATH", "Lease", "OutputLockedError", "output_lease"]

LEASE_PATH = "_pairx/lease.json"
DEFAULT_TTL_S = 120.0


class OutputLockedError(PairXError):
    """Another run holds the output root's lease."""

    def __init__(self, out: str, holder: Mapping[str, Any], waited_s: float):
        self.out = out
        self.holder = dict(holder)
        self.waited_s = waited_s
        super().__init__(
            f"{out} is being written by run {holder.get('run_id')} ({holder.get('flow')}, host {holder.get('host')}, "
            f"pid {holder.get('pid')}, since {holder.get('acquired_at')}); waited {waited_s:.0f} s. Run again "
            f"later, or wait longer (lease_wait_s / --lease-wait)")


@dataclass
class Lease:
    """A held lease; :meth:`release` ends it (also on error)."""

    target: StorageTarget
    record: dict[str, Any]
    ttl_s: float
    _stop: threading.Event
    _thread: threading.Thread | None = None
    lost: bool = False

    def renew(self) -> None:
        """Push the expiry forward (overwrites our own record only)."""
        current = _read(self.target)
        if current is None or current.get("token") != self.record["token"]:
            self.lost = True  # taken over as stale: we stalled longer than the ttl
            return
        self.record["expires_at"] = time.time() + self.ttl_s
        self.target.write_bytes_atomic(LEASE_PATH, json.dumps(self.record).encode())

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the ttl covers two
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = _read(self.target)
        if current is not None and current.get("token") == self.record["token"]:
            self.target.delete(LEASE_PATH)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(target: StorageTarget) -> dict[str, Any] | None:
    try:
        return json.loads(target.read_bytes(LEASE_PATH))
    except Exception:  # noqa: BLE001 - absent (or half-deleted): treated as free
        return None


def _is_stale(record: Mapping[str, Any]) -> bool:
    if record.get("expires_at", 0) < time.time():
        return True
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", 0))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _create_exclusive(target: StorageTarget, data: bytes) -> bool:
    """Create the lease object only if absent; False if someone else has it."""
    url = target.url(LEASE_PATH)
    with storage_errors(url):
        if target.is_local:
            os.makedirs(os.path.dirname(url), exist_ok=True)
            try:
                fd = os.open(url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        fs = target.filesystem()
        path = fs._strip_protocol(url)
        if target.is_object_store:
            try:
                fs.pipe_file(path, data, mode="create")
            except (FileExistsError, OSError) as error:
                if isinstance(error, FileExistsError) or "PreconditionFailed" in repr(error) or "412" in str(error):
                    return False
                raise
            return True
        if fs.exists(path):  # other filesystems (memory://): best effort
            return False
        fs.pipe_file(path, data)
        return True


def output_lease(out: str, run_id: str, flow: str, *, wait_s: float = 1800.0, ttl_s: float = DEFAULT_TTL_S,
                 poll_s: float = 1.0, storage_options: Mapping[str, Any] | None = None) -> Lease:
    """Acquire ``out``'s lease for ``run_id``, waiting up to ``wait_s`` seconds.

    Raises:
        OutputLockedError: still held by another live run after ``wait_s``.
    """
    target = StorageTarget.from_url(out, storage_options)
    record = {"run_id": run_id, "flow": flow, "host": socket.gethostname(), "pid": os.getpid(),
              "token": uuid.uuid4().hex, "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    started = time.monotonic()
    while True:
        record["expires_at"] = time.time() + ttl_s
        if with_retries(_create_exclusive, target, json.dumps(record).encode()):
            break
        holder = _read(target)
        if holder is not None and holder.get("token") == record["token"]:
            break  # our own create went through, but its answer was lost and the retry found it
        if holder is not None and _is_stale(holder):
            again = _read(target)
            if again is not None and again.get("token") == holder.get("token"):
                target.delete(LEASE_PATH)
            continue
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise OutputLockedError(target.root, holder or {}, waited)
        time.sleep(min(poll_s, max(0.05, wait_s - waited)))
    stop = threading.Event()
    lease = Lease(target, record, ttl_s, stop)
    lease._thread = threading.Thread(target=lease._keep_alive, name="pairx-lease", daemon=True)
    lease._thread.start()
    return lease
