"""Storage targets: every location is an fsspec URL.

Supported: local paths (``/data/out``, ``out``, ``file:///data/out``), ``s3://`` (s3fs; endpoint
and credentials come from the standard AWS environment/config, e.g. ``AWS_ENDPOINT_URL``, plus
optional ``storage_options``), ``memory://`` (tests), ``gs://`` when gcsfs is installed, and any
other fsspec protocol on a best-effort basis.

URLs are canonical: local locations become absolute plain paths (``/abs/dir/file``), others keep
their protocol (``s3://bucket/key``, ``memory:///dir/file``). Every method accepts either a path
relative to the target's root or a full URL, and every URL it returns is a full URL.

Atomic writes (:meth:`StorageTarget.write_bytes_atomic`) happen in two steps, *stage* then
*commit*:

- local disk: stage = write and fsync a temporary file ``.<name>.tmp-<hex>`` in the destination
  directory; commit = ``os.replace`` onto the final name (atomic on POSIX);
- object stores (s3, gs, az): stage = nothing (the bytes stay in memory); commit = one PUT of the
  whole object, which the store makes visible only once complete (s3fs switches to a multipart
  upload above 100 MiB; that also becomes visible only at completion);
- other filesystems (``memory://``): stage = write a temporary key; commit = move it.

The commit step is the module function :func:`_commit`; tests patch it to simulate a crash between
the two steps. A crash leaves the final path untouched (absent, or the previous version) and, on
local disk, at most a hidden temporary file that :meth:`StorageTarget.list_files` never returns.

Credentials: fsspec options for remote URLs also come from the environment variable
``PAIRX_STORAGE_OPTIONS`` (a JSON object), merged under the options given in code. Every process
(the flow, each Dask worker) reads its own environment, so keys and secrets reach the
filesystems without ever being a flow parameter, a task input or a log line. The options are
merged when a filesystem is made and never stored on a :class:`StorageTarget`.

Errors: :func:`is_transient` says whether an exception is worth retrying (connection problems,
timeouts, HTTP 5xx/429, throttling). Non-transient I/O errors are raised as
:class:`pairx_core.errors.StorageError`; transient ones propagate unchanged for the pipeline's retry
logic.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

import fsspec
from fsspec.core import url_to_fs

from pairx_core.errors import ConfigError, PairXError, StorageError

__all__ = [
    "OBJECT_STORE_PROTOCOLS",
    "RetryPolicy",
    "retried",
    "with_retries",
    "STORAGE_OPTIONS_ENV",
    "environment_storage_options",
    "OutputLayout",
    "StorageTarget",
    "is_temp_name",
    "is_url",
    "is_transient",
    "safe_segment",
    "storage_errors",
]

#: Protocols whose single PUT is atomic: written with one request, never staged under a temp key.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"})

#: environment variable with fsspec options (JSON object) for remote URLs, credentials included
STORAGE_OPTIONS_ENV = "PAIRX_STORAGE_OPTIONS"
#: protocols that never receive the environment's options (object-store keys break an HTTP client)
_NO_ENV_OPTIONS = frozenset({None, "file", "local", "memory", "http", "https"})

_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]")

_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EBUSY",  # s3fs: SlowDown, ServiceUnavailable, 503, 409
        "EREMOTEIO",  # s3fs: InternalError, 500
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "EAGAIN",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
    )
    if hasattr(errno, name)
)

_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
        "PriorRequestNotComplete",
        "OperationAborted",
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
    }
)

# Exception class names (from optional dependencies: botocore, aiohttp, urllib3, requests,
# gcsfs) that always denote a transient failure. Matched by name over the MRO so that this module
# does not need to import those libraries.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "HTTPClientError",  # botocore: base of EndpointConnectionError, ReadTimeoutError, ...
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ResponseParserError",  # s3fs retries these: throttling replies with broken XML
        "ClientConnectionError",  # aiohttp
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "IncompleteRead",  # http.client
        "ProtocolError",  # urllib3
        "ChunkedEncodingError",  # requests
        "FSTimeoutError",  # fsspec
    }
)


def _status_code(exc: BaseException) -> int | None:
    """HTTP status carried by an exception (botocore ClientError, gcsfs HttpError, aiohttp)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status_code", "status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = (response.get("Error") or {}).get("Code")
        if isinstance(code, str):
            return code
    return None


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, PairXError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    code = _error_code(exc)
    if code is not None and code in _TRANSIENT_CODES:
        return True
    status = _status_code(exc)
    if status is not None and (status >= 500 or status == 429):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient I/O failure that a retry may cure.

    True for connection errors, timeouts, HTTP 5xx and 429, throttling codes (``SlowDown``,
    ``Throttling``, ...) and the errno values s3fs uses for them, looking through the exception's
    ``__cause__``/``__context__`` chain. Always False for a :class:`PairXError` (bad input or
    configuration: never retried) and for missing files or denied permissions.
    """
    if isinstance(exc, PairXError):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        if _is_transient_one(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of the pipeline's tasks: retry only transient I/O errors
    (:func:`is_transient`), never a ``PairXError``."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - the task's own error, judged here
        return is_transient(error)
    return False


def _maps_to_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, EOFError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ClientError", "BotoCoreError", "HttpError", "NoCredentialsError"})


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Re-raise non-transient I/O errors inside the block as ``StorageError(uri, reason)``.

    Transient errors (see :func:`is_transient`), ``PairXError`` and programming errors (TypeError,
    ...) propagate unchanged.
    """
    try:
        yield
    except PairXError:
        raise
    except Exception as exc:
        if is_transient(exc) or not _maps_to_storage_error(exc):
            raise
        if _error_code(exc) == "NoSuchBucket" or "bucket does not exist" in str(exc).lower():
            reason = f"the bucket does not exist ({exc})"
        elif isinstance(exc, FileNotFoundError):
            reason = f"not found ({exc})" if str(exc) and str(exc) != uri else "not found"
        elif isinstance(exc, PermissionError):
            reason = f"permission denied: read-only or not yours ({exc})"
        elif isinstance(exc, NotADirectoryError):
            reason = f"a part of the path is a file, not a folder ({exc})"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        raise StorageError(uri, reason) from exc


