"""The demo model's architecture, sizes, seeds and training settings."""

from __future__ import annotations

from dataclasses import dataclass

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
