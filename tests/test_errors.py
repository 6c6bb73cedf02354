"""Errors cross process boundaries (Dask workers pickle them back to the client) intact."""

from __future__ import annotations

import inspect
import pickle

import pytest

import pairx_core.errors as errors_module
from pairx_core.errors import (ConfigError, ImageError, LayerError, ModelLoadError, NumericalError, PairXError,
                               RandomWeightsError, ShapeError, StorageError, UnsupportedModelError)

EXAMPLES = [
    ConfigError("bad option"),
    ShapeError("x0", (1, 2, 3), "(B, 3, H, W)"),
    UnsupportedModelError("my.Gate", "blocks.2.gate", "mul of two activations"),
    NumericalError("NaN in relevance"),
    ModelLoadError("timm:x", "keys differ", missing=["a.weight"], unexpected=["b.bias"]),
    ImageError("s3://b/a.jpg", "cannot identify image file"),
    StorageError("/ro/out/tables", "permission denied"),
    LayerError("backbone.blocks.33", "the model has no submodule of that name", ["backbone.blocks.3"]),
    RandomWeightsError("timm:resnet18", "give weights"),
]


def _with_content_hash() -> ImageError:
    error = ImageError("a.jpg", "corrupt")
    error.content_hash = "ab" * 32  # set by the decoder: must survive the trip too
    return error


EXAMPLES.append(_with_content_hash())


def _all_error_classes() -> set[type]:
    found = set()
    for _, value in inspect.getmembers(errors_module, inspect.isclass):
        if issubclass(value, PairXError):
            found.add(value)
    return found


def test_every_error_class_has_an_example():
    assert _all_error_classes() <= {type(e) for e in EXAMPLES} | {PairXError}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_keeps_type_message_and_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
    assert isinstance(copy, PairXError)


def test_storage_error_raised_in_a_dask_worker_reaches_the_client(tmp_path):
    """A real worker process: the client sees the StorageError with its own message."""
    import dask
    from distributed import Client, LocalCluster

    from infra.cluster import local_cluster_config
    from infra.tables import write_table

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike a read-only folder

    def write() -> None:
        write_table(str(blocker / "out"), "errors", [{"item": "x", "stage": "load", "error_type": "E",
                                                      "message": "m", "content_hash": None}], "model", "run")

    # the project's worker settings: the first cluster of a process fixes the environment that later
    # workers inherit (tests/test_infra_cluster.py checks it)
    with dask.config.set(local_cluster_config()), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        future = client.submit(write)
        with pytest.raises(StorageError) as raised:
            future.result()
    assert "is a file, not a folder" in str(raised.value) and str(blocker) in raised.value.uri


def test_missing_bucket_says_so(s3_server):
    from infra.tables import write_table

    with pytest.raises(StorageError) as raised:
        row = {"item": "x", "stage": "load", "error_type": "E", "message": "m", "content_hash": None}
        write_table("s3://no-such-bucket-pairx/out", "errors", [row], "model", "run")
    assert "bucket does not exist" in str(raised.value)