def safe_segment(name: str) -> str:
    """A path segment made from any string: ``[A-Za-z0-9._-]`` kept, the rest replaced by ``_``.

    When characters had to be replaced (or the name starts with ``.``/``_``), a short hash of the
    original is appended so that different names never collide: ``"blocks/3"`` ->
    ``"blocks_3-5f1c0e2a"``. Names that are already safe are returned unchanged.
    """
    if not name:
        raise StorageError(name, "empty path segment")
    cleaned = _SAFE_RE.sub("_", name)
    if cleaned == name and not name.startswith((".", "_")):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"s{cleaned}-{digest}" if cleaned.startswith((".", "_")) else f"{cleaned}-{digest}"


def is_temp_name(path: str) -> bool:
    """Whether ``path``'s last segment is a temporary file of :meth:`write_bytes_atomic`."""
    return bool(_TEMP_RE.match(path.rstrip("/").rsplit("/", 1)[-1]))


def environment_storage_options(url: str | None = None) -> dict[str, Any]:
    """The fsspec options in ``$PAIRX_STORAGE_OPTIONS`` that apply to ``url`` (none for local paths).

    Raises:
        ConfigError: the variable is set but is not a JSON object.
    """
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    if url is not None and fsspec.core.split_protocol(url)[0] in _NO_ENV_OPTIONS:
        return {}
    try:
        options = json.loads(raw)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise ConfigError(f"${STORAGE_OPTIONS_ENV} must hold a JSON object of fsspec options")
    return options


