"""The one record every adapter yields: a (query, target) pair of optional image and text sides."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

if TYPE_CHECKING:  # for the ImageInput annotation only (adapters stay free of a torch import)
    import PIL.Image
    import torch

# What an image side may hold: a file path, encoded bytes, a decoded PIL image, an HxW(xC) array or a
# (3, H, W) float tensor already in the tokenizer's input range. Decoding is deferred to data/images.py
# so that adapters stay cheap and decoding happens in DataLoader workers.
ImageInput = Union[str, "os.PathLike[str]", bytes, "PIL.Image.Image", np.ndarray, "torch.Tensor"]


Side = Literal["query", "target"]
"""A side of a pair: the query (left) or the target (right)."""
SIDES: tuple[Side, Side] = ("query", "target")


@dataclass(frozen=True)
class SampleSide:
    """One side of a ``Sample``: an optional image (undecoded, see ``ImageInput``) and an optional text.

    Decoding turns it into a ``data.dataset.DecodedSide`` and collation into a ``data.collate.BatchSide``.
    """

    image: ImageInput | None = None
    text: str | None = None


@dataclass
class Sample:
    """A training/eval item: a ``query`` (left) side and a ``target`` (right) side, each an optional image and text.

    A missing text (None) is encoded as the empty string, i.e. [sot, eot], as in the reference. ``group``
    ties hard negatives together: the sampler keeps every sample with the same group key in one batch.
    ``meta`` carries per-item labels for evaluation (concepts, modality, split, ...).
    """

    id: str
    source: str
    query: SampleSide = field(default_factory=SampleSide)
    target: SampleSide = field(default_factory=SampleSide)
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def side(self, name: Side) -> SampleSide:
        """The ``query`` or ``target`` side."""
        return self.query if name == "query" else self.target

    @property
    def group_key(self) -> str:
        """The hard-negative group; a sample without one forms its own group."""
        return self.group if self.group is not None else f"{self.source}/{self.id}"
