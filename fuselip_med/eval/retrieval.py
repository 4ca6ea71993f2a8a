"""Retrieval metrics (reference section 6.1): Recall@k, mean rank and median rank, both directions, on the
full pool and on fixed seeded random pools.

- R@k = mean(rank < k) with 0-based ranks; ``mean_rank`` = mean(rank) + 1; ``median_rank`` =
  floor(median(rank)) + 1 (numpy median: the mean of the two middle ranks for an even count).
- Which candidates are correct comes from the samples' keys: candidate j is correct for query i iff the pair
  (left_key_i, right_key_j) occurs among the samples in the pool. So duplicate captions are all correct for
  each image they describe, and an image listed with several captions accepts each of them; the rank is
  that of the first correct candidate (see :mod:`fuselip_med.eval.similarity` for the tie rule).
- Each direction is its own chunked pass (text->image ranks come from ``text @ image.T``, not from a
  transposed image->text matrix), so scores may differ from the reference's transpose in the last bit only.
- Pools: ``n_pools`` index sets of ``pool_size`` samples drawn without replacement by
  ``numpy.random.default_rng(seed)`` (pool p = ``rng.choice(n, pool_size, replace=False)``, sorted, drawn
  in order p = 0, 1, ...), so the same seed gives the same pools for every model. Pooled metrics are the
  mean over pools (``metrics_std`` holds the standard deviation). When the data has no more than
  ``pool_size`` samples, the pool is the whole set and ``n_pools`` is 1.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from .similarity import rank_targets

__all__ = [
    "DEFAULT_KS",
    "rank_metrics",
    "recall_curve",
    "pair_positives",
    "sample_pools",
    "retrieval_metrics",
    "evaluate_retrieval",
]

DEFAULT_KS = (1, 5, 10)


def rank_metrics(ranks, prefix: str, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{prefix}_R@k`` for each k, ``{prefix}_mean_rank`` and ``{prefix}_median_rank`` from 0-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to summarise")
    out = {f"{prefix}_R@{k}": float(np.mean(r < k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(r.mean() + 1)
    out[f"{prefix}_median_rank"] = float(np.floor(np.median(r)) + 1)
    return out


def recall_curve(ranks, max_k: int) -> list[float]:
    """[R@1, R@2, ..., R@max_k]."""
    r = np.asarray(ranks)
    return [float(np.mean(r < k)) for k in range(1, max_k + 1)]


def pair_positives(left_keys: Sequence[Hashable], right_keys: Sequence[Hashable]
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """Correct candidate positions for both directions from per-sample keys.

    Sample i pairs ``left_keys[i]`` with ``right_keys[i]``. Returns (left->right, right->left): for each
    position i, the sorted positions j on the other side whose key is paired with i's key in some sample.
    """
    if len(left_keys) != len(right_keys):
        raise ValueError(f"{len(left_keys)} left keys but {len(right_keys)} right keys")
    l_pos: dict[Hashable, list[int]] = defaultdict(list)
    r_pos: dict[Hashable, list[int]] = defaultdict(list)
    l_partners: dict[Hashable, set] = defaultdict(set)
    r_partners: dict[Hashable, set] = defaultdict(set)
    for i, (lk, rk) in enumerate(zip(left_keys, right_keys)):
        l_pos[lk].append(i)
        r_pos[rk].append(i)
        l_partners[lk].add(rk)
        r_partners[rk].add(lk)
    l_cache = {lk: sorted(j for rk in partners for j in r_pos[rk]) for lk, partners in l_partners.items()}
    r_cache = {rk: sorted(j for lk in partners for j in l_pos[lk]) for rk, partners in r_partners.items()}
    return [l_cache[k] for k in left_keys], [r_cache[k] for k in right_keys]


def sample_pools(n: int, pool_size: int, n_pools: int, seed: int) -> list[np.ndarray]:
    """``n_pools`` sorted index sets of ``pool_size`` out of ``n``, without replacement, seeded."""
    if pool_size < 1 or n_pools < 1:
        raise ValueError(f"pool_size and n_pools must be >= 1, got {pool_size} and {n_pools}")
    if pool_size > n:
        raise ValueError(f"cannot draw a pool of {pool_size} from {n} samples")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=pool_size, replace=False)) for _ in range(n_pools)]


def _direction_names(names: tuple[str, str]) -> tuple[str, str]:
    a, b = names
    return f"{a}_to_{b}", f"{b}_to_{a}"


def retrieval_metrics(
    left: torch.Tensor,
    right: torch.Tensor,
    left_keys: Sequence[Hashable],
    right_keys: Sequence[Hashable],
    *,
    names: tuple[str, str] = ("image", "text"),
    both_directions: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    curve_max_k: int = 50,
    chunk_size: int | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics and recall curves for one pool. left/right: (N, D) embeddings of sample i's two sides."""
    n = left.shape[0]
    if right.shape[0] != n or len(left_keys) != n or len(right_keys) != n:
        raise ValueError("left, right, left_keys and right_keys must all have one entry per sample")
    l2r, r2l = pair_positives(left_keys, right_keys)
    fwd, bwd = _direction_names(names)
    max_k = min(curve_max_k, n)
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    runs = [(fwd, left, right, l2r)]
    if both_directions:
        runs.append((bwd, right, left, r2l))
    for prefix, q, c, pos in runs:
        ranks = rank_targets(q, c, pos, chunk_size=chunk_size).ranks
        metrics.update(rank_metrics(ranks, prefix, ks))
        curves[prefix] = recall_curve(ranks, max_k)
    return metrics, curves