def _filesystem(url: str, options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url_to_fs`` with the environment's options merged under ``options``."""
    return url_to_fs(url, **{**environment_storage_options(url), **dict(options or {})})


def _protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else str(proto)


def is_url(text: str) -> bool:
    """Whether ``text`` names a location with a protocol (``s3://b/k``, ``file:///x``, ``https://...``),
    not a plain path."""
    return "://" in text or text.startswith("file:")


@dataclass
class _Staged:
    """A write that has been staged and awaits :func:`_commit`."""

    kind: str  # "replace" (local), "put" (object store) or "move" (other fsspec)
    fs: fsspec.AbstractFileSystem
    final_path: str
    data: bytes | None = None
    temp_path: str | None = None

    def discard(self) -> None:
        """Remove the staged temporary file, if any (best effort)."""
        if self.temp_path is None:
            return
        with contextlib.suppress(Exception):
            if self.kind == "replace":
                os.unlink(self.temp_path)
            else:
                self.fs.rm(self.temp_path)


def _commit(staged: _Staged) -> None:
    """Make a staged write visible at its final path in one step.

    The single point tests patch to simulate a crash between staging and committing.
    """
    if staged.kind == "replace":
        assert staged.temp_path is not None
        os.replace(staged.temp_path, staged.final_path)
    elif staged.kind == "put":
        assert staged.data is not None
        staged.fs.pipe_file(staged.final_path, staged.data)
    else:
        assert staged.temp_path is not None
        staged.fs.mv(staged.temp_path, staged.final_path)


@dataclass(frozen=True)
class RetryPolicy:
    """How storage calls retry transient errors: exponential backoff with jitter.

    The one retry policy of the project's I/O (every :class:`StorageTarget` call, table reads and
    writes, the cache index, listings in flows). The defaults wait up to about 75 s in total, so
    a minute-long brown-out of an object store (503 SlowDown) delays a run instead of failing it.
    ``PAIRX_IO_ATTEMPTS`` overrides the number of attempts (1 turns retries off).
    """

    attempts: int = 10
    first_delay_s: float = 0.5
    max_delay_s: float = 15.0
    jitter: float = 0.25

    @classmethod
    def default(cls) -> "RetryPolicy":
        raw = os.environ.get("PAIRX_IO_ATTEMPTS", "").strip()
        return cls(attempts=max(1, int(raw))) if raw.isdigit() else cls()

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        import random

        base = min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))
        return base * (1 + self.jitter * (2 * random.random() - 1))


@dataclass
class RetryCount:
    """Retries of transient storage errors made in this process while a :func:`counting_retries`
    block was open."""

    count: int = 0


_OPEN_RETRY_COUNTS: list[RetryCount] = []
_RETRY_COUNTS_LOCK = threading.Lock()


@contextlib.contextmanager
def counting_retries() -> Iterator[RetryCount]:
    """Count the storage retries of one run (or one test): every thread of this process counts
    while the block runs; the count starts at zero and stops with the block, so nothing carries
    over from one run to the next. Blocks may nest or overlap; each counts for itself."""
    counter = RetryCount()
    with _RETRY_COUNTS_LOCK:
        _OPEN_RETRY_COUNTS.append(counter)
    try:
        yield counter
    finally:
        with _RETRY_COUNTS_LOCK:
            _OPEN_RETRY_COUNTS.remove(counter)


def _count_retry() -> None:
    with _RETRY_COUNTS_LOCK:
        for counter in _OPEN_RETRY_COUNTS:
            counter.count += 1


