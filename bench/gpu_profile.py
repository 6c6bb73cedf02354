"""Where one engine batch spends its time on a GPU: torch.profiler, top operators.

    python bench/gpu_profile.py [--device cuda] [--model miewid-arch] [--size 440] [--images 24]

Prints, for k_colors 10 and 0, the wall time of one batch (after warm-up) and the operators
taking the most device time and the most host time, for the default settings and for
TF32 + cudnn.benchmark + channels-last. Random weights and inputs; reaches no network.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pairx_core.config import ExplainConfig  # noqa: E402
from pairx_core.engine import explain_indexed  # noqa: E402
from pairx_core.models import load_model  # noqa: E402


def one_setting(model, images, pairs, layer, k_colors, device, fast: bool, top: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = fast
    memory_format = "channels_last" if fast else "auto"
    config = ExplainConfig(k_colors=k_colors, batch_size=len(pairs), memory_budget=200 * 2**30,
                           memory_format=memory_format)

    def call():
        out = explain_indexed(model, images, pairs, layer, config, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    call()  # warm-up (cudnn benchmark, allocator)
    call()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        call()
    averages = prof.key_averages()
    device_key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"

    def rows(key):
        ranked = sorted(averages, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:top]
        return [(e.key[:60], e.count, round((getattr(e, key, 0) or 0) / 1e3, 1)) for e in ranked]

    total_device = sum((getattr(e, device_key, 0) or 0) for e in averages) / 1e3
    return {"k_colors": k_colors, "fast": fast, "images": int(images.shape[0]), "pairs": len(pairs),
            "batch_wall_s": round(seconds, 3), "pairs_per_s": round(len(pairs) / seconds, 2),
            "device_ms_total": round(total_device, 1),
            "top_device_ms": rows(device_key), "top_host_ms": rows("self_cpu_time_total")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="miewid-arch")
    parser.add_argument("--layer", default="backbone.blocks.3")
    parser.add_argument("--size", type=int, default=440)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--k-colors", default="10,0")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model = model.to(args.device).eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    pairs = [(i, i + 1) for i in range(0, args.images, 2)]
    for k in (int(v) for v in args.k_colors.split(",")):
        for fast in (False, True):
            record = one_setting(model, images, pairs, args.layer, k, args.device, fast, args.top)
            print(json.dumps({"bench": "gpu_profile", "model": args.model, **{k2: v for k2, v in record.items()
                                                                              if not k2.startswith("top")}}))
            for title in ("top_device_ms", "top_host_ms"):
                print(f"  {title} (k={k}, fast={fast}):")
                for name, count, ms in record[title]:
                    print(f"    {ms:10.1f} ms  {count:6d}x  {name}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
