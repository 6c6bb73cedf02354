"""infra.storage: URLs, listing, atomic writes, error classification."""

from __future__ import annotations

import errno
import os
import pickle
import uuid

import pytest

import infra.storage as storage
from infra.storage import StorageTarget, is_temp_name, is_transient, safe_segment, storage_errors
from pairx_core.errors import ConfigError, ImageError, StorageError


@pytest.fixture
def memory_target():
    target = StorageTarget.from_url(f"memory://test-{uuid.uuid4().hex}")
    yield target
    target.delete("", recursive=True)


@pytest.fixture(params=["local", "memory"])
def any_target(request, tmp_path, memory_target):
    if request.param == "local":
        return StorageTarget.from_url(str(tmp_path / "root"))
    return memory_target


class _Crash(RuntimeError):
    pass


def _crash(*_args, **_kwargs):
    raise _Crash("simulated crash between staging and commit")


# ---------------------------------------------------------------------- URLs
def test_local_urls_are_canonical_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = StorageTarget.from_url("out/data")
    assert relative.root == str(tmp_path / "out" / "data")
    assert StorageTarget.from_url(f"file://{tmp_path}/out/data/").root == relative.root
    assert relative.is_local and not relative.is_object_store
    assert relative.join("a", "/b/", "", "c.txt") == f"{tmp_path}/out/data/a/b/c.txt"
    # full URLs and absolute paths pass through; relative paths hang off the root
    assert relative.url(f"file://{tmp_path}/x.txt") == f"{tmp_path}/x.txt"
    assert relative.url("x.txt") == f"{tmp_path}/out/data/x.txt"


def test_memory_and_s3_urls_keep_their_protocol():
    mem = StorageTarget.from_url("memory://bucket/prefix")
    assert mem.root == "memory:///bucket/prefix"
    assert mem.protocol == "memory"
    assert mem.join("k") == "memory:///bucket/prefix/k"
    s3 = StorageTarget.from_url("s3://bucket/prefix/", {"anon": True})
    assert s3.root == "s3://bucket/prefix"
    assert s3.is_object_store
    assert s3.child("a").root == "s3://bucket/prefix/a"
    assert s3.child("a").storage_options == {"anon": True}


def test_unsupported_url_is_a_storage_error():
    with pytest.raises(StorageError) as info:
        StorageTarget.from_url("nosuchproto://x/y")
    assert "nosuchproto://x/y" in str(info.value)


def test_target_pickles_and_still_works(memory_target):
    memory_target.write_bytes_atomic("f.bin", b"abc")
    clone = pickle.loads(pickle.dumps(memory_target))
    assert clone == memory_target
    assert clone.read_bytes("f.bin") == b"abc"


# ---------------------------------------------------------------------- read, write, list
def test_write_read_list_round_trip(any_target):
    url = any_target.write_bytes_atomic("d/sub/one.JPG", b"1")
    any_target.write_bytes_atomic("d/two.png", b"22")
    any_target.write_bytes_atomic("d/notes.txt", b"333")
    assert url == any_target.join("d/sub/one.JPG")
    assert any_target.read_bytes("d/two.png") == b"22"
    assert any_target.read_bytes(url) == b"1"  # full URLs work too
    assert any_target.exists("d/sub/one.JPG") and any_target.exists("d")
    assert not any_target.exists("d/missing.png")
    images = any_target.list_files("d", suffixes=(".jpg", ".png"))
    assert images == sorted([any_target.join("d/sub/one.JPG"), any_target.join("d/two.png")])
    assert len(any_target.list_files("d")) == 3
    assert any_target.list_files("nothing-here") == []
    assert any_target.list_dir("d") == ["notes.txt", "sub", "two.png"]
    assert any_target.glob("d/*.png") == [any_target.join("d/two.png")]
    assert any_target.size_bytes("d") == 6
    with any_target.open("d/notes.txt") as handle:
        assert handle.read() == b"333"
    assert any_target.read_many(["d/two.png", "d/notes.txt"]) == {
        any_target.join("d/two.png"): b"22",
        any_target.join("d/notes.txt"): b"333",
    }


def test_overwrite_replaces_whole_content(any_target):
    any_target.write_bytes_atomic("f", b"a much longer first version")
    any_target.write_bytes_atomic("f", b"short")
    assert any_target.read_bytes("f") == b"short"


def test_missing_file_is_storage_error_with_uri(any_target):
    with pytest.raises(StorageError) as info:
        any_target.read_bytes("nope/missing.bin")
    assert info.value.uri == any_target.join("nope/missing.bin")
    assert "not found" in str(info.value)
    assert not is_transient(info.value)


def test_delete_file_and_tree(any_target):
    any_target.write_bytes_atomic("t/a/b.bin", b"x")
    any_target.write_bytes_atomic("t/c.bin", b"y")
    any_target.delete("t/c.bin")
    assert not any_target.exists("t/c.bin")
    any_target.delete("t", recursive=True)
    assert any_target.list_files("t") == []
    any_target.delete("t/never-existed")  # no error


