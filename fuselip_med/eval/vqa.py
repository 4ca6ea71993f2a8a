"""VQA as retrieval (FuseLIP's VQA evaluation, MMEB style): the fused (image + question) embedding must rank the
right answer first among every distinct answer of the pool (answers compared after ``normalize_text``).

:func:`evaluate_choice_vqa` (the medical VQA sets): a closed question is answered right iff its right option has
the highest cosine among the question's options (the first option wins an exact tie); an open question's rank is
that of its answer among the split's distinct answers (ties count in the question's favour, as
:func:`evaluate_vqa_retrieval`). Accuracies and R@k carry exact binomial 95% intervals
(:func:`fuselip_med.eval.intervals.binomial_interval`)."""
from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fuselip_med.inference.engine import Embedder
from fuselip_med.inference.items import EmbedItem, sample_image_key

from .retrieval import rank_metrics

__all__ = ["evaluate_vqa_retrieval", "VQAItem", "closed_options", "evaluate_choice_vqa"]


def _normal(text: str) -> str:
    from fuselip_med.data.synth.common import normalize_text

    return normalize_text(text)


def evaluate_vqa_retrieval(model_or_embedder: Any, samples: Sequence[Any], *, batch_size: int = 64,
                           progress: bool = False) -> dict[str, Any]:
    """Score (query image + question -> answer text) samples against the pool of their distinct answers.

    ``model_or_embedder``: anything with ``encode(images=, texts=)`` or an ``Embedder`` (reusing its cache).
    ``samples``: ``Sample``s with ``query.image``, ``query.text`` (question) and ``target.text`` (answer);
    others are counted under ``skipped``. Returns ``{"metrics": {vqa_R@1/5/10, vqa_mean_rank, vqa_median_rank,
    accuracy (= vqa_R@1), chance_R@1}, "per_qtype": {qtype: {"R@1", "n"}} (from ``meta["qtype"]``), "n",
    "pool_size" (distinct answers), "skipped"}``. Raises ``ValueError`` when no sample is usable.
    """
    embedder = model_or_embedder if isinstance(model_or_embedder, Embedder) else Embedder(
        model_or_embedder, batch_size=batch_size, progress=progress)
    skipped: collections.Counter[str] = collections.Counter()
    queries, answers, qtypes = [], [], []
    for sample in samples:
        if sample.query.image is None or not sample.query.text or not sample.target.text:
            skipped["not an (image + question -> answer) sample"] += 1
            continue
        queries.append(EmbedItem(image=sample.query.image, text=sample.query.text,
                                 image_key=sample_image_key(sample, sample.query.image)))
        answers.append(sample.target.text.strip())
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


@dataclass(frozen=True)
class VQAItem:
    """One medical VQA question: ``image`` (a path or encoded bytes), ``question``, ``answer``, ``closed`` (an
    answer among options), ``question_type`` ("" when the set has none) and the closed question's ``options``."""

    id: str
    image: Any
    question: str
    answer: str
    closed: bool
    question_type: str
    options: tuple[str, ...] | None = None


def closed_options(items: Sequence[VQAItem]) -> list[VQAItem]:
    """Items with every closed question's options set: its own (PMC-VQA), (yes, no) for a yes/no answer, else the
    split's distinct closed answers (first spelling met, in order)."""
    pool: dict[str, str] = {}
    for it in items:
        if it.closed and it.options is None and _normal(it.answer) not in ("yes", "no"):
            pool.setdefault(_normal(it.answer), it.answer.strip())
    out = []
    for it in items:
        if it.closed and it.options is None:
            it = replace(it, options=("yes", "no") if _normal(it.answer) in ("yes", "no") else tuple(pool.values()))
        out.append(it)
    return out


def _rate(hits: np.ndarray) -> dict[str, Any]:
    from .intervals import binomial_interval

    k, n = int(hits.sum()), int(hits.size)
    return {"value": k / n if n else float("nan"), "ci": list(binomial_interval(k, n)), "n": n}


def _summary(correct: np.ndarray, ranks: np.ndarray, closed: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if closed.any():
        out["closed_accuracy"] = _rate(correct[closed])
    if (~closed).any():
        out["open_R@1"] = _rate(ranks[~closed] < 1)
        out["open_R@5"] = _rate(ranks[~closed] < 5)
    return out


def evaluate_choice_vqa(embedder: Embedder, items: Sequence[VQAItem], desc: str = "embedding VQA") -> dict[str, Any]:
    """Closed accuracy and open R@1/R@5 (module docstring) of ``items`` (closed ones with ``options`` set, see
    :func:`closed_options`). Returns ``{"metrics", "intervals", "counts", "per_answer_type", "per_question_type",
    "n", "pool_size" (distinct answers), "failed": [(id, reason) of images that did not decode]}``; ``ValueError``
    when nothing could be scored."""
    queries = [EmbedItem(image=it.image, text=it.question) for it in items]
    pool: dict[str, str] = {}
    for it in items:
        pool.setdefault(_normal(it.answer), it.answer.strip())
    texts = {*pool.values(), *(o for it in items if it.closed for o in it.options)}
    table = embedder.embed(queries + [EmbedItem(text=t) for t in sorted(texts)], desc=desc)
    keep = [i for i, q in enumerate(queries) if q.key in table]
    failed = [(items[i].id, table.failed.get(q.key, "not embedded"))
              for i, q in enumerate(queries) if q.key not in table]
    if not keep:
        raise ValueError("no VQA question image could be decoded")
    q_emb = table.lookup(queries[i].key for i in keep)
    answers = list(pool.values())
    a_emb = table.lookup(("text", a) for a in answers)
    index = {key: j for j, key in enumerate(pool)}
    correct = np.zeros(len(keep), dtype=bool)
    ranks = np.zeros(len(keep), dtype=np.int64)
    open_scores = (q_emb @ a_emb.T).numpy()
    for row, i in enumerate(keep):
        it = items[i]
        if it.closed:
            opts = table.lookup(("text", o) for o in it.options)
            scores = (opts @ q_emb[row]).numpy()
            right = [_normal(o) for o in it.options].index(_normal(it.answer))
            correct[row] = int(np.argmax(scores)) == right
        else:
            s = open_scores[row]
            ranks[row] = int((s > s[index[_normal(it.answer)]]).sum())
    closed = np.array([items[i].closed for i in keep])
    summary = _summary(correct, ranks, closed)
    per_type: dict[str, Any] = {}
    kinds = np.array([items[i].question_type for i in keep])
    for kind in sorted(set(kinds.tolist()) - {""}):
        m = kinds == kind
        per_type[kind] = {k: {"value": v["value"], "n": v["n"]} for k, v in _summary(correct[m], ranks[m],
                                                                                      closed[m]).items()}
    return {"metrics": {k: v["value"] for k, v in summary.items()},
            "intervals": {k: v["ci"] for k, v in summary.items()}, "counts": {k: v["n"] for k, v in summary.items()},
            "per_answer_type": {"closed": {k: v for k, v in summary.items() if k.startswith("closed")},
                                "open": {k: v for k, v in summary.items() if k.startswith("open")}},
            "per_question_type": per_type, "n": len(keep), "pool_size": len(pool), "failed": failed}
