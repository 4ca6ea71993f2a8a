"""The one inference engine: ``embed``, ``index build``, ``query``, series/study embedding and every evaluation
task embed through it.

* ``items``: what is embedded (:class:`EmbedItem`: an image, a text or a fused (image, text) pair) and how an
  input is named (``image_key``: a path, or the one content hash of ``data.hashing``).
* ``table``: :class:`EmbeddingTable`, the unit-length vectors of unique inputs and the reason of each that failed.
* ``engine``: :class:`Embedder` / ``embed_items``: unique inputs once, homogeneous batches, images decoded by
  the data layer's ``SampleDataset`` in DataLoader workers (``decoded_images``; a bad image is a
  ``SkippedSample`` with its reason, as in training), shared across processes with ``shard=True``.
* ``units``: series and study vectors pooled from the engine's slice vectors.

The names below are imported on first use, so that importing the package does not import torch.
"""
from __future__ import annotations

import importlib

__all__ = ["EmbedItem", "Embedder", "EmbeddingTable", "embed_items", "image_key", "sample_image_key"]

_HOMES = {"EmbedItem": "items", "image_key": "items", "sample_image_key": "items", "EmbeddingTable": "table",
          "Embedder": "engine", "embed_items": "engine"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
