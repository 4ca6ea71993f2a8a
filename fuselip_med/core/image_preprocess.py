"""PIL image -> (3, S, S) float tensor in [0, 1], the input the TiTok tokenizer expects.

Matches the reference ``fuse_clip_preprocess``: PIL bicubic squash to S x S (or a random resized crop
when training), RGB conversion *after* resizing, ToTensor scaling, and no mean/std normalisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB image -> float32 CHW tensor in [0, 1] (ToTensor semantics)."""
    array = np.array(image.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) drawn like RandomResizedCrop: 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


@dataclass
class ImagePreprocess:
    """Callable PIL -> tensor transform; ``train=True`` uses RandomResizedCrop(scale 0.9-1.0) as in training."""

    image_size: int = 256
    train: bool = False
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def resize(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The geometric part alone (squash or random resized crop), still a PIL image in its own mode."""
        size = (self.image_size, self.image_size)
        if self.train:
            left, top, crop_w, crop_h = random_resized_crop_box(
                image.width, image.height, self.scale, self.ratio, generator
            )
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return image.resize(size, Image.BICUBIC)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return pil_to_tensor(self.resize(image, generator))
