"""Candidate-list scoring shared by the benchmark tasks (MMEB, OI-Crop/OI-Pos, VG-Crop, TGIT-style pools).

Each query q has its own ordered candidate list; candidate 0 is the correct one (the MMEB, OI and VG task
files' convention). A query is answered correctly iff the argmax of its cosine scores is position 0; on an
exact tie the first position wins (``torch.argmax``), as in the reference evaluations (FuseLIP
``mmeb/mmeb_eval.py``, ``fuse_eval/eval_oi.py``).
"""
from __future__ import annotations

import torch

__all__ = ["pad_candidates", "top1_positions"]


def pad_candidates(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged candidate row lists -> ([Q, C] int64 row ids padded with 0, [Q, C] bool valid mask)."""
    width = max((len(c) for c in lists), default=0)
    ids = torch.zeros((len(lists), width), dtype=torch.int64)
    valid = torch.zeros((len(lists), width), dtype=torch.bool)
    for q, c in enumerate(lists):
        ids[q, :len(c)] = torch.as_tensor(c, dtype=torch.int64)
        valid[q, :len(c)] = True
    return ids, valid


def top1_positions(queries: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor,
                   valid: torch.Tensor | None = None, *, chunk: int = 256) -> torch.Tensor:
    """For each query, the candidate position with the highest cosine score (first on ties).

    ``queries`` [Q, D] and ``targets`` [U, D] float (L2-normalised: dot = cosine); ``candidates`` [Q, C] int64
    rows of ``targets``; ``valid`` [Q, C] bool (padding positions never win). Returns [Q] int64. Queries are
    scored ``chunk`` at a time against the chunk's unique targets with one matmul (a matmul costs far less
    per score than gathering [C, D] rows per query) unless those are more than ``32 x C`` (then each query's
    candidates are gathered, 16 queries at a time, to bound memory).
    """
    q_all, t_all = queries.to(torch.float32), targets.to(torch.float32)
    out = torch.empty(len(q_all), dtype=torch.int64)
    for start in range(0, len(q_all), chunk):
        q = q_all[start:start + chunk]
        cand = candidates[start:start + chunk]
        uniq, inverse = torch.unique(cand, return_inverse=True)
        if uniq.numel() <= 32 * cand.shape[1]:
            scores = torch.gather(q @ t_all[uniq].T, 1, inverse)
        else:
            scores = torch.cat([torch.bmm(t_all[cand[a:a + 16]], q[a:a + 16].unsqueeze(2)).squeeze(2)
                                for a in range(0, len(q), 16)])
        if valid is not None:
            scores = scores.masked_fill(~valid[start:start + chunk], float("-inf"))
        out[start:start + chunk] = scores.argmax(dim=1)
    return out