# ---------------------------------------------------------------------- atomicity
def test_crash_before_commit_keeps_previous_version(any_target, monkeypatch):
    any_target.write_bytes_atomic("x/state.json", b"v1")
    monkeypatch.setattr(storage, "_commit", _crash)
    with pytest.raises(_Crash):
        any_target.write_bytes_atomic("x/state.json", b"v2 partial")
    with pytest.raises(_Crash):
        any_target.write_bytes_atomic("x/new.json", b"never visible")
    monkeypatch.undo()
    assert any_target.read_bytes("x/state.json") == b"v1"
    assert not any_target.exists("x/new.json")
    # the staged temporary objects were cleaned up
    assert any_target.list_dir("x") == ["state.json"]
    fs, path = any_target._resolve("x")
    assert [p for p in fs.ls(path, detail=False) if is_temp_name(p)] == []


def test_hard_crash_leaves_only_a_hidden_temp_file(tmp_path, monkeypatch):
    target = StorageTarget.from_url(str(tmp_path))
    target.write_bytes_atomic("t/table.parquet", b"v1")
    monkeypatch.setattr(storage, "_commit", _crash)
    monkeypatch.setattr(storage._Staged, "discard", lambda self: None)  # process died: no cleanup
    with pytest.raises(_Crash):
        target.write_bytes_atomic("t/table.parquet", b"v2")
    monkeypatch.undo()
    on_disk = os.listdir(tmp_path / "t")
    leftovers = [n for n in on_disk if n != "table.parquet"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".") and not leftovers[0].endswith(".parquet")
    assert (tmp_path / "t" / "table.parquet").read_bytes() == b"v1"
    assert target.list_files("t") == [target.join("t/table.parquet")]
    assert target.list_dir("t") == ["table.parquet"]


def test_object_store_commit_is_a_single_put(monkeypatch):
    calls = []

    class FakeFS:
        def pipe_file(self, path, data):
            calls.append((path, data))

    staged = storage._Staged("put", FakeFS(), "bucket/key", data=b"payload")
    storage._commit(staged)
    assert calls == [("bucket/key", b"payload")]
    staged.discard()  # nothing staged remotely: nothing to delete


# ---------------------------------------------------------------------- errors
def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: ConnectionResetError("reset"), True),
        (lambda: TimeoutError("slow"), True),
        (lambda: OSError(errno.EBUSY, "SlowDown"), True),  # how s3fs reports throttling
        (lambda: OSError(errno.ECONNREFUSED, "refused"), True),
        (lambda: _client_error("SlowDown", 503), True),
        (lambda: _client_error("InternalError", 500), True),
        (lambda: _client_error("ThrottlingException", 400), True),
        (lambda: _client_error("TooManyRequests", 429), True),
        (lambda: _client_error("NoSuchKey", 404), False),
        (lambda: _client_error("AccessDenied", 403), False),
        (lambda: FileNotFoundError("gone"), False),
        (lambda: PermissionError("no"), False),
        (lambda: OSError(errno.ENOSPC, "disk full"), False),
        (lambda: ValueError("bad"), False),
        (lambda: StorageError("s3://b/k", "not found"), False),
        (lambda: ImageError("x.jpg", "truncated"), False),
        (lambda: ConfigError("bad option"), False),
    ],
)
def test_is_transient_classification(make, expected):
    assert is_transient(make()) is expected


def test_is_transient_sees_through_translated_errors():
    from botocore.exceptions import EndpointConnectionError

    translated = OSError(errno.EIO, "unknown")  # s3fs wraps unknown codes like this
    translated.__cause__ = _client_error("ServiceUnavailable", 503)
    assert is_transient(translated)
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    wrapped_missing = OSError(errno.EIO, "x")
    wrapped_missing.__cause__ = _client_error("NoSuchKey", 404)
    assert not is_transient(wrapped_missing)


def test_storage_errors_maps_only_non_transient_io_errors():
    with pytest.raises(StorageError) as info:
        with storage_errors("s3://b/k"):
            raise PermissionError("denied")
    assert info.value.uri == "s3://b/k" and "permission denied" in info.value.reason
    with pytest.raises(ConnectionResetError):
        with storage_errors("s3://b/k"):
            raise ConnectionResetError("retry me")
    with pytest.raises(TypeError):  # programming errors are not storage errors
        with storage_errors("s3://b/k"):
            raise TypeError("bug")


def test_safe_segment_is_stable_and_collision_free():
    assert safe_segment("blocks.3") == "blocks.3"
    assert safe_segment("model-v1_final") == "model-v1_final"
    names = ["a/b", "a_b", "a b", "a:b", ".hidden", "_x", "ü"]
    segments = [safe_segment(n) for n in names]
    assert len(set(segments)) == len(names)
    for seg in segments:
        assert "/" not in seg and not seg.startswith((".", "_"))
        assert all(c.isalnum() and c.isascii() or c in "._-" for c in seg)
    assert safe_segment("a/b") == safe_segment("a/b")


