"""One thread per process runs the torch work of the pipeline's tasks (``infra.compute_thread``)."""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time

import pytest
import torch

from infra.compute_thread import on_compute_thread, release_compute_thread

REQUEST = contextvars.ContextVar("request", default="none")


def _from_new_threads(fn, count: int = 3, while_alive=lambda: None) -> tuple[list, object]:
    """``fn()`` called from ``count`` new threads, one after the other; the threads stay alive until
    all are done (as a task runner's pool threads do) and ``while_alive()`` has run."""
    results, release, threads = [], threading.Event(), []
    for _ in range(count):
        done = threading.Event()

        def run(done: threading.Event = done):
            results.append(fn())
            done.set()
            release.wait()

        thread = threading.Thread(target=run)
        thread.start()
        done.wait()
        threads.append(thread)
    seen = while_alive()
    release.set()
    for thread in threads:
        thread.join()
    return results, seen


def test_every_call_runs_on_the_same_thread_and_returns_or_raises():
    idents, _ = _from_new_threads(lambda: on_compute_thread(threading.get_ident))
    compute_thread = on_compute_thread(threading.get_ident)
    assert len(set(idents)) == 1 and idents[0] == compute_thread != threading.get_ident()
    assert on_compute_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="missing"):
        on_compute_thread(lambda: {}["missing"])
    # a call made on the compute thread runs inline instead of waiting for itself
    assert on_compute_thread(lambda: on_compute_thread(threading.get_ident)) == compute_thread


def test_the_callers_context_goes_with_the_call():
    token = REQUEST.set("night-7")
    try:
        assert on_compute_thread(REQUEST.get) == "night-7"
    finally:
        REQUEST.reset(token)
    assert on_compute_thread(REQUEST.get) == "none"


def test_the_compute_threads_team_flushes_denormals():
    def flushed_share() -> float:
        values = torch.full((1 << 20,), 1e-40, dtype=torch.float32) * 1.0  # parallel on 2+ threads
        return float((values == 0).float().mean())

    assert on_compute_thread(flushed_share) == 1.0


def _native_threads() -> int:
    """OS threads of this process that Python did not start (torch's OpenMP workers among them),
    read once it stopped changing (a thread that ended leaves the OS a moment later)."""
    def count() -> int:
        return len(os.listdir("/proc/self/task")) - threading.active_count()

    last, deadline = count(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now == last:
            return now
        last = now
    return last


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread starts no OpenMP workers")
def test_tasks_called_from_many_threads_start_no_second_openmp_team(tmp_path):
    """OpenMP gives each thread that starts a parallel region its own workers, and with more
    workers than CPUs it stops spin-waiting (every operator then waits for sleeping threads): the
    tasks' model work (embedding, stage 1, explanations) runs on the compute thread whatever
    thread calls."""
    from PIL import Image

    from model_helpers import random_images
    from infra.inputs import PairItem
    from tasks.embed import embed_images
    from tasks.explain import RunSettings, explain_pairs_batch
    from tasks.stage1 import Stage1Pair, Stage1Settings, stage1_pairs

    photos = []
    for i, image in enumerate(random_images(3, 64, seed=5)):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()).save(path)
        photos.append(str(path))
    model, layer = "timm:efficientnet_b0?size=64", "backbone.blocks.3"
    caches = iter(range(100))

    def night_work():
        cache = str(tmp_path / f"cache{next(caches)}")  # empty: every call embeds
        embedded = embed_images(photos, model=model, cache_url=cache, layers=[layer], run_id="r",
                                out=str(tmp_path / "out"))
        hashes = embedded.hashes
        pairs = [Stage1Pair(f"p{i}", photos[0], hashes[photos[0]], photos[i], hashes[photos[i]]) for i in (1, 2)]
        judged = stage1_pairs(pairs, Stage1Settings(model=model, cache_url=cache, layer=layer)).metrics
        settings = RunSettings(out=f"{cache}-out", model=model, layers=(layer,), run_id="r", k_colors=1, render=False)
        explained = explain_pairs_batch([PairItem("p1", photos[0], photos[1])], settings)  # new output: computed
        return len(judged), explained.done

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the compute thread's team and the libraries' own native pools (the
            night_work()  # cache reads start theirs on the second call) exist before counting
        before = _native_threads()
        results, during = _from_new_threads(night_work, while_alive=_native_threads)
    assert during == before
    assert results == [(2, 1)] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread starts no OpenMP workers")
def test_released_compute_thread_takes_its_openmp_workers_along():
    release_compute_thread()
    before = _native_threads()
    first = on_compute_thread(lambda: (torch.randn(1 << 20).exp_(), threading.current_thread())[1])
    assert _native_threads() > before  # the compute thread's team
    release_compute_thread()
    assert _native_threads() == before
    assert not first.is_alive() and on_compute_thread(threading.current_thread) is not first  # a new one