def with_retries(call, *args, policy: RetryPolicy | None = None, **kwargs):
    """``call(*args, **kwargs)``, retried on transient errors (:func:`is_transient`) per ``policy``."""
    import logging
    import time

    policy = policy or RetryPolicy.default()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if attempt == policy.attempts or not is_transient(error):
                raise
            _count_retry()
            wait = policy.delay(attempt)
            logging.getLogger("pairx.storage").info("transient storage error (%s), retry %d in %.1f s",
                                                    type(error).__name__, attempt, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def retried(method):
    """Decorator: the method retries transient errors with the default :class:`RetryPolicy`."""
    import functools

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return with_retries(method, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class StorageTarget:
    """A root location plus how to reach it.

    Attributes:
        root: canonical URL of the root (absolute plain path for local disk).
        storage_options: keyword arguments for the fsspec filesystem (e.g. ``{"anon": False}``,
            ``{"client_kwargs": {"endpoint_url": ...}}``); empty means environment defaults.

    Holds no open connection: instances are cheap, picklable and safe to send to workers (the
    filesystem object is looked up from fsspec's per-process instance cache on each call).
    """

    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_url(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> StorageTarget:
        """Target rooted at ``url`` (local path, ``file://``, ``s3://``, ``memory://``, ...)."""
        if not isinstance(url, str) or not url:
            raise StorageError(str(url), "empty storage URL")
        options = dict(storage_options or {})
        with storage_errors(url):
            try:
                fs, path = _filesystem(url, options)
            except (ImportError, ValueError) as exc:
                raise StorageError(url, f"unsupported storage URL ({exc})") from exc
        return cls(root=cls._canonical(fs, path), storage_options=options)

    # ------------------------------------------------------------------ URLs and paths
    @staticmethod
    def _canonical(fs: fsspec.AbstractFileSystem, path: str) -> str:
        if _protocol_of(fs) in ("file", "local"):
            return path.rstrip("/") or "/"
        return fs.unstrip_protocol(path).rstrip("/")

    @property
    def protocol(self) -> str:
        """``"file"``, ``"s3"``, ``"memory"``, ``"gs"``, ..."""
        return _protocol_of(self.filesystem())

    @property
    def is_local(self) -> bool:
        """Whether the root is on local disk."""
        return self.protocol in ("file", "local")

    @property
    def is_object_store(self) -> bool:
        """Whether single PUTs are atomic (s3, gs, az)."""
        return self.protocol in OBJECT_STORE_PROTOCOLS

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem of the root (cached by fsspec per process)."""
        fs, _ = _filesystem(self.root, self.storage_options)
        return fs

    def join(self, *parts: str) -> str:
        """Full URL of ``root/part0/part1/...``. Parts may contain ``/``; empty parts are skipped."""
        pieces = [self.root.rstrip("/")]
        for part in parts:
            part = str(part).strip("/")
            if part:
                pieces.append(part)
        return "/".join(pieces)

    def child(self, *parts: str) -> StorageTarget:
        """A target rooted at :meth:`join` ``(*parts)`` with the same storage options."""
        return StorageTarget(root=self.join(*parts), storage_options=self.storage_options)

    def url(self, path: str = "") -> str:
        """Full canonical URL of ``path`` (relative to the root, or already a full URL/abs path)."""
        fs, fs_path = self._resolve(path)
        return self._canonical(fs, fs_path)

    def raw_path(self, path: str = "") -> str:
        """The filesystem's own form of ``path`` (relative to the root, or a full URL of the root's
        filesystem), without protocol: what the methods of :meth:`filesystem` take."""
        return self._resolve(path)[1]

    @property
    def layout(self) -> OutputLayout:
        """The output folders under this root (canonical URLs)."""
        return OutputLayout(self.root)

    def _resolve(self, path: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, filesystem-internal path) of a relative path or full URL."""
        path = str(path)
        root_fs = self.filesystem()
        if path == "":
            target = self.root
        elif is_url(path):
            scheme = path.split(":", 1)[0]
            own = root_fs.protocol if isinstance(root_fs.protocol, (tuple, list)) else [root_fs.protocol]
            if scheme not in own and not (scheme == "file" and self.is_local):
                fs, fs_path = _filesystem(path, None)
                return fs, fs_path
            target = path
        elif self.is_local and os.path.isabs(path):
            target = path
        else:
            target = self.join(path)
        return root_fs, root_fs._strip_protocol(target)

    # ------------------------------------------------------------------ queries
    @retried
    def exists(self, path: str = "") -> bool:
        """Whether a file or directory exists at ``path`` (listing caches are refreshed first)."""
        fs, fs_path = self._resolve(path)
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache(fs_path)
            return bool(fs.exists(fs_path))

    @retried
    def glob(self, pattern: str) -> list[str]:
        """Full URLs matching a glob ``pattern`` (relative to the root or a full URL), sorted."""
        fs, fs_path = self._resolve(pattern)
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache()
            found = fs.glob(fs_path)
        return sorted(self._canonical(fs, p) for p in found if not is_temp_name(p))

    @retried
    def list_files(self, prefix: str = "", suffixes: Sequence[str] | None = None) -> list[str]:
        """All files under ``prefix`` (recursive), as full URLs, sorted.

        Args:
            prefix: directory relative to the root, or a full URL; missing -> ``[]``.
            suffixes: keep only names ending with one of these, case-insensitive
                (e.g. ``(".jpg", ".png")``).

        Temporary files of interrupted atomic writes are never returned.
        """
        fs, fs_path = self._resolve(prefix)
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache(fs_path)
            try:
                found = fs.find(fs_path)
            except FileNotFoundError:
                return []
        urls = []
        for p in found:
            if is_temp_name(p):
                continue
            if wanted and not p.lower().endswith(wanted):
                continue
            urls.append(self._canonical(fs, p))
        return sorted(urls)

    @retried
    def list_dir(self, path: str = "") -> list[str]:
        """Names (not URLs) of the direct children of directory ``path``; missing -> ``[]``."""
        fs, fs_path = self._resolve(path)
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache(fs_path)
            try:
                entries = fs.ls(fs_path, detail=False)
            except FileNotFoundError:
                return []
        names = []
        base = fs_path.rstrip("/")
        for entry in entries:
            entry = str(entry).rstrip("/")
            if entry == base:
                continue
            names.append(entry.rsplit("/", 1)[-1])
        return sorted(n for n in names if not is_temp_name(n))

    @retried
    def size_bytes(self, path: str = "") -> int:
        """Total size of all files under ``path`` (recursive); 0 when missing."""
        fs, fs_path = self._resolve(path)
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache(fs_path)
            if not fs.exists(fs_path):
                return 0
            return int(fs.du(fs_path, total=True))

    @retried
    def version(self, path: str = "") -> tuple | None:
        """What changes when the file at ``path`` is rewritten: its size with its ETag (object
        stores), modification time (local) or creation time (memory); ``None`` when the
        filesystem reports none of these (the caller must then read the bytes to know)."""
        fs, fs_path = self._resolve(path)
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache(fs_path)
            info = fs.info(fs_path)
        stamp = next((info[key] for key in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(key)), None)
        return None if stamp is None else (info.get("size"), str(stamp))

    # ------------------------------------------------------------------ reading and writing
    @retried
    def read_bytes(self, path: str) -> bytes:
        """Whole content of a file. Missing file -> ``StorageError(uri, "not found")``."""
        fs, fs_path = self._resolve(path)
        uri = self._canonical(fs, fs_path)
        with storage_errors(uri):
            return bytes(fs.cat_file(fs_path))

    @retried
    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Contents of several files at once (concurrent requests on object stores).

        Returns a dict keyed by the canonical URLs of ``paths``. Any missing file raises
        ``StorageError``.
        """
        if not paths:
            return {}
        resolved = [self._resolve(p) for p in paths]
        fs = resolved[0][0]
        if any(r[0] is not fs for r in resolved):
            return {self.url(p): self.read_bytes(p) for p in paths}
        fs_paths = [r[1] for r in resolved]
        with storage_errors(self._canonical(fs, fs_paths[0])):
            raw = fs.cat(fs_paths, on_error="raise")
        return {self._canonical(fs, p): bytes(raw[p]) for p in fs_paths}

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """fsspec ``open`` passthrough. Not atomic for writing: use :meth:`write_bytes_atomic`."""
        fs, fs_path = self._resolve(path)
        with storage_errors(self._canonical(fs, fs_path)):
            if "w" in mode and self._is_local_fs(fs):
                fs.makedirs(fs._parent(fs_path), exist_ok=True)
            return fs.open(fs_path, mode, **kwargs)

    @staticmethod
    def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
        return _protocol_of(fs) in ("file", "local")

    @retried
    def write_bytes_atomic(self, path: str, data: bytes) -> str:
        """Write ``data`` so that readers see either the old file or the whole new one.

        Returns the full URL written. See the module docstring for how each backend does it.
        """
        fs, fs_path = self._resolve(path)
        uri = self._canonical(fs, fs_path)
        payload = bytes(data)
        with storage_errors(uri):
            staged = self._stage(fs, fs_path, payload)
            try:
                _commit(staged)
            except BaseException:
                staged.discard()
                raise
        return uri

    def _stage(self, fs: fsspec.AbstractFileSystem, fs_path: str, data: bytes) -> _Staged:
        protocol = _protocol_of(fs)
        parent, _, name = fs_path.rstrip("/").rpartition("/")
        temp_name = f".{name}.tmp-{uuid.uuid4().hex}"
        if protocol in ("file", "local"):
            os.makedirs(parent or "/", exist_ok=True)
            temp_path = os.path.join(parent or "/", temp_name)
            try:
                with open(temp_path, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp_path)
                raise
            return _Staged("replace", fs, fs_path, temp_path=temp_path)
        if protocol in OBJECT_STORE_PROTOCOLS:
            return _Staged("put", fs, fs_path, data=data)
        temp_path = f"{parent}/{temp_name}" if parent else temp_name
        fs.pipe_file(temp_path, data)
        return _Staged("move", fs, fs_path, temp_path=temp_path)

    @retried
    def delete(self, path: str, recursive: bool = False) -> None:
        """Remove a file (or a directory tree with ``recursive=True``); missing is not an error."""
        fs, fs_path = self._resolve(path)
        with storage_errors(self._canonical(fs, fs_path)):
            fs.invalidate_cache(fs_path)
            try:
                fs.rm(fs_path, recursive=recursive)
            except FileNotFoundError:
                return

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, path: str = "", read_only: bool = False) -> Any:
        """A Zarr v3 store rooted at ``path``: ``LocalStore`` on disk, ``FsspecStore`` elsewhere.

        Create it inside the task/worker that uses it (a store opened in a parent process is
        bound to the parent's event loop and fails in a forked child).
        """
        import zarr.storage

        url = self.url(path)
        if self.is_local and not is_url(url):
            if not read_only:
                os.makedirs(url, exist_ok=True)
            return zarr.storage.LocalStore(url, read_only=read_only)
        with storage_errors(url):
            options = {**environment_storage_options(url), **dict(self.storage_options)}
            return zarr.storage.FsspecStore.from_url(url, storage_options=options or None, read_only=read_only)


@dataclass(frozen=True)
class OutputLayout:
    """The folders of an output root ``OUT``: the one place that names them.

    - ``tables/<name>/``: Parquet datasets (``infra.tables``);
    - ``viz/``: PAIR-X pictures (``infra.viz``);
    - ``report/``: the review site (``infra.report``);
    - ``cache/``: the default activation cache (``--cache`` moves it);
    - ``_pairx/``: control files (the lease, quarantined table files, the review journal).

    The class attributes are the folder names, for paths relative to ``OUT`` (what
    :class:`StorageTarget` methods take). An instance joins them to ``root`` as written, without
    resolving it (messages show OUT as the user gave it); ``StorageTarget.layout`` gives the
    canonical URLs.
    """

    root: str

    TABLES: ClassVar[str] = "tables"
    VIZ: ClassVar[str] = "viz"
    REPORT: ClassVar[str] = "report"
    CACHE: ClassVar[str] = "cache"
    CONTROL: ClassVar[str] = "_pairx"

    def join(self, *parts: str) -> str:
        """``root/part0/part1/...``."""
        return "/".join([self.root.rstrip("/"), *(str(p).strip("/") for p in parts if str(p).strip("/"))])

    @classmethod
    def table_path(cls, name: str) -> str:
        """``tables/<name>``, relative to OUT."""
        return f"{cls.TABLES}/{name}"

    @classmethod
    def control_path(cls, *parts: str) -> str:
        """``_pairx/<parts...>``, relative to OUT."""
        return "/".join([cls.CONTROL, *parts])

    @property
    def tables(self) -> str:
        return self.join(self.TABLES)

    def table(self, name: str) -> str:
        return self.join(self.TABLES, name)

    @property
    def viz(self) -> str:
        return self.join(self.VIZ)

    @property
    def report(self) -> str:
        return self.join(self.REPORT)

    @property
    def cache(self) -> str:
        return self.join(self.CACHE)

    @property
    def control(self) -> str:
        return self.join(self.CONTROL)
