#!/usr/bin/env python3
"""Worker process of ``bench/engine.py --compare-ref REV``: another commit's engine, on request.

Started by the benchmark with ``--core DIR`` (a folder holding that commit's ``pairx_core``, put
first on ``sys.path``), the model spec, the thread count and a ``.pt`` file with the inputs
``x0, x1``. It then reads one JSON request per line on stdin and answers one JSON line on
stdout::

    {"layers": [...], "k_colors": 10, "batch_size": 4, "n_pairs": 4, "k_lines": 20,
     "memory_format": "auto", "save": "/tmp/x.npz" or null}
    -> {"seconds": 41.2, "pixel_backwards": 10, "batches": 1}

``save`` writes the pixel maps and relevances of the call (``np.savez``) so that the benchmark
can compare the numbers of both engines. An empty line or end of input ends the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
import time
import warnings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--core", required=True, help="folder that holds the other commit's pairx_core")
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True, help=".pt file with {'x0': ..., 'x1': ...}")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, args.core)
    reply = sys.stdout
    sys.stdout = sys.stderr  # only answers go to the real stdout

    import numpy as np
    import torch

    import pairx_core
    from pairx_core import EngineStats, explain
    from pairx_core.models import load_model

    if not pairx_core.__file__.startswith(args.core):
        raise SystemExit(f"imported {pairx_core.__file__}, not the one under {args.core}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        with contextlib.suppress(ImportError):
            from pairx_core.runtime_settings import keep_freed_memory

            keep_freed_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_model(args.model)
    inputs = torch.load(args.inputs)
    model = model.to(device=device, dtype=inputs["x0"].dtype).eval()
    reply.write(json.dumps({"ready": True, "pairx_core": pairx_core.__file__}) + "\n")
    reply.flush()
    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        n = request["n_pairs"]
        stats = EngineStats()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu_start = time.process_time()
        start = time.perf_counter()
        results = explain(model, inputs["x0"][:n], inputs["x1"][:n], request["layers"],
                          k_lines=request["k_lines"], k_colors=request["k_colors"],
                          batch_size=request["batch_size"], device=device, stats=stats,
                          memory_format=request["memory_format"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        if request.get("save"):
            arrays = {}
            for p, result in enumerate(results):
                for name, layer in result.layers.items():
                    for key in ("relevance_0", "relevance_1", "pixel_relevance_0", "pixel_relevance_1"):
                        arrays[f"{p}|{name}|{key}"] = getattr(layer, key)
            np.savez(request["save"], **arrays)
        del results
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        import resource

        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        reply.write(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "max_rss_bytes": max_rss,
                                "pixel_backwards": stats.pixel_backwards,
                                "batches": stats.batches}) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
