"""Train the small demo re-ID model (``load_model("demo")``) on synthetic individuals.

Usage::

    python -m infra.train_demo_model --out pairx_core/weights [--minutes 10] [--steps 2800] [--seed 0]

What it does, on one CPU thread:

1. renders a fixed pool of training photos of synthetic individuals
   (:mod:`pairx_core.synthetic`: random pose, clutter, occluders, lighting, night frames);
2. trains :class:`pairx_core.models.MiewIdNet` (timm ``mnasnet_small``, an EfficientNet-family
   model, + GeM + BatchNorm1d neck; 96 px) from random initialisation with a CosFace margin
   softmax over the training identities (the class weights are a training head and are not
   saved), SGD, 8 identities x 4 photos per batch, channels-last (about 2x faster on CPU);
3. evaluates top-1 re-ID accuracy on *held-out* identities (other individual seed, other photo
   seeds) for the trained model and for a randomly initialised copy of the same architecture;
4. checks that PAIR-X runs on the trained model and gives finite relevance;
5. writes ``demo.safetensors`` (float32 state dict), ``demo.json`` (config + training facts).

Training length is a fixed number of steps (bit-identical weights given ``--seed`` on the same
machine and library versions). ``--minutes`` is a safety cap on rendering + training: when the
measured pace says the remaining steps would overrun it, the run is shortened and the cosine
schedule anneals sooner (``training.stopped_by`` in the JSON then reads ``"time"``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pairx_core.retrieval import top_k
from pairx_core.models import MiewIdNet, save_checkpoint
from pairx_core.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from pairx_core.synthetic import make_individuals, render_photo

ARCH = "mnasnet_small"
SIZE = 96
LAYER = "backbone.blocks.2"  # stride 8: a 12 x 12 feature map at 96 px
#: individual seed of the held-out evaluation identities; training uses ``TRAIN_SEED_BASE + seed``
EVAL_SEED = 424_242
TRAIN_SEED_BASE = 1_000
EVAL_DIFFICULTY = 0.5  # render_photo's default
EASIER_EVAL_DIFFICULTY = 0.3  # also reported: smaller rotations, occluders, lighting change


@dataclass
class TrainConfig:
    arch: str = ARCH
    size: int = SIZE
    seed: int = 0
    identities: int = 300
    photos_per_identity: int = 20
    difficulty_range: tuple[float, float] = (0.1, 0.7)
    ids_per_batch: int = 8
    photos_per_id_in_batch: int = 4
    steps: int = 2800
    minutes: float = 10.0
    lr: float = 0.1
    weight_decay: float = 5e-5
    warmup: float = 0.04
    clip_grad_norm: float = 5.0
    cosface_scale: float = 16.0
    cosface_margin: float = 0.15
    triplet_margin: float = 0.3
    augment: bool = True
    optimizer: str = "sgd"  # SGD (momentum 0.9, Nesterov) or "adamw"
    loss: str = "cosface"  # "cosface", "triplet" or "cosface+triplet"
    eval_identities: int = 50
    eval_queries: int = 2

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch * self.photos_per_id_in_batch


# ------------------------------------------------------------------------------------ data
def _photo_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _to_uint8(images) -> torch.Tensor:
    """PIL RGB images already at the model size -> ``(N, 3, H, W)`` uint8."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).contiguous()


