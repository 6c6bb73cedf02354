"""Image preprocessing: PIL image -> normalised tensor, as the re-ID model expects it.

Pure compute: decoding, cropping and validation of files live in ``infra.images``; this module
only turns an already decoded RGB ``PIL.Image`` into a tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images are resized and normalised before the model sees them.

    Attributes:
        size: ``(H, W)`` of the model input. Images are resized to exactly this size (no aspect
            preservation), bilinear, as MiewID's published pipeline does.
        mean, std: per-channel normalisation of ``[0, 1]`` RGB values.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 8:
            raise ConfigError(f"Preprocessing.size must be (H, W) with both >= 8, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("Preprocessing.mean/std must be 3 values, std > 0")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """Resize and normalise one RGB image. Returns ``(3, H, W)`` float32."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = self.size
        resized = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess several images. Returns ``(B, 3, H, W)`` float32."""
        return torch.stack([self.to_tensor(image) for image in images])

    def to_display(self, tensor: torch.Tensor) -> np.ndarray:
        """Undo the normalisation of ``(3, H, W)``; returns ``(H, W, 3)`` uint8 for pictures."""
        array = tensor.detach().to("cpu", torch.float64).numpy().transpose(1, 2, 0)
        array = array * np.asarray(self.std) + np.asarray(self.mean)
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def fingerprint(self) -> str:
        """A short stable hash of these settings (part of cache and output keys)."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]