def test_zarr_store_local_and_memory(tmp_path, memory_target):
    import zarr

    local = StorageTarget.from_url(str(tmp_path)).zarr_store("z.zarr")
    assert isinstance(local, zarr.storage.LocalStore)
    remote = memory_target.zarr_store("z.zarr")
    assert isinstance(remote, zarr.storage.FsspecStore)
    group = zarr.open_group(remote, mode="a")
    group.create_array("a", shape=(2,), dtype="int32")[...] = [3, 4]
    assert memory_target.exists("z.zarr/a/zarr.json")


def test_transient_errors_are_retried_with_the_one_policy(tmp_path, monkeypatch):
    """Storage calls retry transient errors (here: 3 x 503) and never retry a missing file."""
    import infra.storage as storage_module
    from infra.storage import RetryPolicy, StorageTarget, counting_retries
    from pairx_core.errors import StorageError

    target = StorageTarget.from_url(str(tmp_path))
    (tmp_path / "a.txt").write_bytes(b"hello")
    calls = {"n": 0}
    real_cat = type(target.filesystem()).cat_file

    class SlowDown(Exception):
        response = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}

    def flaky(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise SlowDown("503")
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(type(target.filesystem()), "cat_file", flaky)
    monkeypatch.setattr(RetryPolicy, "default", classmethod(lambda cls: cls(attempts=5, first_delay_s=0.01)))
    with counting_retries() as retries:
        assert target.read_bytes("a.txt") == b"hello"
    assert calls["n"] == 4 and retries.count == 3
    calls["n"] = 10  # no more failures: a missing file is not transient and is not retried
    with pytest.raises(StorageError):
        target.read_bytes("missing.txt")
    assert calls["n"] == 11
    assert storage_module.with_retries(lambda: 7) == 7


def test_each_run_counts_its_own_retries(monkeypatch):
    """The retry count is per run: it starts at zero, counts every thread, and ends with the run."""
    import threading

    from infra.storage import RetryPolicy, counting_retries, with_retries

    monkeypatch.setattr(RetryPolicy, "default", classmethod(lambda cls: cls(attempts=3, first_delay_s=0.0)))

    def fails_twice():
        failures = iter([ConnectionResetError("reset"), ConnectionResetError("reset")])

        def call():
            error = next(failures, None)
            if error is not None:
                raise error
            return "ok"

        return call

    assert with_retries(fails_twice()) == "ok"  # no run open: counted nowhere
    with counting_retries() as first:
        worker = threading.Thread(target=with_retries, args=(fails_twice(),))  # a task's thread
        worker.start()
        worker.join()
    with counting_retries() as second, counting_retries() as inner:
        with_retries(fails_twice())
    assert (first.count, second.count, inner.count) == (2, 2, 2)


def test_tasks_retry_only_transient_errors():
    """``retry_transient``, the Prefect retry condition every pipeline task uses."""
    from infra.storage import retry_transient
    from pairx_core.errors import ImageError

    class Finished:
        def __init__(self, error: BaseException | None):
            self.error = error

        def result(self):
            if self.error is not None:
                raise self.error

    assert retry_transient(None, None, Finished(ConnectionResetError("reset")))
    assert not retry_transient(None, None, Finished(ImageError("a.jpg", "not an image")))
    assert not retry_transient(None, None, Finished(FileNotFoundError("a.jpg")))
    assert not retry_transient(None, None, Finished(None))


def test_raw_paths_urls_and_the_output_layout(tmp_path, memory_target):
    from infra.storage import OutputLayout, is_url

    assert memory_target.raw_path("a/b.txt") == memory_target.raw_path(memory_target.url("a/b.txt"))
    assert not is_url(memory_target.raw_path("a/b.txt"))  # the filesystem's own form: no protocol
    memory_target.write_bytes_atomic("a/b.txt", b"x")
    assert memory_target.filesystem().cat_file(memory_target.raw_path("a/b.txt")) == b"x"
    local = StorageTarget.from_url(str(tmp_path))
    assert local.raw_path("t/x") == f"{tmp_path}/t/x" and local.raw_path() == str(tmp_path)
    assert [is_url(t) for t in ("s3://b/k", "file:///x", "https://h/p", "/abs/p", "rel/p")] == [True] * 3 + [False] * 2

    layout = local.layout
    assert (layout.tables, layout.viz, layout.report, layout.cache, layout.control) == tuple(
        f"{tmp_path}/{name}" for name in ("tables", "viz", "report", "cache", "_pairx"))
    assert layout.table("pairs") == f"{tmp_path}/tables/pairs" == local.url(OutputLayout.table_path("pairs"))
    assert OutputLayout("s3://b/out/").table("errors") == "s3://b/out/tables/errors"  # joined as written
    assert OutputLayout.control_path("lease.json") == "_pairx/lease.json"
