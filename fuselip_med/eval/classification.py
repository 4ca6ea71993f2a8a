"""Zero-shot classification: single-label modality (ROCOv2's manual modality concept) and multi-label
concept detection (ImageCLEFmedical convention).

Class weights (reference section 6.3): each class's prompts (one per template) are embedded as text-only
sequences and L2-normalised, averaged over templates and re-normalised. Images are embedded as image-only
sequences; the score of (image, class) is their cosine similarity and the prediction is the argmax (the
first class wins an exact tie).

Modality metrics: accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1/support, with
the confusion matrix (rows = true class, columns = predicted class, in ``labels`` order). Macro-F1
averages over the classes that occur in the truth or the predictions (scikit-learn's default label set);
a class with no true and no predicted item is left out, one with only one of the two has F1 = 0.

Concept detection: the K most frequent concepts; score = cosine(image, concept class weight); one global
threshold t, image i is predicted to have concept k iff score >= t. For each image, with P the predicted
and T the true set (T restricted to the K concepts): F1 = 2|P n T| / (|P| + |T|), and F1 = 1 when both
are empty (the ImageCLEF evaluation's rule); precision = |P n T| / |P| and recall = |P n T| / |T|, where an
empty denominator gives 1 if both sets are empty and 0 otherwise. Sample-averaged = mean over images.
t is chosen on the validation split to maximise sample-averaged F1 (the highest such t on a tie;
t = +inf, i.e. predict nothing, is a candidate) and then applied unchanged to the test split.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from fuselip_med.vocab import MODALITIES, modality_name

__all__ = [
    "MODALITY_CLASSES",
    "MODALITY_TEMPLATES",
    "CONCEPT_TEMPLATES",
    "normalize_modality",
    "class_prompts",
    "class_weights",
    "zero_shot_predict",
    "classification_metrics",
    "top_concepts",
    "concept_matrix",
    "sample_f1",
    "concept_metrics",
    "choose_threshold",
]

MODALITY_CLASSES: tuple[str, ...] = MODALITIES

MODALITY_TEMPLATES: tuple[str, ...] = (
    "a {c} image.",
    "a radiology image acquired with {c}.",
    "{c} scan.",
    "a medical image: {c}.",
    "an image from a {c} examination.",
    "this is a {c} image.",
)

CONCEPT_TEMPLATES: tuple[str, ...] = (
    "{c}.",
    "a radiology image showing {c}.",
    "a medical image of {c}.",
)

def normalize_modality(value, classes: Sequence[str] = MODALITY_CLASSES) -> str | None:
    """The class name for a modality label (name, common spelling or CUI); None if unknown or missing."""
    if value is None:
        return None
    text = str(value).strip()
    for c in classes:
        if text.lower() == c.lower():
            return c
    name = modality_name(text)
    return name if name in classes else None


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """For each class, its prompts: ``template.format(c=name)`` for every template."""
    if not templates:
        raise ValueError("need at least one prompt template")
    return [[t.format(c=name) for t in templates] for name in class_names]


def class_weights(prompt_embeddings: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """(C, D) class weights from per-class (T, D) prompt embeddings: normalise, average, renormalise."""
    rows = [torch.nn.functional.normalize(e.to(torch.float32), dim=-1).mean(dim=0) for e in prompt_embeddings]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def zero_shot_predict(image_embeddings: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class index (N,), scores (N, C)); cosine scores for L2-normalised inputs."""
    scores = image_embeddings.to(torch.float32) @ weights.to(torch.float32).T
    return scores.argmax(dim=1), scores


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class scores and the confusion matrix (label indices)."""
    yt = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    n_cls = len(labels)
    if yt.shape != yp.shape or yt.size == 0:
        raise ValueError(f"need equally long, non-empty label lists, got {yt.size} and {yp.size}")
    if yt.min() < 0 or yp.min() < 0 or max(yt.max(), yp.max()) >= n_cls:
        raise ValueError(f"labels must be class indices in [0, {n_cls})")
    cm = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(cm, (yt, yp), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(n_cls), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n_cls), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(n_cls), where=(support + predicted) > 0)
    present = (support + predicted) > 0
    return {
        "accuracy": float(tp.sum() / yt.size),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])}
            for i in range(n_cls)
        },
        "confusion_matrix": {"labels": list(labels), "counts": cm.tolist()},
    }


# ---------------------------------------------------------------------------------------------------------
# concept detection


def top_concepts(concept_lists: Iterable[Iterable[str]], k: int) -> list[tuple[str, int]]:
    """The k most frequent concepts with their counts (each concept counted once per image); ties are
    broken by the concept id so the choice is deterministic."""
    counts = Counter(c for concepts in concept_lists for c in set(concepts))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def concept_matrix(concept_lists: Sequence[Iterable[str]], concepts: Sequence[str]) -> np.ndarray:
    """(N, K) bool: image i has concept k (concepts outside ``concepts`` are ignored)."""
    col = {c: j for j, c in enumerate(concepts)}
    out = np.zeros((len(concept_lists), len(concepts)), dtype=bool)
    for i, cs in enumerate(concept_lists):
        for c in cs:
            j = col.get(c)
            if j is not None:
                out[i, j] = True
    return out


def sample_f1(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image F1 of (N, K) bool predictions against (N, K) bool truth (both empty -> 1)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    inter = (pred & truth).sum(axis=1).astype(np.float64)
    denom = (pred.sum(axis=1) + truth.sum(axis=1)).astype(np.float64)
    return np.divide(2 * inter, denom, out=np.ones_like(denom), where=denom > 0)


def concept_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """Sample-averaged F1, precision and recall (conventions in the module docstring), micro-F1 and the
    mean number of predicted / true concepts per image, at ``threshold``."""
    pred = np.asarray(scores) >= threshold
    truth = np.asarray(truth, dtype=bool)
    inter = (pred & truth).sum(axis=1).astype(np.float64)
    n_pred = pred.sum(axis=1).astype(np.float64)
    n_true = truth.sum(axis=1).astype(np.float64)
    both_empty = (n_pred == 0) & (n_true == 0)
    precision = np.where(both_empty, 1.0, np.divide(inter, n_pred, out=np.zeros_like(inter), where=n_pred > 0))
    recall = np.where(both_empty, 1.0, np.divide(inter, n_true, out=np.zeros_like(inter), where=n_true > 0))
    tp, fp_fn = inter.sum(), (n_pred + n_true).sum()
    return {
        "samples_f1": float(sample_f1(pred, truth).mean()),
        "samples_precision": float(precision.mean()),
        "samples_recall": float(recall.mean()),
        "micro_f1": float(2 * tp / fp_fn) if fp_fn > 0 else 1.0,
        "mean_predicted": float(n_pred.mean()),
        "mean_true": float(n_true.mean()),
    }


def choose_threshold(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The global threshold maximising sample-averaged F1 on (scores, truth); returns (threshold, F1).

    Exact over every distinct score (and +inf): lowering the threshold past one score adds one prediction
    to one image and changes only that image's F1, so one sorted sweep evaluates all thresholds in
    O(NK log NK). Among equally good thresholds the highest is returned.
    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if s.shape != truth.shape or s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores {s.shape} and truth {truth.shape} must be equal, non-empty (N, K) arrays")
    n, k = s.shape
    n_true = truth.sum(axis=1).astype(np.float64)
    base = np.where(n_true == 0, 1.0, 0.0)  # F1 with nothing predicted
    flat = s.ravel()
    order = np.argsort(-flat, kind="stable")
    img = (order // k).astype(np.int64)
    hit = truth.ravel()[order].astype(np.float64)
    # m = how many predictions image img[e] has once step e is taken; tp = how many of them are right.
    by_img = np.argsort(img, kind="stable")
    grouped_img = img[by_img]
    starts = np.searchsorted(grouped_img, np.arange(n))
    pos_in_group = np.arange(n * k) - starts[grouped_img]
    cum_hit = np.cumsum(hit[by_img])
    before_group = np.where(starts[grouped_img] > 0, cum_hit[starts[grouped_img] - 1], 0.0)
    m = np.empty(n * k)
    tp = np.empty(n * k)
    m[by_img] = pos_in_group + 1
    tp[by_img] = cum_hit - before_group
    nt = n_true[img]
    f1_new = 2 * tp / (m + nt)
    tp_prev = tp - hit
    f1_old = np.where(m == 1, base[img], 2 * tp_prev / np.maximum(m - 1 + nt, 1))
    totals = base.sum() + np.cumsum(f1_new - f1_old)
    sorted_scores = flat[order]
    cut = np.ones(n * k, dtype=bool)  # a threshold can only sit after the last of equal scores
    cut[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    cand_totals = np.concatenate([[base.sum()], totals[cut]])
    cand_thresholds = np.concatenate([[np.inf], sorted_scores[cut]])
    best = cand_totals.max()
    i = int(np.nonzero(cand_totals >= best - 1e-9)[0][0])
    return float(cand_thresholds[i]), float(cand_totals[i] / n)
