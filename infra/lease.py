"""One writer per output root at a time: a lease object in the output root.

``OUT/_pairx/lease.json`` holds who writes ``OUT`` now (run id, host, pid, expiry). It is
created complete and exclusively: on local disks a temporary file is written and fsynced, then
hard-linked to the lease name (the link fails if a lease exists, and a reader never sees a
partial lease); on S3 a conditional PUT with ``If-None-Match: *`` of the whole object. So two
runs that start together cannot both get it. The holder renews the expiry in a background thread
(temp file + rename). A run that finds the lease held says so once (holder, time left), waits
(polling) until it is released or stale, up to ``wait_s``, then raises
:class:`OutputLockedError` naming the holder. A lease is stale when its expiry has passed, at
once when its holder ran on this host and its process is gone (a SIGKILLed CLI), or when it
cannot be read at all (empty or garbled: a disk that filled up while an older version wrote it).
Taking over a stale lease logs a WARNING naming the old holder when known, deletes it after
checking it is still the same stale lease, then creates a new one exclusively.

Why a lease rather than only idempotent commits: two nights on the same output would each
explain every pair (twice the work) and each write its own ranked ``candidates`` list per upload;
with the lease the second night waits and then skips everything the first one wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from pairx_core.errors import PairXError

from .storage import OutputLayout, StorageTarget, is_transient, storage_errors, with_retries

logger = logging.getLogger("pairx.lease")

__all__ = ["LEASE_PATH", "Lease", "OutputLockedError", "describe_holder", "output_lease"]

LEASE_PATH = OutputLayout.control_path("lease.json")
DEFAULT_TTL_S = 120.0


class OutputLockedError(PairXError):
    """Another run holds the output root's lease."""

    def __init__(self, out: str, holder: Mapping[str, Any], waited_s: float):
        self.out = out
        self.holder = dict(holder)
        self.waited_s = waited_s
        super().__init__(
            f"{out} is being written by {describe_holder(holder)}; waited {waited_s:.0f} s. Run again "
            f"later, or wait longer (lease_wait_s / --lease-wait)")


def describe_holder(holder: Mapping[str, Any]) -> str:
    """``run <id> (<flow>, host <h>, pid <p>, since <t>)``, or what is known of it."""
    if not holder.get("run_id"):
        return "another run (its lease names no run)"
    return (f"run {holder.get('run_id')} ({holder.get('flow')}, host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('acquired_at')})")


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


#: what :func:`_read_raw` returns for a lease object that is not there
_ABSENT = None


def _read_raw(target: StorageTarget) -> bytes | None:
    """The lease object's bytes, or None when there is none."""
    try:
        return target.read_bytes(LEASE_PATH)
    except Exception as error:  # noqa: BLE001 - absent (or deleted meanwhile): free
        if is_transient(error):
            raise
        return _ABSENT


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The lease record, or None when the bytes are no lease (empty, cut short, garbled)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not record.get("token"):
        return None
    return record if isinstance(record.get("expires_at"), (int, float)) else None


def _read(target: StorageTarget) -> dict[str, Any] | None:
    raw = _read_raw(target)
    return None if raw is None else _parse(raw)


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
            folder = os.path.dirname(url)
            os.makedirs(folder, exist_ok=True)
            temp = os.path.join(folder, f".lease.json.tmp-{uuid.uuid4().hex}")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(temp, url)  # complete content, and only if no lease exists
                except FileExistsError:
                    return False
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            return True
        fs = target.filesystem()
        path = target.raw_path(url)
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


def _take_over(target: StorageTarget, raw: bytes, holder: Mapping[str, Any] | None) -> None:
    """Delete a stale or unreadable lease, if it is still the same one (another taker may have been first)."""
    if with_retries(_read_raw, target) != raw:
        return
    if holder is None:
        logger.warning("%s: taking over an unreadable lease (%d bytes: %r); its holder is unknown", target.root,
                       len(raw), raw[:60])
    else:
        expired = float(holder.get("expires_at", 0)) < time.time()
        why = "expired" if expired else "its process is gone"
        logger.warning("%s: taking over the lease of %s: %s", target.root, describe_holder(holder), why)
    target.delete(LEASE_PATH)


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
    told = False
    while True:
        record["expires_at"] = time.time() + ttl_s
        if with_retries(_create_exclusive, target, json.dumps(record).encode()):
            break
        raw = with_retries(_read_raw, target)
        holder = {} if raw is None else _parse(raw)  # {}: released meanwhile, try again after a short pause
        if holder is not None and holder and holder.get("token") == record["token"]:
            break  # our own create went through, but its answer was lost and the retry found it
        if raw is not None and (holder is None or _is_stale(holder)):
            _take_over(target, raw, holder)
            continue
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise OutputLockedError(target.root, holder, waited)
        if holder and not told:
            left = max(0.0, float(holder.get("expires_at", 0)) - time.time())
            logger.warning("%s is being written by %s; waiting up to %.0f s for it to finish (its lease runs %.0f s "
                           "more unless renewed)", target.root, describe_holder(holder), wait_s, left)
            told = True
        time.sleep(min(poll_s, max(0.05, wait_s - waited)))
    stop = threading.Event()
    lease = Lease(target, record, ttl_s, stop)
    lease._thread = threading.Thread(target=lease._keep_alive, name="pairx-lease", daemon=True)
    lease._thread.start()
    return lease
