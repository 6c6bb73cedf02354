"""Train, evaluate and write the demo model: ``python -m pairx_core.demo_model --out pairx_core/weights``.

Steps: train (:mod:`.training`), evaluate top-1 on held-out identities for the trained model and
a random-init copy, check that PAIR-X gives finite relevance, then write ``demo.safetensors``
(float32 state dict) and ``demo.json`` (config, training facts, evaluation).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..models import save_checkpoint
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .config import ARCH, EASIER_EVAL_DIFFICULTY, EVAL_DIFFICULTY, EVAL_SEED, LAYER, SIZE, TrainConfig
from .evaluation import check_pairx, evaluate
from .training import train


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pairx_core.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pairx_core/weights"))
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes,
                        help="wall-time cap for rendering + training (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--identities", type=int, default=TrainConfig.identities)
    parser.add_argument("--photos-per-identity", type=int, default=TrainConfig.photos_per_identity)
    parser.add_argument("--layer", default=LAYER)
    return parser.parse_args(argv)


def _evaluation(config: TrainConfig, accuracy: dict, easier: dict, seconds: float) -> dict:
    return {
        "held_out_individual_seed": EVAL_SEED,
        "identities": config.eval_identities,
        "gallery_per_identity": 1,
        "queries_per_identity": config.eval_queries,
        "difficulty": EVAL_DIFFICULTY,
        "trained_top1": round(accuracy["trained_top1"], 4),
        "random_top1": round(accuracy["random_top1"], 4),
        "chance_top1": round(accuracy["chance_top1"], 4),
        f"difficulty_{EASIER_EVAL_DIFFICULTY}": {
            "trained_top1": round(easier["trained_top1"], 4),
            "random_top1": round(easier["random_top1"], 4),
        },
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    config = TrainConfig(arch=args.arch, size=args.size, seed=args.seed, steps=args.steps, minutes=args.minutes,
                         identities=args.identities, photos_per_identity=args.photos_per_identity)
    total_started = time.perf_counter()
    model, facts = train(config)
    preprocessing = Preprocessing((config.size, config.size), IMAGENET_MEAN, IMAGENET_STD)

    eval_started = time.perf_counter()
    accuracy = evaluate(model, preprocessing, config.arch, config.eval_identities, config.eval_queries)
    easier = evaluate(model, preprocessing, config.arch, config.eval_identities, config.eval_queries,
                      difficulty=EASIER_EVAL_DIFFICULTY)
    evaluation = _evaluation(config, accuracy, easier, time.perf_counter() - eval_started)
    for difficulty, figures in ((EVAL_DIFFICULTY, accuracy), (EASIER_EVAL_DIFFICULTY, easier)):
        print(f"held-out top-1 ({config.eval_identities} identities, {config.eval_identities * config.eval_queries} "
              f"queries, difficulty {difficulty}): trained {figures['trained_top1']:.3f}  "
              f"random init {figures['random_top1']:.3f}  chance {figures['chance_top1']:.3f}")
    pairx = check_pairx(model, preprocessing, args.layer)
    print(f"PAIR-X at {pairx['layer']}: feature map {pairx['feature_shape']}, finite relevance, {pairx['seconds']}s")

    args.out.mkdir(parents=True, exist_ok=True)
    weights_path = args.out / "demo.safetensors"
    save_checkpoint(model.float(), weights_path)
    weights_path.chmod(0o644)  # safetensors writes 0600; the file ships with the package
    document = {
        "arch": config.arch, "size": [config.size, config.size], "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD), "embedding_dim": int(model.backbone.num_features), "layer": pairx["layer"],
        "layer_feature_shape": pairx["feature_shape"], "training": facts, "evaluation": evaluation,
        "pairx_check": pairx, "total_seconds": round(time.perf_counter() - total_started, 1),
        "weights_bytes": weights_path.stat().st_size,
        "environment": {"torch": torch.__version__, "timm": __import__("timm").__version__,
                        "python": platform.python_version(), "machine": "2-core CPU, 1 training thread"},
    }
    (args.out / "demo.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {weights_path} ({document['weights_bytes'] / 1e6:.1f} MB) and {args.out / 'demo.json'}; "
          f"total {document['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
