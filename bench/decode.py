#!/usr/bin/env python3
"""Decode + preprocess cost of camera-trap photos (12 MP JPEG -> model input), full vs draft.

Makes its own photos (nothing is committed): a synthetic 4000 x 3000 scene (smooth gradients,
texture and shapes; JPEG quality 90), or ``--photo FILE`` upscaled to 4000 x 3000. Measures, for
each mode, ``infra.images.decode_image`` + ``Preprocessing.to_tensor`` to a ``--size`` input:

- ``full``: full-resolution decode (the behaviour without ``target_size``);
- ``draft``: ``target_size`` given, picture floor ``--picture-long-side`` (default 1024);
- ``draft_model_only``: ``picture_long_side=0`` (only the model input bounds the scale);

one image at a time (median of ``--repeats``, modes interleaved), and a batch of ``--batch``
images decoded in ``--threads`` threads (images per second, ms per image). It also reports how far
each mode's model input lies from the full decode's (mean / max absolute difference, in
normalised units). Prints one JSON line per mode, and one ``decode_detections`` line: a camera-trap
frame with ``--detections`` (3) boxes cut from one decode (``infra.images.cut_chip``) against one
box, and against one decode per box; and one ``embed_step`` line: the embed task's read, decode and
preprocess of ``--batch`` photo files (``tasks.embed._load_all``), before (full decode, what the
step did until it shared the run's decode policy) and after (``infra.images.decode_need`` of the
model input: a draft decode), in the same run, ms per photo.

Example::

    python bench/decode.py --repeats 15 --batch 16 --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from infra.images import PICTURE_LONG_SIDE, cut_chip, decode_image  # noqa: E402
from pairx_core.preprocess import Preprocessing  # noqa: E402


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like scene: low-frequency colour field, fine texture, a few dark blobs."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 220, size=(height // 250 + 2, width // 250 + 2, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16)
    texture = rng.normal(0, 12, size=(height // 2, width // 2, 1)).astype(np.int16)
    pixels = pixels + np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)
    yy, xx = np.ogrid[:height, :width]
    for _ in range(12):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(40, 300)
        pixels[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] //= 3
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_jpeg(args: argparse.Namespace, seed: int) -> bytes:
    if args.photo:
        image = Image.open(args.photo).convert("RGB").resize((args.width, args.height), Image.BICUBIC)
    else:
        image = synthetic_photo(args.width, args.height, seed)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=args.quality)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--size", type=int, default=440, help="model input (square)")
    parser.add_argument("--picture-long-side", type=int, default=PICTURE_LONG_SIDE)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch", type=int, default=8, help="images per threaded batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--photo", default=None, help="upscale this photo instead of a synthetic scene")
    parser.add_argument("--detections", type=int, default=3, help="boxes of the camera-trap frame line")
    args = parser.parse_args()

    prep = Preprocessing(size=(args.size, args.size))
    photos = [make_jpeg(args, seed) for seed in range(max(1, min(args.batch, 4)))]
    modes = {
        "full": {},
        "draft": {"target_size": prep.size, "picture_long_side": args.picture_long_side},
        "draft_model_only": {"target_size": prep.size, "picture_long_side": 0},
    }

    def one(data: bytes, options: dict):
        loaded = decode_image(data, **options)
        return prep.to_tensor(loaded.image), loaded

    for options in modes.values():  # warm-up
        one(photos[0], options)
    single: dict[str, list[float]] = {m: [] for m in modes}
    decode_only: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, options in modes.items():
            start = time.perf_counter()
            loaded = decode_image(photos[0], **options)
            middle = time.perf_counter()
            prep.to_tensor(loaded.image)
            end = time.perf_counter()
            single[mode].append(end - start)
            decode_only[mode].append(middle - start)
    batch: dict[str, list[float]] = {m: [] for m in modes}
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for _ in range(max(1, args.repeats // 3)):
            for mode, options in modes.items():
                items = [photos[i % len(photos)] for i in range(args.batch)]
                start = time.perf_counter()
                list(pool.map(one, items, [options] * len(items)))
                batch[mode].append(time.perf_counter() - start)
    full_median = statistics.median(single["full"])
    full_tensor, _ = one(photos[0], modes["full"])
    for mode, options in modes.items():
        tensor, loaded = one(photos[0], options)
        difference = (tensor - full_tensor).abs()
        median = statistics.median(single[mode])
        print(json.dumps({
            "bench": "decode", "mode": mode, "photo": args.photo or "synthetic",
            "jpeg_bytes": len(photos[0]), "original_size": [args.width, args.height], "quality": args.quality,
            "model_input": args.size, "decode_scale": loaded.decode_scale, "decoded_chip_size": list(loaded.size),
            "ms_decode_preprocess": round(1000 * median, 1),
            "ms_decode_only": round(1000 * statistics.median(decode_only[mode]), 1),
            "ms_all": [round(1000 * t, 1) for t in single[mode]],
            "speedup_vs_full": round(full_median / median, 2),
            "batch": args.batch, "threads": args.threads,
            "batch_images_per_s": round(args.batch / statistics.median(batch[mode]), 1),
            "batch_ms_per_image": round(1000 * statistics.median(batch[mode]) / args.batch, 1),
            "input_abs_diff_vs_full_mean": round(float(difference.mean()), 4),
            "input_abs_diff_vs_full_max": round(float(difference.max()), 3),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }))
    detections_line(args, photos[0], prep)
    embed_step_line(args, photos, prep)


def detections_line(args: argparse.Namespace, photo: bytes, prep: Preprocessing) -> None:
    """One decode cut into ``--detections`` model inputs vs one, and vs one decode per box."""
    boxes = [(0.05 + 0.3 * i, 0.3, 0.25, 0.4) for i in range(args.detections)]

    def cut(count: int) -> None:
        whole = decode_image(photo)
        for box in boxes[:count]:
            prep.to_tensor(cut_chip(whole, box).image)

    def per_box() -> None:
        for box in boxes:
            prep.to_tensor(decode_image(photo, box=box).image)

    timings: dict[str, list[float]] = {"one_box": [], "boxes_one_decode": [], "boxes_one_decode_each": []}
    runs = {"one_box": lambda: cut(1), "boxes_one_decode": lambda: cut(len(boxes)), "boxes_one_decode_each": per_box}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(json.dumps({
        "bench": "decode", "mode": "detections", "original_size": [args.width, args.height], "detections": len(boxes),
        "model_input": args.size, **{f"ms_{name}": round(1000 * value, 1) for name, value in medians.items()},
        "ratio_boxes_vs_one": round(medians["boxes_one_decode"] / medians["one_box"], 2),
        "ratio_decode_each_vs_once": round(medians["boxes_one_decode_each"] / medians["boxes_one_decode"], 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }))


def embed_step_line(args: argparse.Namespace, photos: list[bytes], prep: Preprocessing) -> None:
    """The embed task's load of ``--batch`` photo files: full decode (before) vs draft (after)."""
    import tempfile

    from infra.decoded_photos import clear_decoded_photos
    from infra.images import decode_need
    from infra.night_items import NightItem
    from tasks.embed import _load_all

    with tempfile.TemporaryDirectory() as folder:
        items = []
        for i in range(args.batch):
            path = Path(folder) / f"photo-{i}.jpg"
            path.write_bytes(photos[i % len(photos)])  # one file each: one decode each
            items.append(NightItem(str(path)))
        needs = {"before_full": None, "after_draft": decode_need(prep.size)}
        timings: dict[str, list[float]] = {name: [] for name in needs}
        scales: dict[str, int] = {}
        for _ in range(max(1, args.repeats // 3)):
            for name, need in needs.items():
                clear_decoded_photos()  # each repeat decodes: no photo left from the last one
                start = time.perf_counter()
                loaded, chips, _, errors = _load_all(items, need, 1, None, "bench")
                prep.batch([chip.image for chip in chips.values()])
                timings[name].append(time.perf_counter() - start)
                assert not errors, errors
                scales[name] = next(iter(chips.values())).decode_scale
        clear_decoded_photos()
    medians = {name: statistics.median(values) / len(items) for name, values in timings.items()}
    print(json.dumps({
        "bench": "decode", "mode": "embed_step", "original_size": [args.width, args.height], "photos": len(items),
        "model_input": args.size, **{f"decode_scale_{name}": scale for name, scale in scales.items()},
        **{f"ms_per_photo_{name}": round(1000 * value, 1) for name, value in medians.items()},
        "speedup": round(medians["before_full"] / medians["after_draft"], 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