def _normalise(batch_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """Same arithmetic as :meth:`Preprocessing.to_tensor` for images already at the model size."""
    x = batch_u8.to(torch.float32) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def render_training_pool(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All training photos ``(N, 3, S, S)`` uint8 and their identity labels ``(N,)``.

    Pre-rendered once (about 5 ms a photo), which is cheaper than rendering for every step.
    """
    individual_seed = TRAIN_SEED_BASE + config.seed
    if individual_seed == EVAL_SEED:
        raise ValueError("training and evaluation individuals must differ")
    rng = np.random.default_rng([config.seed, 0xD1F])
    lo, hi = config.difficulty_range
    images, labels = [], []
    for i, individual in enumerate(make_individuals(config.identities, individual_seed)):
        for j in range(config.photos_per_identity):
            photo = render_photo(
                individual, _photo_seed(individual_seed, i, j, 0x7A), (config.size, config.size),
                difficulty=float(rng.uniform(lo, hi)),
            )
            images.append(photo.image)
            labels.append(i)
    return _to_uint8(images), torch.tensor(labels, dtype=torch.long)


def evaluation_photos(n_identities: int, queries: int, size: tuple[int, int], seed: int = EVAL_SEED,
                      difficulty: float = EVAL_DIFFICULTY):
    """Held-out photos: per identity one gallery photo and ``queries`` query photos.

    Returns ``(gallery images, query images, query labels)``; gallery ``i`` is identity ``i``.
    """
    gallery, query, labels = [], [], []
    for i, individual in enumerate(make_individuals(n_identities, seed)):
        for j in range(1 + queries):
            photo = render_photo(individual, _photo_seed(seed, i, j, 0xE7), size, difficulty=difficulty)
            if j == 0:
                gallery.append(photo.image)
            else:
                query.append(photo.image)
                labels.append(i)
    return gallery, query, np.asarray(labels)


@torch.no_grad()
def top1_accuracy(model: nn.Module, preprocessing: Preprocessing, gallery, query, labels) -> float:
    """Top-1 re-ID accuracy: each query's nearest gallery photo by cosine similarity."""
    was_training = model.training
    model.eval()
    try:
        g = model(preprocessing.batch(gallery)).numpy()
        q = model(preprocessing.batch(query)).numpy()
    finally:
        model.train(was_training)
    predicted = top_k(q, g, 1)[0][:, 0]
    return float((predicted == labels).mean())


def random_model(arch: str, seed: int = 0) -> MiewIdNet:
    """The same architecture with random initialisation (the baseline), eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiewIdNet(arch)
    return model.eval()


def evaluate(model: nn.Module, preprocessing: Preprocessing, arch: str, n_identities: int = 50,
             queries: int = 2, seed: int = EVAL_SEED, difficulty: float = EVAL_DIFFICULTY) -> dict[str, float]:
    """Top-1 accuracy of ``model`` and of a random-init copy on held-out identities."""
    gallery, query, labels = evaluation_photos(n_identities, queries, preprocessing.size, seed, difficulty)
    return {
        "trained_top1": top1_accuracy(model, preprocessing, gallery, query, labels),
        "random_top1": top1_accuracy(random_model(arch), preprocessing, gallery, query, labels),
        "chance_top1": 1.0 / n_identities,
    }


# --------------------------------------------------------------------------------- training
class CosFaceHead(nn.Module):
    """Large-margin cosine softmax: ``s * (cos(theta_y) - m)`` for the true class."""

    def __init__(self, dim: int, classes: int, scale: float, margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale = scale
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T
        logits = self.scale * (cosine - self.margin * F.one_hot(labels, cosine.shape[1]))
        return F.cross_entropy(logits, labels)


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss on cosine distance: hardest positive vs hardest negative per anchor."""
    z = F.normalize(embeddings, dim=1)
    distance = 1.0 - z @ z.T
    same = labels[:, None] == labels[None, :]
    hardest_positive = distance.masked_fill(~same, -1.0).max(dim=1).values
    hardest_negative = distance.masked_fill(same, 3.0).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def _pk_batches(labels: torch.Tensor, config: TrainConfig, generator: torch.Generator):
    """Endless PK batches: ``ids_per_batch`` identities x ``photos_per_id_in_batch`` photos."""
    n_ids = int(labels.max()) + 1
    by_id = [torch.nonzero(labels == i).flatten() for i in range(n_ids)]
    while True:
        order = torch.randperm(n_ids, generator=generator)
        for start in range(0, n_ids - config.ids_per_batch + 1, config.ids_per_batch):
            picks = []
            for identity in order[start:start + config.ids_per_batch].tolist():
                pool = by_id[identity]
                picks.append(pool[torch.randperm(len(pool), generator=generator)[: config.photos_per_id_in_batch]])
            yield torch.cat(picks)


def _augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 8) -> torch.Tensor:
    """Cheap extra variety on top of the rendered poses: a random shift (edge padding), per-image
    brightness/contrast jitter and, sometimes, grey (night-like) images."""
    n, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])
    gain = torch.empty(n, 1, 1, 1).uniform_(0.75, 1.25, generator=generator)
    bias = torch.empty(n, 1, 1, 1).uniform_(-0.3, 0.3, generator=generator)
    x = x * gain + bias
    grey = torch.rand(n, generator=generator) < 0.1
    if grey.any():
        x[grey] = x[grey].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return x


