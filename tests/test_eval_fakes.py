"""Fake models for the evaluation tests (imported by the other tests/test_eval_*.py files).

``HashModel.encode`` returns a deterministic unit vector per input (a hash of the pixels and/or text) and
counts how often it saw each input, so tests can check that every unique input is embedded exactly once.
``ConceptModel`` puts images and texts that name the same class near one direction, so zero-shot tasks
have a known answer.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import torch

from fuselip_med.data.hashing import content_hash


def _unit(seed_text: str, dim: int) -> torch.Tensor:
    seed = int(hashlib.sha256(seed_text.encode()).hexdigest()[:15], 16)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _pixels_key(px: torch.Tensor) -> str:
    return content_hash(px.detach().to(torch.float32))


class HashModel(torch.nn.Module):
    """encode(images, texts, image_mask) -> hash-derived unit vectors; records every row it embeds."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.seen: Counter = Counter()
        self.calls: list[tuple[str, int]] = []

    def row_vector(self, pixel_key: str | None, text: str | None) -> torch.Tensor:
        return _unit(f"{pixel_key}|{text}", self.dim)

    def encode(self, images=None, texts=None, *, image_mask=None, image_ids=None, normalize=True):
        if image_ids is not None:
            pixel_keys = ["ids:" + ",".join(map(str, r.tolist())) for r in image_ids]
        elif images is not None:
            pixel_keys = [_pixels_key(p) for p in images]
        else:
            pixel_keys = None
        n = len(pixel_keys) if pixel_keys is not None else len(texts)
        if texts is not None and len(texts) != n:
            raise AssertionError("images and texts disagree on the batch size")
        kind = "text" if pixel_keys is None else ("pair" if texts is not None else "image")
        self.calls.append((kind, n))
        rows = []
        for i in range(n):
            pk = pixel_keys[i] if pixel_keys is not None else None
            tx = texts[i] if texts is not None else None
            self.seen[(pk, tx)] += 1
            rows.append(self.row_vector(pk, tx))
        return torch.stack(rows).to(self.anchor.device)


CLASSES = ("CT", "MRI", "X-ray", "ultrasound", "angiography", "PET")


def class_image(cls_index: int, variant: int, size: int = 8) -> torch.Tensor:
    """A (3, size, size) image whose first pixel encodes the class and the rest a variant."""
    g = torch.Generator().manual_seed(1000 * cls_index + variant)
    px = torch.rand(3, size, size, generator=g)
    px[0, 0, 0] = (cls_index + 1) / 10.0
    return px


class ConceptModel(HashModel):
    """Image i of class c and any text naming class c (a whole word) share the direction of c; every input
    adds a small hash-derived perturbation (``noise``)."""

    def __init__(self, dim: int = 32, noise: float = 0.3, classes=CLASSES):
        super().__init__(dim)
        self.noise = noise
        self.classes = classes
        self.directions = {c: _unit("class:" + c, dim) for c in classes}
        self._pixel_class: dict[str, int] = {}

    def encode(self, images=None, texts=None, **kw):
        if images is not None:
            for p in images:
                self._pixel_class[_pixels_key(p)] = int(round(float(p[0, 0, 0]) * 10)) - 1
        return super().encode(images=images, texts=texts, **kw)

    def row_vector(self, pixel_key, text):
        v = self.noise * _unit(f"{pixel_key}|{text}", self.dim)
        if pixel_key is not None:
            c = self._pixel_class.get(pixel_key, -1)
            if 0 <= c < len(self.classes):
                v = v + self.directions[self.classes[c]]
        if text:
            words = text.replace(".", " ").replace(":", " ").split()
            for c in self.classes:
                if c in words:
                    v = v + self.directions[c]
        return v / v.norm()


def test_hash_model_is_deterministic_and_counts_inputs():
    m = HashModel(dim=8)
    a = m.encode(texts=["x", "y"])
    b = m.encode(texts=["x"])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    assert m.seen[(None, "x")] == 2 and m.calls == [("text", 2), ("text", 1)]


def test_concept_model_aligns_class_images_and_texts():
    m = ConceptModel()
    img = m.encode(images=torch.stack([class_image(0, 1), class_image(1, 1)]))
    txt = m.encode(texts=["a CT image.", "a MRI image."])
    sims = img @ txt.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]
