"""Chunked cosine-similarity ranking: where does the correct candidate land for each query?

Tie rule (the reference's, ``get_clip_metrics``): candidates are ordered by a *stable* descending sort of
the scores, so among equal scores the lower candidate index comes first. The 0-based rank of a target at
candidate index ``t`` with score ``s_t`` is therefore

    rank = #{j : s_j > s_t} + #{j < t : s_j == s_t}

i.e. a target tied with an earlier candidate ranks *behind* it, and one tied with a later candidate ranks
ahead of it. With several correct candidates per query (duplicate captions, one image with several
captions) the rank is that of the first correct candidate in this order: the one with the highest score,
and among equal highest scores the lowest index.

Scores are computed one block of queries at a time, ``queries[a:b] @ candidates.T``, so memory is
O(chunk x C) and never O(Q x C). A rank only compares scores within one query's row, but BLAS may compute
a row's dot products differently (last-bit differences) depending on how many rows the product has: a
block of 1 or 13 rows can take another kernel than one of 16. So blocks are always a multiple of
``_ROW_ALIGN`` rows (the chunk size is rounded up, the last block padded with zero rows), which makes the
scores, and so the ranks, the same whatever the chunk size (checked by the tests on CPU).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RankResult", "rank_targets", "as_target_matrix", "default_chunk_size"]

_ROW_ALIGN = 16
# Budget for one block of scores (float32) when no chunk size is given: 256 MiB.
_DEFAULT_BLOCK_BYTES = 256 * 1024 * 1024


@dataclass
class RankResult:
    """Per-query results. ``ranks`` are 0-based (rank 0 = the correct candidate is first)."""

    ranks: torch.Tensor                     # (Q,) int64
    target_scores: torch.Tensor             # (Q,) float32: score of the best correct candidate
    topk_indices: torch.Tensor | None = None  # (Q, k) int64, best first
    topk_scores: torch.Tensor | None = None   # (Q, k) float32


def default_chunk_size(n_candidates: int, block_bytes: int = _DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that one (rows x n_candidates) float32 block stays within ``block_bytes``."""
    rows = max(1, min(4096, block_bytes // (4 * max(1, n_candidates))))
    return max(_ROW_ALIGN, rows // _ROW_ALIGN * _ROW_ALIGN)


def as_target_matrix(targets, n_queries: int, n_candidates: int) -> torch.Tensor:
    """Normalise targets to a (Q, M) int64 matrix padded with -1.

    ``targets`` may be a (Q,) integer tensor/array/list (one correct candidate per query) or a sequence of Q
    sequences of candidate indices (several correct candidates; each query needs at least one).
    """
    if isinstance(targets, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(targets)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"targets must hold integer candidate indices, got dtype {t.dtype}")
        t = t.to(torch.int64)
        if t.ndim == 1:
            t = t.unsqueeze(1)
        if t.ndim != 2:
            raise ValueError(f"targets must be (Q,) or (Q, M), got shape {tuple(t.shape)}")
    else:
        rows = [list(r) if isinstance(r, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(r, str)
                else [r] for r in targets]
        width = max((len(r) for r in rows), default=1)
        t = torch.full((len(rows), max(width, 1)), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            if r:
                t[i, : len(r)] = torch.as_tensor([int(x) for x in r], dtype=torch.int64)
    if t.shape[0] != n_queries:
        raise ValueError(f"got targets for {t.shape[0]} queries but {n_queries} queries")
    valid = t >= 0
    if n_queries and not bool(valid.any(dim=1).all()):
        missing = int((~valid.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"query {missing} has no correct candidate; every query needs at least one")
    if bool((t >= n_candidates).any()):
        raise ValueError(f"a target index is >= the number of candidates ({n_candidates})")
    return t


def _best_targets(scores: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and index of the first correct candidate in stable-descending order, per row."""
    valid = tgt >= 0
    safe = tgt.clamp_min(0)
    tscores = scores.gather(1, safe)
    tscores = torch.where(valid, tscores, torch.full_like(tscores, -torch.inf))
    best = tscores.max(dim=1, keepdim=True).values
    # Among correct candidates with the best score, the lowest index comes first.
    big = torch.iinfo(torch.int64).max
    idx = torch.where(valid & (tscores == best), safe, torch.full_like(safe, big)).min(dim=1).values
    return best.squeeze(1), idx


def _row_counts(scores: torch.Tensor, values: torch.Tensor, op: str) -> np.ndarray:
    """Per row, how many scores are > (op "gt") or == (op "eq") that row's value."""
    if scores.device.type == "cpu":  # numpy's compare + sum is several times faster than torch's on CPU
        fn = np.greater if op == "gt" else np.equal
        return fn(scores.numpy(), values.numpy()[:, None]).sum(axis=1).astype(np.int64)
    fn = torch.gt if op == "gt" else torch.eq
    return fn(scores, values.unsqueeze(1)).sum(dim=1).cpu().numpy()


def _count_ranks(scores: torch.Tensor, best: torch.Tensor, best_idx: torch.Tensor) -> torch.Tensor:
    """rank = #{s > best} + #{j < best_idx : s == best}, for each row of ``scores``."""
    ranks = _row_counts(scores, best, "gt")
    for r in np.nonzero(_row_counts(scores, best, "eq") > 1)[0]:  # ties besides the target: rare, exact fix
        ranks[r] += int((scores[r, : int(best_idx[r])] == best[r]).sum())
    return torch.from_numpy(ranks)


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k candidates of the stable descending order, per row (indices, scores)."""
    vals, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    edge = vals[:, -1]
    taken = (vals == edge.unsqueeze(1)).sum(dim=1).cpu().numpy()
    for r in np.nonzero(_row_counts(scores, edge, "eq") > taken)[0]:  # more tied at the k-th score than fit
        t = int(taken[r])
        idx[r, k - t:] = (scores[r] == edge[r]).nonzero().squeeze(1)[:t]  # the lowest indices win
    # order: by index, then a stable sort by descending score
    order = torch.argsort(idx, dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return idx.gather(1, order).cpu(), vals.gather(1, order).cpu()


def rank_targets(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets,
    *,
    chunk_size: int | None = None,
    topk: int = 0,
) -> RankResult:
    """Rank of the correct candidate(s) for every query under the dot product (cosine for L2-normalised
    inputs), computed in blocks of ``chunk_size`` queries (default: blocks of ~256 MiB of scores).

    queries (Q, D), candidates (C, D): float tensors on one device (computed there, in float32).
    targets: see :func:`as_target_matrix`. topk > 0 also returns the top-k candidates per query.
    """
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} must be "
                         "(Q, D) and (C, D) with the same D")
    n_q, n_c = queries.shape[0], candidates.shape[0]
    if n_c == 0 and n_q:
        raise ValueError("no candidates to rank")
    q = queries.detach().to(torch.float32)
    c = candidates.detach().to(device=q.device, dtype=torch.float32)
    for name, x in (("queries", q), ("candidates", c)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contain NaN or infinite values; check the model's embeddings")
    tgt = as_target_matrix(targets, n_q, n_c).to(q.device)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(n_c)
    chunk = -(-min(chunk, max(n_q, 1)) // _ROW_ALIGN) * _ROW_ALIGN  # whole blocks of _ROW_ALIGN rows
    k = min(int(topk), n_c)

    ranks = torch.empty(n_q, dtype=torch.int64)
    tscores = torch.empty(n_q, dtype=torch.float32)
    top_i = torch.empty((n_q, k), dtype=torch.int64) if k else None
    top_s = torch.empty((n_q, k), dtype=torch.float32) if k else None
    c_t = c.T
    block = torch.empty((chunk, n_c), dtype=torch.float32, device=q.device)
    padded = torch.zeros((chunk, q.shape[1]), dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for a in range(0, n_q, chunk):
            b = min(a + chunk, n_q)
            rows = q[a:b]
            if b - a < chunk:  # the last block: same number of rows as the others
                padded[: b - a] = rows
                padded[b - a:] = 0
                rows = padded
            scores = torch.mm(rows, c_t, out=block)[: b - a]
            best, best_idx = _best_targets(scores, tgt[a:b])
            ranks[a:b] = _count_ranks(scores, best, best_idx)
            tscores[a:b] = best.cpu()
            if k:
                top_i[a:b], top_s[a:b] = _topk_stable(scores, k)
    return RankResult(ranks=ranks, target_scores=tscores, topk_indices=top_i, topk_scores=top_s)
