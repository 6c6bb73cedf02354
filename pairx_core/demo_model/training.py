"""Training of the demo model on synthetic individuals (run it with ``python -m pairx_core.demo_model``).

What it does, on one CPU thread:

1. renders a fixed pool of training photos of synthetic individuals
   (:mod:`pairx_core.synthetic`: random pose, clutter, occluders, lighting, night frames);
2. trains :class:`pairx_core.models.MiewIdNet` (timm ``mnasnet_small``, an EfficientNet-family
   model, + GeM + BatchNorm1d neck; 96 px) from random initialisation with a CosFace margin
   softmax over the training identities (the class weights are a training head and are not
   saved), SGD, 8 identities x 4 photos per batch, channels-last (about 2x faster on CPU).

Training length is a fixed number of steps (bit-identical weights given the seed on the same
machine and library versions). ``minutes`` is a safety cap on rendering + training: when the
measured pace says the remaining steps would overrun it, the run is shortened and the cosine
schedule anneals sooner (``stopped_by`` in the facts then reads ``"time"``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import MiewIdNet
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..synthetic import make_individuals, render_photo
from .config import EVAL_SEED, TRAIN_SEED_BASE, TrainConfig
from .evaluation import photo_seed


def _to_uint8(images) -> torch.Tensor:
    """PIL RGB images already at the model size -> ``(N, 3, H, W)`` uint8."""
    stacked = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


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
                individual, photo_seed(individual_seed, i, j, 0x7A), (config.size, config.size),
                difficulty=float(rng.uniform(lo, hi)),
            )
            images.append(photo.image)
            labels.append(i)
    return _to_uint8(images), torch.tensor(labels, dtype=torch.long)


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
    """Render the pool and train; returns the model (eval mode) and the facts for ``demo.json``."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    images, labels = render_training_pool(config)
    render_seconds = time.perf_counter() - started
    log(f"rendered {len(images)} photos of {config.identities} identities in {render_seconds:.1f}s")

    model = MiewIdNet(config.arch).to(memory_format=torch.channels_last)  # ~2x faster on CPU
    head = CosFaceHead(model.backbone.num_features, config.identities, config.cosface_scale, config.cosface_margin)
    optimizer, parameters = _optimizer(model, head, config)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _pk_batches(labels, config, generator)
    model.train()
    step, total, stopped_by, losses = 0, config.steps, "steps", []
    train_started = time.perf_counter()
    while step < total:
        if step >= 50 and step % 10 == 0:
            total, stopped_by = _fitting_steps(step, total, stopped_by, started + config.minutes * 60.0,
                                               train_started)
        lr = _learning_rate(step / total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        index = next(batches)
        losses.append(_step(model, head, optimizer, parameters, images[index], labels[index], generator, config,
                            step))
        step += 1
        if step % 25 == 0:
            log(f"step {step:4d}  lr {lr:.2e}  loss {np.mean(losses[-25:]):.3f}  "
                f"{time.perf_counter() - started:.0f}s")
    model = model.to(memory_format=torch.contiguous_format).eval()
    seconds = {"render_seconds": round(render_seconds, 1),
               "train_seconds": round(time.perf_counter() - train_started, 1)}
    return model, _facts(config, step, len(images), stopped_by, losses, seconds)


def _optimizer(model: MiewIdNet, head: nn.Module, config: TrainConfig):
    """``(optimizer, parameter groups)``.

    Guards against divergence (one unguarded run went NaN near step 950 at lr 0.08): gradient
    clipping (in :func:`_step`), and the GeM exponent at a tenth of the learning rate, kept in
    [1, 8] (p -> 0 makes x ** (1 / p) overflow).
    """
    gem = [model.pooling.p]
    rest = [q for name, q in model.named_parameters() if name != "pooling.p"]
    parameters = [{"params": rest, "lr_scale": 1.0}, {"params": list(head.parameters()), "lr_scale": 1.0},
                  {"params": gem, "lr_scale": 0.1, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, parameters


def _fitting_steps(step: int, total: int, stopped_by: str, deadline: float, train_started: float
                   ) -> tuple[int, str]:
    """The schedule is step-based (deterministic); only if the measured pace says the remaining
    steps would overrun the deadline is the run shortened (and annealed sooner)."""
    now = time.perf_counter()
    fits = step + int((deadline - now) / ((now - train_started) / step))
    if fits < total:
        return max(fits, step + 1), "time"
    return total, stopped_by


def _learning_rate(progress: float, config: TrainConfig) -> float:
    """Linear warm-up from a tenth of ``lr``, then cosine annealing to zero."""
    if progress < config.warmup:
        return config.lr * (0.1 + 0.9 * progress / config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * (progress - config.warmup) / (1 - config.warmup)))


def _step(model: MiewIdNet, head: nn.Module, optimizer, parameters, batch_u8: torch.Tensor, labels: torch.Tensor,
          generator: torch.Generator, config: TrainConfig, step: int) -> float:
    """One optimisation step on a batch; returns its loss."""
    x = _normalise(batch_u8, IMAGENET_MEAN, IMAGENET_STD)
    if config.augment:
        x = _augment(x, generator)
    embeddings = model(x.contiguous(memory_format=torch.channels_last))
    loss = torch.zeros(())
    if "cosface" in config.loss:
        loss = loss + head(embeddings, labels)
    if "triplet" in config.loss:
        loss = loss + batch_hard_triplet(embeddings, labels, config.triplet_margin)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training diverged at step {step} (loss {float(loss)})")
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for group in parameters for q in group["params"]], config.clip_grad_norm)
    optimizer.step()
    with torch.no_grad():
        model.pooling.p.clamp_(1.0, 8.0)
    return float(loss.detach())


def _facts(config: TrainConfig, step: int, photos: int, stopped_by: str, losses: list[float],
           seconds: dict[str, float]) -> dict:
    """The ``training`` block of ``demo.json``."""
    return {
        "seed": config.seed,
        "individual_seed": TRAIN_SEED_BASE + config.seed,
        "identities": config.identities,
        "photos_per_identity": config.photos_per_identity,
        "photos": int(photos),
        "difficulty_range": list(config.difficulty_range),
        "loss": config.loss + f" (CosFace s={config.cosface_scale}, m={config.cosface_margin})",
        "optimizer": f"{config.optimizer} lr={config.lr} wd={config.weight_decay}, linear warmup + cosine, "
                     f"grad-norm clip {config.clip_grad_norm}, GeM p at lr/10 clamped to [1, 8]",
        "augmentation": "random shift <= 8 px, brightness/contrast jitter, 10% grey" if config.augment else "none",
        "batch": f"{config.ids_per_batch} identities x {config.photos_per_id_in_batch} photos",
        "steps": step,
        "epochs": round(step * config.batch_size / photos, 2),
        "stopped_by": stopped_by,
        "final_loss": round(float(np.mean(losses[-25:])), 4) if losses else None,
        **seconds,
        "threads": torch.get_num_threads(),
    }
