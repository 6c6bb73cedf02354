"""One decode per photo per night: embed, explain and the report's thumbnails share one decode."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from night_helpers import write_night
from PIL import Image

from infra import images as images_module
from infra.decoded_photos import DecodedPhotoCache, clear_decoded_photos, decoded_photos, load_photo
from infra.images import DecodeNeed, decode_need, decode_photo

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def _jpeg(size=(2400, 1800), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _count_decodes(monkeypatch) -> Counter:
    """Spy on the step where a photo's bytes become pixels; decodes counted by photo URI."""
    counts: Counter = Counter()
    real = images_module._open_checked

    def spy(data, uri, *args, **kwargs):
        counts[uri] += 1
        return real(data, uri, *args, **kwargs)

    monkeypatch.setattr(images_module, "_open_checked", spy)
    return counts


@pytest.mark.integration
@pytest.mark.slow
def test_a_night_decodes_each_photo_once_including_the_report(prefect_harness, tmp_path, monkeypatch):
    from flows.config import NightlyConfig
    from flows.nightly import nightly

    root = write_night(tmp_path / "night", 3, seed=2)
    photos = sorted(str(p) for p in root.rglob("*.png"))
    clear_decoded_photos()
    counts = _count_decodes(monkeypatch)
    config = NightlyConfig(uploads=str(root / "uploads"), gallery=str(root / "gallery"), out=str(tmp_path / "out"),
                           model=MODEL, layers=[LAYER], top_k=2, rerank_k=3, k_colors=0, k_lines=3, workers=0,
                           report=True, allow_random_weights=True)
    summary = nightly(config)
    assert summary["done"] == 6 and summary["report"]  # explained and reported
    thumbs = list((tmp_path / "out" / "report" / "thumbs").glob("*.jpg"))
    assert len(thumbs) >= 2 * len(photos)  # every photo shown (small and enlarged)
    assert dict(counts) == {photo: 1 for photo in photos}  # today's code: 3 per upload (embed, explain, report)
    assert len(decoded_photos()) == 0  # emptied at the end of the run


def test_a_finer_decode_serves_a_coarser_need_and_a_rewritten_file_is_decoded_again(tmp_path, monkeypatch):
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg())
    clear_decoded_photos()
    counts = _count_decodes(monkeypatch)
    box = (600, 450, 600, 450)  # a detection: 600 px long at full resolution
    model = load_photo(str(path), [(None, 0.0), (box, 0.0)], decode_need((64, 64)), run_id="r1")
    assert model.scale == 1  # the detection's picture floor (90 % of 600 px) rules out 1/2
    report = load_photo(str(path), [(None, 0.0)], decode_need(), run_id="r1")  # alone it would take 1/2
    assert report is model and counts[str(path)] == 1
    framed = model.chip(box)
    assert framed.size == (600, 450) and framed.box == box

    path.write_bytes(_jpeg(seed=1))  # new bytes under the same name
    again = load_photo(str(path), [(None, 0.0)], decode_need(), run_id="r1")
    assert again is not model and again.scale == 2 and counts[str(path)] == 2
    load_photo(str(path), [(None, 0.0)], decode_need(), run_id="r2")  # another run: its own decode
    assert counts[str(path)] == 3
    clear_decoded_photos()


def test_a_photo_decoded_in_this_run_is_not_read_again_until_its_file_changes(tmp_path, monkeypatch):
    """Embed, explain and the report each ask for the photo: one read of its bytes (on an object
    store each read is a download), then only its storage version is checked."""
    import os

    from infra.storage import StorageTarget

    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg())
    reads: Counter = Counter()
    real_read = StorageTarget.read_bytes

    def counting_read(self, relative):
        reads[self.url(relative)] += 1
        return real_read(self, relative)

    monkeypatch.setattr(StorageTarget, "read_bytes", counting_read)
    clear_decoded_photos()
    first = load_photo(str(path), [(None, 0.0)], decode_need((64, 64)), run_id="r1")
    for _ in range(2):
        assert load_photo(str(path), [(None, 0.0)], decode_need((64, 64)), run_id="r1") is first
    assert sum(reads.values()) == 1

    path.write_bytes(_jpeg(seed=2))  # rewritten: another modification time
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    again = load_photo(str(path), [(None, 0.0)], decode_need((64, 64)), run_id="r1")
    assert again is not first and again.content_hash != first.content_hash and sum(reads.values()) == 2
    clear_decoded_photos()


def test_the_cache_is_bounded_in_bytes_least_recently_used_first():
    photos = [decode_photo(_jpeg((320, 240), seed), f"p{seed}") for seed in range(3)]
    cache = DecodedPhotoCache(limit=2 * photos[0].nbytes)
    cache.put(photos[0])
    cache.put(photos[1])
    assert cache.get("p0", photos[0].content_hash, [(None, 0.0)], None) is photos[0]  # p0 used last now
    cache.put(photos[2])
    assert len(cache) == 2 and cache.nbytes == 2 * photos[0].nbytes
    assert cache.get("p1", photos[1].content_hash, [(None, 0.0)], None) is None  # evicted first
    assert cache.get("p0", photos[0].content_hash, [(None, 0.0)], None) is photos[0]
    tiny = DecodedPhotoCache(limit=photos[0].nbytes - 1)
    tiny.put(photos[0])  # larger than the whole cache: not kept
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_a_coarse_decode_does_not_serve_a_finer_need():
    data = _jpeg((1600, 1200))
    coarse = decode_photo(data, "p", need=DecodeNeed(target_size=(32, 32), picture_long_side=0))
    assert coarse.scale == 8
    assert not coarse.serves([(None, 0.0)], decode_need((440, 440)))
    assert coarse.serves([(None, 0.0)], DecodeNeed(target_size=(100, 100), picture_long_side=0))
    assert decode_photo(data, "p").serves([(None, 0.0)], decode_need((440, 440)))  # full resolution serves all


def test_framed_thumbnail_draws_the_pixel_box_on_a_reduced_decode(tmp_path):
    from infra.report.data import Photo
    from infra.report.thumbs import framed_photo

    path = tmp_path / "frame.jpg"
    Image.new("RGB", (2400, 1800), (255, 255, 255)).save(path, "JPEG", quality=95)
    clear_decoded_photos()
    image = framed_photo(Photo(str(path), box=(1200, 600, 400, 300), framed=True))
    clear_decoded_photos()
    assert image.size == (1200, 900)  # decoded at 1/2: 1200 px >= 90 % of 1024
    red = np.argwhere(np.asarray(image)[:, :, 1] < 128)  # the red outline (green channel low)
    (top, left), (bottom, right) = red.min(axis=0), red.max(axis=0)
    assert (left, top, right, bottom) == (600, 300, 799, 449)  # the box at 1/2 scale