def train(config: TrainConfig, log=print) -> tuple[MiewIdNet, dict]:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    budget = config.minutes * 60.0

    images, labels = render_training_pool(config)
    render_seconds = time.perf_counter() - started
    log(f"rendered {len(images)} photos of {config.identities} identities in {render_seconds:.1f}s")

    model = MiewIdNet(config.arch).to(memory_format=torch.channels_last)  # ~2x faster on CPU
    head = CosFaceHead(model.backbone.num_features, config.identities, config.cosface_scale, config.cosface_margin)
    # guards against divergence (one unguarded run went NaN near step 950 at lr 0.08): gradient
    # clipping, and the GeM exponent at a tenth of the learning rate, kept in [1, 8] (p -> 0
    # makes x ** (1 / p) overflow)
    gem = [model.pooling.p]
    rest = [q for name, q in model.named_parameters() if name != "pooling.p"]
    parameters = [{"params": rest, "lr_scale": 1.0}, {"params": list(head.parameters()), "lr_scale": 1.0},
                  {"params": gem, "lr_scale": 0.1, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _pk_batches(labels, config, generator)
    model.train()
    step, total, stopped_by, losses = 0, config.steps, "steps", []
    train_started = time.perf_counter()
    while step < total:
        if step >= 50 and step % 10 == 0:
            # the schedule is step-based (deterministic); only if the measured pace says the
            # remaining steps would overrun --minutes is the run shortened (and annealed sooner)
            now = time.perf_counter()
            fits = step + int((started + budget - now) / ((now - train_started) / step))
            if fits < total:
                total, stopped_by = max(fits, step + 1), "time"
        progress = step / total
        if progress < config.warmup:
            lr = config.lr * (0.1 + 0.9 * progress / config.warmup)
        else:
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * (progress - config.warmup) / (1 - config.warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        index = next(batches)
        x = _normalise(images[index], IMAGENET_MEAN, IMAGENET_STD)
        if config.augment:
            x = _augment(x, generator)
        embeddings = model(x.contiguous(memory_format=torch.channels_last))
        loss = torch.zeros(())
        if "cosface" in config.loss:
            loss = loss + head(embeddings, labels[index])
        if "triplet" in config.loss:
            loss = loss + batch_hard_triplet(embeddings, labels[index], config.triplet_margin)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step} (loss {float(loss)})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for group in parameters for q in group["params"]], config.clip_grad_norm)
        optimizer.step()
        with torch.no_grad():
            model.pooling.p.clamp_(1.0, 8.0)
        losses.append(float(loss.detach()))
        step += 1
        if step % 25 == 0:
            log(f"step {step:4d}  lr {lr:.2e}  loss {np.mean(losses[-25:]):.3f}  "
                f"{time.perf_counter() - started:.0f}s")
    model = model.to(memory_format=torch.contiguous_format).eval()
    facts = {
        "seed": config.seed,
        "individual_seed": TRAIN_SEED_BASE + config.seed,
        "identities": config.identities,
        "photos_per_identity": config.photos_per_identity,
        "photos": int(len(images)),
        "difficulty_range": list(config.difficulty_range),
        "loss": config.loss + f" (CosFace s={config.cosface_scale}, m={config.cosface_margin})",
        "optimizer": f"{config.optimizer} lr={config.lr} wd={config.weight_decay}, linear warmup + cosine, "
                     f"grad-norm clip {config.clip_grad_norm}, GeM p at lr/10 clamped to [1, 8]",
        "augmentation": "random shift <= 8 px, brightness/contrast jitter, 10% grey" if config.augment else "none",
        "batch": f"{config.ids_per_batch} identities x {config.photos_per_id_in_batch} photos",
        "steps": step,
        "epochs": round(step * config.batch_size / len(images), 2),
        "stopped_by": stopped_by,
        "final_loss": round(float(np.mean(losses[-25:])), 4) if losses else None,
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(time.perf_counter() - train_started, 1),
        "threads": torch.get_num_threads(),
    }
    return model, facts


def check_pairx(model: nn.Module, preprocessing: Preprocessing, layer: str = LAYER) -> dict:
    """Run PAIR-X on two held-out photos of one individual; raise unless relevance is finite."""
    from pairx_core import explain
    from pairx_core.canonizers import select_canonizers

    select_canonizers(model)
    individual = make_individuals(1, EVAL_SEED + 1)[0]
    photos = [render_photo(individual, s, preprocessing.size, difficulty=EVAL_DIFFICULTY).image for s in (1, 2)]
    x = preprocessing.batch(photos)
    started = time.perf_counter()
    result = explain(model, x[:1], x[1:], layers=[layer], k_colors=3)[0]
    seconds = time.perf_counter() - started
    explanation = result.layers[layer]
    arrays = [explanation.relevance_0, explanation.relevance_1,
              explanation.pixel_relevance_0, explanation.pixel_relevance_1]
    if not all(np.isfinite(np.asarray(a)).all() for a in arrays):
        raise RuntimeError(f"PAIR-X gave non-finite relevance at {layer}")
    return {
        "layer": layer,
        "feature_shape": list(explanation.feature_shape),
        "matches": explanation.n_matches,
        "similarity": round(float(result.similarity), 4),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = parser.parse_args(argv)

    config = TrainConfig(arch=args.arch, size=args.size, seed=args.seed, steps=args.steps, minutes=args.minutes,
                         identities=args.identities, photos_per_identity=args.photos_per_identity)
    total_started = time.perf_counter()
    model, facts = train(config)
    preprocessing = Preprocessing((config.size, config.size), IMAGENET_MEAN, IMAGENET_STD)

    eval_started = time.perf_counter()
    accuracy = evaluate(model, preprocessing, config.arch, config.eval_identities, config.eval_queries)
    easier = evaluate(model, preprocessing, config.arch, config.eval_identities, config.eval_queries,
                      difficulty=EASIER_EVAL_DIFFICULTY)
    eval_seconds = time.perf_counter() - eval_started
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
        "arch": config.arch,
        "size": [config.size, config.size],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "embedding_dim": int(model.backbone.num_features),
        "layer": pairx["layer"],
        "layer_feature_shape": pairx["feature_shape"],
        "training": facts,
        "evaluation": {
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
            "seconds": round(eval_seconds, 1),
        },
        "pairx_check": pairx,
        "total_seconds": round(time.perf_counter() - total_started, 1),
        "weights_bytes": weights_path.stat().st_size,
        "environment": {
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "python": platform.python_version(),
            "machine": "2-core CPU, 1 training thread",
        },
    }
    (args.out / "demo.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {weights_path} ({document['weights_bytes'] / 1e6:.1f} MB) and {args.out / 'demo.json'}; "
          f"total {document['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
