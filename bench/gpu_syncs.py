"""Which Python lines make the engine wait for the GPU (host-device synchronisations).

    python bench/gpu_syncs.py [--model miewid-arch] [--size 440] [--images 4] [--k-colors 2]

Runs one engine batch under ``torch.cuda.set_sync_debug_mode("warn")`` and prints each distinct
call stack (project frames only) that synchronised, with its count. CUDA only.
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pairx_core.config import ExplainConfig  # noqa: E402
from pairx_core.engine import explain_indexed  # noqa: E402
from pairx_core.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="miewid-arch")
    parser.add_argument("--layer", default="backbone.blocks.3")
    parser.add_argument("--size", type=int, default=440)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--k-colors", type=int, default=2)
    args = parser.parse_args()
    model, _ = load_model(args.model)
    model = model.to("cuda").eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    pairs = [(i, i + 1) for i in range(0, args.images, 2)]
    config = ExplainConfig(k_colors=args.k_colors, batch_size=len(pairs), memory_budget=100 * 2**30)
    explain_indexed(model, images, pairs, args.layer, config, device="cuda")  # warm-up
    torch.cuda.synchronize()
    stacks: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if str(ROOT) in f.filename and "bench/" not in f.filename]
        stacks[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-4:]))] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    explain_indexed(model, images, pairs, args.layer, config, device="cuda")
    torch.cuda.set_sync_debug_mode("default")
    print(f"synchronisations: {sum(stacks.values())} from {len(stacks)} call stacks "
          f"({args.images} images, k_colors {args.k_colors})")
    for stack, count in stacks.most_common(40):
        print(f"{count:6d}  {stack}")


if __name__ == "__main__":
    main()