def evaluate_retrieval(
    left: torch.Tensor,
    right: torch.Tensor,
    left_keys: Sequence[Hashable],
    right_keys: Sequence[Hashable],
    *,
    names: tuple[str, str] = ("image", "text"),
    both_directions: bool = True,
    pool_size: int | None = 1000,
    n_pools: int = 5,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    curve_max_k: int = 50,
    chunk_size: int | None = None,
) -> dict:
    """Full-pool and seeded-pool retrieval.

    Returns a task entry: ``metrics`` (pooled means), ``metrics_std``, ``recall_curve`` (pooled mean,
    k = 1..len), ``pool_size``, ``n_pools``, ``seed``, ``n`` and ``full_pool`` = {``pool_size``,
    ``metrics``, ``recall_curve``}.
    """
    n = left.shape[0]
    if n == 0:
        raise ValueError("no samples to evaluate retrieval on")
    opts = dict(names=names, both_directions=both_directions, ks=ks, curve_max_k=curve_max_k,
                chunk_size=chunk_size)
    full_metrics, full_curves = retrieval_metrics(left, right, left_keys, right_keys, **opts)
    result: dict = {"n": n, "seed": seed,
                    "full_pool": {"pool_size": n, "metrics": full_metrics, "recall_curve": full_curves}}
    if pool_size is None or pool_size >= n:
        result.update(metrics=dict(full_metrics), metrics_std={k: 0.0 for k in full_metrics},
                      recall_curve={k: list(v) for k, v in full_curves.items()}, pool_size=n, n_pools=1)
        if pool_size is not None and pool_size > n:
            result["requested_pool_size"] = pool_size
        return result
    per_pool_m, per_pool_c = [], []
    for idx in sample_pools(n, pool_size, n_pools, seed):
        sel = torch.from_numpy(idx)
        m, c = retrieval_metrics(left[sel], right[sel], [left_keys[i] for i in idx],
                                 [right_keys[i] for i in idx], **opts)
        per_pool_m.append(m)
        per_pool_c.append(c)
    keys = list(per_pool_m[0])
    result.update(
        metrics={k: float(np.mean([m[k] for m in per_pool_m])) for k in keys},
        metrics_std={k: float(np.std([m[k] for m in per_pool_m])) for k in keys},
        recall_curve={d: [float(v) for v in np.mean([c[d] for c in per_pool_c], axis=0)]
                      for d in per_pool_c[0]},
        pool_size=pool_size,
        n_pools=n_pools,
    )
    return result
