"""VQA as retrieval (FuseLIP's VQA evaluation, MMEB style): the fused (image + question) embedding must rank the
right answer first among every distinct answer of the pool (answers compared after ``normalize_text``)."""
from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .embedding import Embedder, EmbedItem, sample_image_key
from .retrieval import rank_metrics

__all__ = ["evaluate_vqa_retrieval"]


def _normal(text: str) -> str:
    from fuselip_med.data.synth.common import normalize_text

    return normalize_text(text)


def evaluate_vqa_retrieval(model_or_embedder: Any, samples: Sequence[Any], *, batch_size: int = 64,
                           progress: bool = False) -> dict[str, Any]:
    """Score (query image + question -> answer text) samples against the pool of their distinct answers.

    ``model_or_embedder``: anything with ``encode(images=, texts=)`` or an ``Embedder`` (reusing its cache).
    ``samples``: ``Sample``s with ``query_image``, ``query_text`` (question) and ``target_text`` (answer);
    others are counted under ``skipped``. Returns ``{"metrics": {vqa_R@1/5/10, vqa_mean_rank, vqa_median_rank,
    accuracy (= vqa_R@1), chance_R@1}, "per_qtype": {qtype: {"R@1", "n"}} (from ``meta["qtype"]``), "n",
    "pool_size" (distinct answers), "skipped"}``. Raises ``ValueError`` when no sample is usable.
    """
    embedder = model_or_embedder if isinstance(model_or_embedder, Embedder) else Embedder(
        model_or_embedder, batch_size=batch_size, progress=progress)
    skipped: collections.Counter[str] = collections.Counter()
    queries, answers, qtypes = [], [], []
    for sample in samples:
        if sample.query_image is None or not sample.query_text or not sample.target_text:
            skipped["not an (image + question -> answer) sample"] += 1
            continue
        queries.append(EmbedItem(image=sample.query_image, text=sample.query_text,
                                 image_key=sample_image_key(sample, sample.query_image)))
        answers.append(sample.target_text.strip())
        qtypes.append(sample.meta.get("qtype") or "")
    if not queries:
        raise ValueError("no (image + question -> answer) sample to evaluate VQA retrieval on")
    pool: dict[str, str] = {}  # normalised answer -> the first spelling met
    for answer in answers:
        pool.setdefault(_normal(answer), answer)
    candidates = [EmbedItem(text=text) for text in pool.values()]
    table = embedder.embed(queries + candidates, desc="embedding VQA queries and answers")
    keep = [i for i, q in enumerate(queries) if q.key in table]
    for q in queries:
        if q.key in table.failed:
            skipped[table.failed[q.key]] += 1
    if not keep:
        raise ValueError("no VQA query image could be decoded")
    q_emb = table.lookup(queries[i].key for i in keep)
    a_emb = table.lookup(c.key for c in candidates)
    scores = q_emb @ a_emb.T  # [N, A] float32 cosine similarities
    index = {key: j for j, key in enumerate(pool)}
    correct = torch.tensor([index[_normal(answers[i])] for i in keep])
    right = scores.gather(1, correct[:, None])
    ranks = (scores > right).sum(dim=1).numpy()  # 0-based; ties count in the query's favour
    metrics = rank_metrics(ranks, "vqa")
    metrics["accuracy"] = metrics["vqa_R@1"]  # the VQA name of R@1 (the trainer's summary shows "accuracy")
    metrics["chance_R@1"] = 1.0 / len(pool)
    kinds = np.array([qtypes[i] for i in keep])
    per_qtype = {kind: {"R@1": float(np.mean(ranks[kinds == kind] == 0)), "n": int(np.sum(kinds == kind))}
                 for kind in sorted(set(kinds.tolist()) - {""})}
    return {"metrics": metrics, "n": len(keep), "pool_size": len(pool), "n_pools": 1, "skipped": dict(skipped),
            "per_qtype": per_qtype}
