"""TGIT retrieval (reference section 6.2): find the transformed image from (instruction, source image).

A pool is a list of ``TGITPair(prompt, source_image, target_image, kind, params)`` whose first pair is the
query and its correct target. Query = (prompt, source image) embedded fused; candidates = ("", target
image) of every pair, embedded fused too (the reference's ``force_fused``). The pool is answered correctly
iff the argmax of the cosine similarities is index 0; on an exact tie the first index wins (as
``torch.argmax``), so a distractor identical to the correct target does not count against the model.
Accuracy per kind = correct pools / pools of that kind; ``mean_accuracy`` = the mean over kinds (the
paper's "TGIT" number for the five paper kinds).

Pools come either ready-made (``{kind: [pool, pool, ...]}``) or from the images of a source: the first
``n_images`` samples that have an image, each turned into one pool per kind by
``fuselip_med.data.transforms.tasks.eval_pools`` with one ``numpy.random.default_rng(seed)`` consumed in
sample order (so a seed fixes every pool).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .embedding import Embedder, EmbedItem

__all__ = ["pool_items", "score_pools", "summarize_tgit", "evaluate_tgit_pools", "iter_source_pools",
           "evaluate_tgit_source"]


def pool_items(pool: Sequence[Any]) -> tuple[EmbedItem, list[EmbedItem]]:
    """The query item and the candidate items of one pool (first pair = the query and its target)."""
    if not pool:
        raise ValueError("a TGIT pool needs at least one pair")
    first = pool[0]
    query = EmbedItem(image=first.source_image, text=first.prompt)
    return query, [EmbedItem(image=p.target_image, text="") for p in pool]


def score_pools(queries: torch.Tensor, candidates: Sequence[torch.Tensor]) -> np.ndarray:
    """Per pool, whether the argmax over its candidates is index 0. queries (P, D); candidates[p] (n_p, D)."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate sets")
    out = np.zeros(len(candidates), dtype=bool)
    for p, (q, c) in enumerate(zip(queries, candidates)):
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(f"pool {p} has no candidates")
        out[p] = int(torch.argmax(c.to(torch.float32) @ q.to(torch.float32))) == 0
    return out


def summarize_tgit(correct: Mapping[str, Sequence[bool] | np.ndarray]) -> dict:
    """Task entry from per-kind correctness: ``metrics`` {kind}_accuracy and mean_accuracy, ``per_kind``."""
    kinds = [k for k in correct if len(correct[k])]
    if not kinds:
        raise ValueError("no TGIT pools were scored")
    acc = {k: float(np.mean(correct[k])) for k in kinds}
    metrics = {f"{k}_accuracy": v for k, v in acc.items()}
    metrics["mean_accuracy"] = float(np.mean(list(acc.values())))
    return {
        "metrics": metrics,
        "per_kind": {k: {"correct": int(np.sum(correct[k])), "n": len(correct[k]), "accuracy": acc[k]}
                     for k in kinds},
    }


def _score_kind_pools(embedder: Embedder, pools: Sequence[Sequence[Any]], desc: str) -> np.ndarray:
    items_per_pool = [pool_items(p) for p in pools]
    flat = [q for q, _ in items_per_pool] + [c for _, cs in items_per_pool for c in cs]
    table = embedder.embed(flat, desc=desc)
    keep, queries, cands = [], [], []
    for p, (q, cs) in enumerate(items_per_pool):
        keys = [q.key] + [c.key for c in cs]
        if any(k not in table for k in keys):  # an image failed to decode: the pool cannot be scored
            continue
        keep.append(p)
        queries.append(table[q.key])
        cands.append(table.lookup(c.key for c in cs))
    if not keep:
        return np.zeros(0, dtype=bool)
    return score_pools(torch.stack(queries), cands)


def _as_pool_list(value) -> list[Sequence[Any]]:
    """{kind: pool} (one pool) or {kind: [pool, ...]} -> list of pools."""
    value = list(value)
    if value and hasattr(value[0], "prompt"):
        return [value]
    return value


def evaluate_tgit_pools(embedder: Embedder, pools: Mapping[str, Sequence[Any]]) -> dict:
    """Score ready-made pools ``{kind: [pool, ...]}`` (a single pool per kind is accepted too)."""
    correct = {kind: _score_kind_pools(embedder, _as_pool_list(v), f"tgit {kind}") for kind, v in pools.items()}
    out = summarize_tgit(correct)
    out["n_pools_scored"] = int(sum(len(v) for v in correct.values()))
    return out


def iter_source_pools(source, *, family: str = "tgit", n_images: int = 1000, seed: int = 0,
                      flip_eval: str = "unique", decode=None,
                      skipped: Counter | None = None) -> Iterator[tuple[str, dict[str, list]]]:
    """(sample id, {kind: pool}) for the first ``n_images`` samples of ``source`` whose image decodes.

    ``decode``: the ``DecodeOptions`` for loading the source image (window, frame, image size); samples
    without an image or whose image fails to decode are counted in ``skipped`` (reason -> count).
    """
    from fuselip_med.data.images import DecodeOptions, ImageDecodeError, load_image
    from fuselip_med.data.transforms.tasks import eval_pools, image_and_caption

    options = decode if decode is not None else DecodeOptions()
    skipped = skipped if skipped is not None else Counter()
    rng = np.random.default_rng(seed)
    used = 0
    for i in range(len(source)):
        if used >= n_images:
            break
        sample = source[i]
        image = image_and_caption(sample)[0]
        if image is None:
            skipped["no image"] += 1
            continue
        if not isinstance(image, np.ndarray):  # an array may hold HU values for the radiology set
            try:
                image = load_image(image, options)  # once, not once per kind
            except ImageDecodeError as e:
                skipped[e.reason] += 1
                continue
        used += 1
        yield sample.id, eval_pools(image, family, rng, size=options.image_size, flip_eval=flip_eval)


def evaluate_tgit_source(embedder: Embedder, source, *, family: str = "tgit", n_images: int = 1000,
                         seed: int = 0, flip_eval: str = "unique", images_per_step: int = 64,
                         decode=None) -> dict:
    """TGIT accuracies on pools built from ``source``'s images, streamed ``images_per_step`` images at a
    time so that the rendered pixels of only a few pools are held at once."""
    correct: dict[str, list[bool]] = {}
    skipped: Counter = Counter()
    buffer: dict[str, list] = {}
    n_used = 0

    def flush():
        for kind, pools in buffer.items():
            scored = _score_kind_pools(embedder.fresh(), pools, f"tgit {kind}")
            correct.setdefault(kind, []).extend(bool(x) for x in scored)
        buffer.clear()

    for _, pools in iter_source_pools(source, family=family, n_images=n_images, seed=seed,
                                      flip_eval=flip_eval, decode=decode, skipped=skipped):
        n_used += 1
        for kind, pool in pools.items():
            buffer.setdefault(kind, []).append(pool)
        if n_used % images_per_step == 0:
            flush()
    flush()
    if not n_used:
        raise ValueError(f"no image in {getattr(source, 'name', 'the source')} could be used for TGIT")
    out = summarize_tgit(correct)
    out.update(n_images=n_used, family=family, flip_eval=flip_eval, seed=seed, skipped=dict(skipped))
    return out
