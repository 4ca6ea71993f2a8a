"""Shared by the crop tasks (VG-Crop, OI-Crop, OI-Pos): score (query, candidates) pools whose first
candidate is correct, with :func:`fuselip_med.eval.scoring.top1_positions`."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from fuselip_med.inference.items import EmbedItem

from ..scoring import pad_candidates, top1_positions
from .context import EvalContext

__all__ = ["score_pools"]


def score_pools(ctx: EvalContext, pools: Sequence[tuple[EmbedItem, Sequence[EmbedItem]]], desc: str,
                skipped: Counter, correct_at: Sequence[int] | None = None) -> np.ndarray:
    """[P] bool: whether each pool's top candidate is its correct one (position ``correct_at[p]``, default 0;
    ties: the first position wins); pools with an image that failed to decode are left out and counted in
    ``skipped`` under the decode error."""
    table = ctx.embedder.embed([it for q, cs in pools for it in (q, *cs)], desc=desc)
    keep, answers = [], []
    for p, (q, cs) in enumerate(pools):
        bad = next((table.failed[it.key] for it in (q, *cs) if it.key in table.failed), None)
        if bad is None:
            keep.append((q, cs))
            answers.append(correct_at[p] if correct_at is not None else 0)
        else:
            skipped[bad] += 1
    if not keep:
        return np.zeros(0, dtype=bool)
    flat = table.index_of(c.key for _, cs in keep for c in cs).tolist()
    bounds = np.cumsum([0] + [len(cs) for _, cs in keep])
    ids, valid = pad_candidates([flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    top = top1_positions(table.lookup(q.key for q, _ in keep), table.embeddings, ids, valid)
    return (top == torch.tensor(answers, dtype=torch.int64)).numpy()
