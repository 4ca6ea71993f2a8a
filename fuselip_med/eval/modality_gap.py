"""Modality gap (Liang et al. 2022; FuseLIP appendix): how far apart two kinds of inputs sit on the sphere.

With a and b the L2-normalised embeddings of two input kinds (e.g. image-only vs text-only), the gap is
the Euclidean distance between their centroids, ``||mean(a) - mean(b)||_2``; ``cosine_of_means`` is the
cosine similarity of the two centroids. Paired inputs (row i of a and b belong together) also give the mean
cosine of matched pairs.
"""
from __future__ import annotations

import torch

__all__ = ["modality_gap"]


def modality_gap(a: torch.Tensor, b: torch.Tensor, *, paired: bool = False) -> dict[str, float]:
    """``gap``, ``cosine_of_means``, the centroid norms, and with ``paired`` ``mean_paired_cosine``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need non-empty (N, D) and (M, D) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.to(torch.float64), dim=-1)
    b = torch.nn.functional.normalize(b.to(torch.float64), dim=-1)
    ma, mb = a.mean(dim=0), b.mean(dim=0)
    out = {
        "gap": float(torch.linalg.vector_norm(ma - mb)),
        "cosine_of_means": float(torch.nn.functional.cosine_similarity(ma, mb, dim=0)),
        "norm_mean_a": float(torch.linalg.vector_norm(ma)),
        "norm_mean_b": float(torch.linalg.vector_norm(mb)),
    }
    if paired:
        if a.shape != b.shape:
            raise ValueError(f"paired embeddings need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        out["mean_paired_cosine"] = float((a * b).sum(dim=1).mean())
    return out
