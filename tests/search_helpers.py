"""Fixtures shared by the search tests: a small folder of PNG + DICOM images with captions, in the layout the
folder adapter reads (``<image>.txt`` sidecars), and a planted encoder whose vectors follow image colour and
caption words, so that rankings are known in advance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fuselip_med.data.phi import PrivacyOptions
from fuselip_med.search.index import ModelId
from tests.test_images import write_ct as write_stored_ct

COLOURS = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220), "yellow": (220, 220, 20)}
DIM = 8


def write_png(path: Path, rgb: tuple[int, int, int], size: int = 32, seed: int | None = None) -> Path:
    """A square of colour ``rgb``; with ``seed``, a random dark block pattern on it (distinct image content)."""
    pixels = np.full((size, size, 3), rgb, dtype=np.uint8)
    if seed is not None:
        blocks = np.random.default_rng(seed).random((4, 4)) < 0.5
        pixels[np.kron(blocks, np.ones((size // 4, size // 4), dtype=bool))] //= 4
    Image.fromarray(pixels).save(path)
    return path


def write_ct(path: Path, hu: float = 40.0, size: int = 32, window=(400.0, 40.0)) -> Path:
    """A two-tone CT slice (air above, ``hu`` below; HU = stored - 1024) with a window, written with pydicom."""
    stored = np.full((size, size), hu + 1024, dtype=np.int16)
    stored[: size // 2] = -1000 + 1024
    return write_stored_ct(path, stored, window=window)


# make_folder holds ct.dcm; the tests that list it by path opt in to storing DICOM paths, as a user must
KEEP_PATHS = PrivacyOptions(keep_paths=True)


def make_folder(root: Path, patterned: bool = False) -> Path:
    """red/green/blue/yellow PNGs (solid, or ``patterned`` with distinct block patterns) and one CT DICOM,
    each with a caption sidecar."""
    root.mkdir(parents=True, exist_ok=True)
    for seed, (name, rgb) in enumerate(COLOURS.items()):
        write_png(root / f"{name}.png", rgb, seed=seed if patterned else None)
        (root / f"{name}.png.txt").write_text(f"a {name} square")
    write_ct(root / "ct.dcm")
    (root / "ct.dcm.txt").write_text("a grey ct slice")
    return root


class PlantedEncoder:
    """FuseLIP's ``encode`` surface with planted vectors: an image maps to its mean (r, g, b) and its
    grey-ness, a text to the colour words it names; image + text is their sum. All L2-normalised [B, 8]."""

    WORDS = {"red": 0, "green": 1, "blue": 2, "grey": 3}
    model_id = ModelId("planted", "planted-v1")

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = pixels.mean(dim=(2, 3))                               # [B, 3]
        grey = 1.0 - (mean.max(dim=1).values - mean.min(dim=1).values)  # 1 for grey, ~0.2 for saturated
        colour = torch.where(mean > 0.5, mean, torch.zeros_like(mean))
        out = torch.zeros(len(pixels), DIM)
        out[:, :3] = colour * (1 - grey[:, None])
        out[:, 3] = torch.where(grey > 0.9, 1.0, 0.0)
        return out

    def _text(self, texts) -> torch.Tensor:
        out = torch.zeros(len(texts), DIM)
        for row, text in enumerate(texts):
            for word, dim in self.WORDS.items():
                if word in (text or ""):
                    out[row, dim] = 1.0
            out[row, 7] += 0.01  # never the zero vector
        return out

    def encode(self, images=None, texts=None, image_ids=None):
        parts = []
        if images is not None:
            parts.append(self._image(images if isinstance(images, torch.Tensor) else torch.stack(images)))
        if texts is not None:
            parts.append(self._text(texts))
        return torch.nn.functional.normalize(sum(parts), dim=-1)
