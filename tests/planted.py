"""A stub encoder whose embeddings the test plants, for exact expected scores of the evaluation tasks.

An image is identified by the colour of its centre pixel after decoding (``color_id``: R*65536 + G*256 + B of
the 0..255 colour): tests paint images (and the regions that tasks crop) in solid colours. ``encode`` returns,
per row, ``image_fn(id)`` for image-only input, ``text_fn(text)`` for text-only input and ``pair_fn(id, text)``
for fused image+text input; each is a 1-D vector (normalised by the embedder).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image


def unit(name: str, dim: int = 32) -> torch.Tensor:
    """A fixed pseudo-random unit vector for ``name`` (unrelated names are nearly orthogonal)."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def color_id(rgb) -> int:
    r, g, b = (int(x) for x in rgb)
    return r * 65536 + g * 256 + b


def solid_image(path, rgb, size=(40, 32), fmt=None):
    """Write a solid-colour image file; returns the path."""
    Image.new("RGB", size, tuple(rgb)).save(path, format=fmt)
    return path


class PlantedModel(torch.nn.Module):
    """encode(images=, texts=) -> the planted vectors (see the module docstring); records every call."""

    def __init__(self, image_fn=None, text_fn=None, pair_fn=None, dim: int = 32):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.dim = dim
        self.image_fn = image_fn or (lambda i: unit(f"image:{i}", dim))
        self.text_fn = text_fn or (lambda t: unit(f"text:{t}", dim))
        self.pair_fn = pair_fn or (lambda i, t: self.image_fn(i) + self.text_fn(t))
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def ids_of(images) -> list[int]:
        out = []
        for px in images:
            h, w = px.shape[-2:]
            centre = (px[:, h // 2, w // 2].detach().cpu().numpy() * 255).round().astype(np.int64)
            out.append(color_id(centre))
        return out

    def encode(self, images=None, texts=None, *, image_mask=None, image_ids=None, normalize=True):
        ids = self.ids_of(images) if images is not None else None
        if ids is None:
            rows = [self.text_fn(t) for t in texts]
            kind = "text"
        elif texts is None:
            rows = [self.image_fn(i) for i in ids]
            kind = "image"
        else:
            rows = [self.pair_fn(i, t) for i, t in zip(ids, texts)]
            kind = "pair"
        self.calls.append((kind, len(rows)))
        return torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows])
