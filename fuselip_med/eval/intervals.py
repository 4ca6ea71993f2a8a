"""Uncertainty of the radiology evaluation's numbers: bootstrap intervals for AUROC, exact binomial intervals for
accuracies and recalls.

- Bootstrap (Efron & Tibshirani 1993, ch. 13, the percentile interval): ``n_boot`` resamples of the evaluated rows
  drawn with replacement by ``numpy.random.default_rng(seed)``; one resample is a row of counts (how often each
  row was drawn), shared by every finding so that macro averages get their interval from the same resamples. The
  95% interval is the 2.5th and 97.5th percentile of the statistic over the resamples where it is defined (a
  resample without a positive or without a negative has no AUROC and is left out; ``n_defined`` says how many
  remained).
- AUROC of a resample (vectorised over resamples, :class:`AurocResampler`): the Mann-Whitney form with counts as
  weights, ``sum_i w+_i (W-_below(i) + W-_tied(i) / 2) / (W+ W-)``, i.e. what ``sklearn.metrics.roc_auc_score``
  gives on the resampled rows (ties count one half, as its trapezoidal rule); the tests check both agree.
- Binomial interval: the exact Clopper-Pearson interval of scipy's ``binomtest(k, n).proportion_ci``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["bootstrap_counts", "AurocResampler", "weighted_aurocs", "bootstrap_auroc", "percentile_interval",
           "binomial_interval"]


def bootstrap_counts(n: int, n_boot: int, seed: int, *, block: int = 64) -> Iterator[np.ndarray]:
    """``[b, n] int32`` blocks of resample counts (row j: how often each of the ``n`` rows was drawn in resample
    j), ``n_boot`` rows in all, from ``numpy.random.default_rng(seed)`` (the same seed gives the same resamples).
    Each resample is one contiguous row, so gathering and summing along it stays in cache."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws = rng.integers(0, n, size=(b, n), dtype=np.int64)
        draws += np.arange(b, dtype=np.int64)[:, None] * n
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.int32)


class AurocResampler:
    """The AUROC of one finding's rows under many resamples, with the sorting done once.

    ``y`` [n] bool truth and ``scores`` [n] float of the rows, ``rows`` [n] int64 their columns in the resample
    counts. For positive i, ``lo_i`` / ``hi_i`` = how many negatives score below / at most ``s_i``; with ``cum`` the
    prefix sums of the negatives' counts (in score order), the negatives a positive beats, ties counting one half,
    are ``(cum[lo_i] + cum[hi_i]) / 2``: one gather per resample instead of a sort.
    """

    def __init__(self, y: np.ndarray, scores: np.ndarray, rows: np.ndarray | None = None):
        y = np.asarray(y, dtype=bool)
        s = np.asarray(scores, dtype=np.float64)
        rows = np.arange(len(y)) if rows is None else np.asarray(rows)
        order = np.argsort(s[~y], kind="stable")
        self.neg_rows = rows[~y][order]
        neg_sorted = s[~y][order]
        self.pos_rows = rows[y]
        self.lo = np.searchsorted(neg_sorted, s[y], side="left")
        self.hi = np.searchsorted(neg_sorted, s[y], side="right")
        self.tied = bool((self.lo != self.hi).any())

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """[b] float64 AUROCs of ``counts`` [b, n_all] int resamples; NaN without a positive or a negative."""
        neg = np.take(counts, self.neg_rows, axis=1)
        cum = np.zeros((len(counts), neg.shape[1] + 1), dtype=np.int32)  # counts sum to n_all < 2**31
        np.cumsum(neg, axis=1, out=cum[:, 1:])
        pos = np.take(counts, self.pos_rows, axis=1).astype(np.float64)
        beaten = np.take(cum, self.lo, axis=1).astype(np.float64)
        if self.tied:
            beaten = 0.5 * (beaten + np.take(cum, self.hi, axis=1))
        wins = np.einsum("bi,bi->b", pos, beaten)
        n_pos, n_neg = pos.sum(axis=1), cum[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


def weighted_aurocs(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of each resample: ``y`` [n] bool/0-1 truth, ``scores`` [n] float, ``counts`` [b, n] int resample
    counts. Returns [b] float64, NaN where a resample has no positive or no negative row."""
    return AurocResampler(y, scores)(counts)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """(low, high, n_defined): the percentile interval of the non-NaN ``values`` (NaN, NaN, 0 when none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(v, [tail, 100 - tail])
    return float(low), float(high), int(v.size)


def bootstrap_auroc(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_boot]`` float64 AUROCs of seeded bootstrap resamples of one finding's rows (see the module
    docstring); ``y`` [n] truth, ``scores`` [n] float."""
    return np.concatenate([weighted_aurocs(y, scores, c) for c in bootstrap_counts(len(y), n_boot, seed)])


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion ``k / n`` (scipy.stats.binomtest); NaNs when n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)
