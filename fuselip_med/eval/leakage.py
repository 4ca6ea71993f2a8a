"""Train/test leakage: for every test item, the training items that are the same image, nearly the same image, or
come from the same article.

Kinds of match (each test item may have several):

- ``exact``: equal SHA-256 of the image content (:func:`fuselip_med.data.token_cache.content_hash`: a file's
  bytes, encoded bytes, or a decoded array).
- ``phash``: perceptual hashes (``imagehash.phash``: the 8x8 low-frequency DCT of a 32x32 grey image against its
  median, Zauner 2010) within ``max_distance`` bits of Hamming distance: a re-encoded JPEG, a resized or slightly
  brightened copy.
- ``embedding``: cosine of the model's image-only embeddings >= ``min_cosine``.
- ``same_article``: equal PubMed Central article IDs, read from a sample's ``meta`` (``article_id``, ``pmcid``,
  ``PMCID``) or a ``PMC<digits>`` in its ID or image file name (PMC-OA / PMC-CLIP / PMC-VQA name figures
  ``PMC1064097_F1.jpg``). ROCOv2 IDs carry no article: for ROCOv2 only the image checks apply.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LEAKAGE_KINDS", "LeakMatch", "article_id", "perceptual_hash", "hamming_pairs", "cosine_pairs",
           "equal_pairs"]

LEAKAGE_KINDS: tuple[str, ...] = ("exact", "phash", "embedding", "same_article")
_PMC_RE = re.compile(r"PMC\d{3,}", re.I)


@dataclass(frozen=True)
class LeakMatch:
    """One (test item, training item) pair: its ``kind`` and the ``value`` that matched (hash prefix, Hamming
    distance in bits, cosine, or the article ID)."""

    test_id: str
    train_id: str
    kind: str
    value: str


def article_id(sample_id: str, image: Any, meta: Mapping[str, Any]) -> str | None:
    """The PMC article ID of a sample (module docstring), upper-cased, or None."""
    for key in ("article_id", "pmcid", "PMCID"):
        if meta.get(key):
            return str(meta[key]).upper()
    names = [str(sample_id)] + ([os.path.basename(os.fspath(image))] if isinstance(image, (str, os.PathLike)) else [])
    for name in names:
        m = _PMC_RE.search(name)
        if m:
            return m.group(0).upper()
    return None


def perceptual_hash(image: Any, decode_options=None) -> int:
    """The 64-bit ``imagehash.phash`` of an image input (path, bytes, array, PIL; DICOM windowed as for the model)
    as an int. Raises ``fuselip_med.data.images.ImageDecodeError`` when it cannot be decoded."""
    import imagehash

    from fuselip_med.data.images import DecodeOptions, load_image

    bits = imagehash.phash(load_image(image, decode_options or DecodeOptions())).hash.ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming_pairs(test: Sequence[int], train: Sequence[int], max_distance: int,
                  chunk: int = 1024) -> list[tuple[int, int, int]]:
    """(test position, train position, distance) of every pair of 64-bit hashes at most ``max_distance`` bits
    apart; numpy XOR + ``bitwise_count`` in chunks of ``chunk`` test hashes."""
    a = np.asarray(test, dtype=np.uint64)
    b = np.asarray(train, dtype=np.uint64)
    out = []
    for start in range(0, len(a), chunk):
        dist = np.bitwise_count(a[start:start + chunk, None] ^ b[None, :])
        for i, j in zip(*np.nonzero(dist <= max_distance)):
            out.append((start + int(i), int(j), int(dist[i, j])))
    return out


def cosine_pairs(test: np.ndarray, train: np.ndarray, min_cosine: float,
                 chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(test row, train row, cosine) of every pair of L2-normalised [T, D] / [N, D] float embeddings with
    cosine >= ``min_cosine``, in chunks of ``chunk`` test rows."""
    out = []
    for start in range(0, len(test), chunk):
        sims = np.asarray(test[start:start + chunk], np.float32) @ np.asarray(train, np.float32).T
        for i, j in zip(*np.nonzero(sims >= min_cosine)):
            out.append((start + int(i), int(j), float(sims[i, j])))
    return out


def equal_pairs(test: Sequence[str | None], train: Sequence[str | None]) -> list[tuple[int, int, str]]:
    """(test position, train position, value) of equal non-None values."""
    where: dict[str, list[int]] = {}
    for j, value in enumerate(train):
        if value is not None:
            where.setdefault(value, []).append(j)
    return [(i, j, value) for i, value in enumerate(test) if value is not None for j in where.get(value, [])]
