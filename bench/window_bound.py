"""How much could cutting each pixel pass to its seed cell's receptive field save, at most?

A pixel pass seeds one cell per image at the layer; its relevance is non-zero only inside that
cell's receptive field, layer by layer. This script explains one pair and, for every z+
convolution the pixel passes run through, measures the rule's time (timers, not the profiler:
``torch.profiler`` doubled this workload's wall time and inflated single operators up to 25x) and
the share of the convolution's output that carries relevance (each image's bounding box of
non-zero cells). A windowed computation with no overhead at all would cost that share of each
call, which gives a lower bound on the explanation's time:

    python bench/window_bound.py                    # MiewID architecture, 440 px, backbone.blocks.3, k_colors 10
    python bench/window_bound.py --size 224 --k-colors 5

Prints one JSON line. Random weights and random inputs; the fields depend on geometry mostly.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pairx_core import engine as engine_module  # noqa: E402
from pairx_core import lrp  # noqa: E402
from pairx_core.engine import explain  # noqa: E402
from pairx_core.models import load_model  # noqa: E402
from pairx_core.runtime_settings import keep_freed_memory  # noqa: E402


def relevance_box_share(relevance: torch.Tensor) -> float:
    """Mean over images of the share of ``(B, C, H, W)``'s cells inside the box of non-zero relevance."""
    batch, _, height, width = relevance.shape
    return lrp.relevance_boxes(relevance).area() / (batch * height * width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="miewid-arch")
    parser.add_argument("--size", type=int, default=440)
    parser.add_argument("--layer", default="backbone.blocks.3")
    parser.add_argument("--k-colors", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    spec = args.model if "size=" in args.model or args.size == 440 else f"{args.model}?size={args.size}"
    model, _ = load_model(spec)
    inside_pixel_passes = [False]
    calls: list[tuple[str, float, float]] = []  # (convolution, seconds, share)
    rule_relevance = lrp._RuleState.relevance
    pixel_maps = engine_module._pixel_maps

    def timed_rule(state, x, relevance):
        started = time.perf_counter()
        result = rule_relevance(state, x, relevance)
        seconds = time.perf_counter() - started
        if inside_pixel_passes[0] and relevance.ndim == 4:
            weight = tuple(state.module.weight.shape)
            calls.append((f"{weight} at {relevance.shape[-1]} px", seconds, relevance_box_share(relevance)))
        return result

    def marked_pixel_maps(*a, **k):
        inside_pixel_passes[0] = True
        try:
            return pixel_maps(*a, **k)
        finally:
            inside_pixel_passes[0] = False

    images = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    explain(model, images[:1], images[1:], [args.layer], k_colors=args.k_colors)  # warm-up
    lrp._RuleState.relevance, engine_module._pixel_maps = timed_rule, marked_pixel_maps
    try:
        started = time.perf_counter()
        explain(model, images[:1], images[1:], [args.layer], k_colors=args.k_colors)
        total = time.perf_counter() - started
    finally:
        lrp._RuleState.relevance, engine_module._pixel_maps = rule_relevance, pixel_maps
    rule_seconds = sum(seconds for _, seconds, _ in calls)
    saved = sum(seconds * (1 - share) for _, seconds, share in calls)
    by_convolution = collections.defaultdict(lambda: [0.0, 0.0])
    for name, seconds, share in calls:
        by_convolution[name][0] += seconds
        by_convolution[name][1] += seconds * share
    heaviest = sorted(by_convolution.items(), key=lambda item: -item[1][0])[:6]
    print(json.dumps({
        "bench": "window_bound", "model": spec, "layer": args.layer, "k_colors": args.k_colors,
        "explain_s": round(total, 3), "pixel_pass_rules_s": round(rule_seconds, 3),
        "time_weighted_share": round((rule_seconds - saved) / rule_seconds, 3) if rule_seconds else None,
        "bound_s": round(total - saved, 3), "bound_ratio": round((total - saved) / total, 3),
        "heaviest": {name: {"s": round(s, 3), "share": round(ws / s, 3)} for name, (s, ws) in heaviest},
    }))


if __name__ == "__main__":
    main()
