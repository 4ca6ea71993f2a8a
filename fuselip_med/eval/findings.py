"""Multi-label findings: label tables (CheXpert / VinDr-CXR / CT-RATE columns, or a ``labels`` column), the
positive/negative prompt sets, the model's pairwise probability and the metrics per finding.

Labels (CheXpert's convention, Irvin et al. 2019, section 2.2): ``1`` positive, ``0`` negative, ``-1`` uncertain,
blank = not mentioned, read as negative (the CheXpert labeller's "unmentioned" class; recorded as
``blank: negative`` in the output). Float spellings (``1.0``, ``-1.0``) are the same values; anything else is an
unexpected value and its row is skipped (named). ``uncertain`` (:data:`UNCERTAIN_POLICIES`): ``ignore`` leaves a
``-1`` out of that finding's metrics (the row still counts for the other findings), ``positive`` reads it as 1
(CheXpert's U-Ones), ``negative`` as 0 (U-Zeros).

Score (SigLIP's pairwise probability, Zhai et al. 2023, eq. 1): ``p = sigmoid(t * cos(image, prompt) + b)`` with the
model's own ``t = exp(logit_scale)`` and ``b = logit_bias``; the positive and the negative prompt sets of a finding
each become one class weight (prompts averaged and re-normalised, reference section 6.3), and the finding's score is
the positive probability contrasted with the negative one, ``p+ / (p+ + p-)`` in [0, 1].

Metrics per finding (scikit-learn): AUROC (``roc_auc_score``) with its 95% bootstrap interval
(:mod:`fuselip_med.eval.intervals`), average precision (``average_precision_score``), and F1 / sensitivity /
specificity (``f1_score``, ``recall_score`` of the positive and of the negative class) at a threshold chosen on the
validation rows: Youden's J = max(TPR - FPR) over ``roc_curve`` (default) or the maximum F1 over
``precision_recall_curve`` (``max-f1``). Macro = the mean over findings; micro = the same metric over every
(image, finding) cell pooled (each finding's own threshold applied).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselip_med.errors import UserError

from .intervals import AurocResampler, bootstrap_counts, percentile_interval

__all__ = ["UNCERTAIN_POLICIES", "THRESHOLD_RULES", "PromptSet", "PromptFileError", "LabelValueError",
           "parse_label", "apply_policy", "read_prompts", "default_prompts", "prompts_for", "pairwise_scores",
           "choose_threshold", "at_threshold", "findings_metrics", "logit_params"]

UNCERTAIN_POLICIES: tuple[str, ...] = ("ignore", "positive", "negative")
THRESHOLD_RULES: tuple[str, ...] = ("youden", "max-f1")
_DEFAULT_PROMPTS = Path(__file__).with_name("data") / "findings_prompts.yaml"


class PromptFileError(UserError, ValueError):
    """A ``--prompts`` file that cannot be read or does not follow the documented YAML layout."""


class LabelValueError(ValueError):
    """A finding cell that is not 1 / 0 / -1 / blank."""


def parse_label(value: Any) -> float:
    """A label cell -> 1.0, 0.0, -1.0, or NaN for blank; ``LabelValueError`` for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return float("nan")
    text = str(value).strip()
    if text == "":
        return float("nan")
    try:
        number = float(text)
    except ValueError:
        raise LabelValueError(f"unexpected label value {text!r} (expected 1, 0, -1 or blank)") from None
    if number not in (1.0, 0.0, -1.0):
        raise LabelValueError(f"unexpected label value {text!r} (expected 1, 0, -1 or blank)")
    return number


def apply_policy(labels: np.ndarray, uncertain: str) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` [N, K] float (1 / 0 / -1 / NaN) -> (truth [N, K] bool, scored [N, K] bool): blank is negative,
    ``-1`` follows ``uncertain`` (module docstring); ``scored`` is False where a cell is left out."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {uncertain!r}: choose from {', '.join(UNCERTAIN_POLICIES)}")
    lab = np.asarray(labels, dtype=np.float64)
    unc = lab == -1
    truth = (lab == 1) | (unc & (uncertain == "positive"))
    scored = ~unc if uncertain == "ignore" else np.ones_like(unc)
    return truth, scored


@dataclass(frozen=True)
class PromptSet:
    """One finding's prompts: ``positive`` (the finding is present) and ``negative`` (it is absent)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]


def _load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    file = Path(path).expanduser()
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptFileError(f"prompts file {file} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PromptFileError(f"prompts file {file} is not UTF-8 YAML: {error}") from None
    if not isinstance(content, dict):
        raise PromptFileError(f"prompts file {file}: expected a mapping with 'default' and/or 'findings'")
    return content


def _prompt_set(entry: Any, where: str) -> PromptSet:
    if not isinstance(entry, Mapping) or set(entry) != {"positive", "negative"}:
        raise PromptFileError(f"{where}: expected exactly the keys 'positive' and 'negative' (lists of prompts)")
    out = {}
    for side in ("positive", "negative"):
        texts = entry[side]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise PromptFileError(f"{where}.{side}: expected a non-empty list of prompts")
        out[side] = tuple(t.strip() for t in texts)
    return PromptSet(**out)


def read_prompts(path: str | os.PathLike | None = None) -> tuple[PromptSet, dict[str, PromptSet]]:
    """(default templates, {finding: prompts}) from a prompts YAML (``None``: the shipped defaults)::

        default:              # templates for a finding not listed below; {c} = the finding's name
          positive: ["{c}.", "a chest radiograph showing {c}."]
          negative: ["no {c}.", "no evidence of {c}."]
        findings:
          Pleural Effusion:
            positive: ["pleural effusion.", "blunting of the costophrenic angle."]
            negative: ["no pleural effusion.", "clear costophrenic angles."]

    Raises :class:`PromptFileError` naming the file and key that do not follow this layout."""
    content = _load_yaml(path or _DEFAULT_PROMPTS)
    unknown = set(content) - {"default", "findings"}
    if unknown:
        raise PromptFileError(f"prompts file {path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              "use 'default' and 'findings'")
    shipped = read_prompts() if path is not None and "default" not in content else None
    default = _prompt_set(content["default"], f"{path}: default") if "default" in content else shipped[0]
    for side in (default.positive, default.negative):
        if not all("{c}" in t for t in side):
            raise PromptFileError(f"prompts file {path}: every default template needs {{c}} for the finding")
    findings = content.get("findings") or {}
    if not isinstance(findings, Mapping):
        raise PromptFileError(f"prompts file {path}: 'findings' must map finding names to prompt sets")
    return default, {str(k): _prompt_set(v, f"{path}: findings.{k}") for k, v in findings.items()}


def default_prompts() -> tuple[PromptSet, dict[str, PromptSet]]:
    """The shipped prompt sets (``fuselip_med/eval/data/findings_prompts.yaml``)."""
    return read_prompts(None)


def prompts_for(names: Sequence[str], default: PromptSet, findings: Mapping[str, PromptSet]) -> dict[str, PromptSet]:
    """The prompt set of each finding: its own entry (matched case-insensitively), else the default templates."""
    lower = {k.lower(): v for k, v in findings.items()}
    out = {}
    for name in names:
        own = lower.get(name.lower())
        out[name] = own or PromptSet(tuple(t.format(c=name.lower()) for t in default.positive),
                                     tuple(t.format(c=name.lower()) for t in default.negative))
    return out


def pairwise_scores(images: np.ndarray, positive: np.ndarray, negative: np.ndarray, scale: float,
                    bias: float) -> np.ndarray:
    """[N, K] float64 finding scores ``p+ / (p+ + p-)`` (module docstring) from ``images`` [N, D], ``positive`` and
    ``negative`` [K, D] L2-normalised float embeddings, ``scale`` t (> 0) and ``bias`` b of the model.

    Computed as ``sigmoid(log p+ - log p-)`` (the same value, without overflow)."""
    img = np.asarray(images, dtype=np.float64)
    zp = scale * (img @ np.asarray(positive, dtype=np.float64).T) + bias
    zn = scale * (img @ np.asarray(negative, dtype=np.float64).T) + bias
    log_sig = lambda z: -np.logaddexp(0.0, -z)  # noqa: E731  log sigmoid(z)
    return 1.0 / (1.0 + np.exp(log_sig(zn) - log_sig(zp)))


def choose_threshold(y: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
    """The threshold (predict positive iff score >= it) that maximises Youden's J (``roc_curve``) or F1
    (``precision_recall_curve``) on validation rows ``y`` [n] bool, ``scores`` [n]; NaN when ``y`` has a single
    class. The first maximum in scikit-learn's order wins (the highest threshold for Youden, the lowest for F1)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r}: choose from {', '.join(THRESHOLD_RULES)}")
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    if rule == "youden":
        fpr, tpr, thresholds = roc_curve(y, scores)
        return float(thresholds[int(np.argmax(tpr - fpr))])
    precision, recall, thresholds = precision_recall_curve(y, scores)
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(thresholds[int(np.argmax(f1))])


def at_threshold(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """F1, sensitivity (recall of the positives) and specificity (recall of the negatives) of [n] bool predictions
    ``pred`` against [n] bool truth ``y`` (scikit-learn; 0 where undefined)."""
    from sklearn.metrics import f1_score, recall_score

    return {"F1": float(f1_score(y, pred, zero_division=0.0)),
            "sensitivity": float(recall_score(y, pred, pos_label=1, zero_division=0.0)),
            "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0.0))}


def findings_metrics(names: Sequence[str], scores: np.ndarray, labels: np.ndarray, valid_scores: np.ndarray,
                     valid_labels: np.ndarray, *, uncertain: str = "ignore", threshold_rule: str = "youden",
                     n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-finding, macro and micro metrics (module docstring).

    ``scores`` [N, K] float test scores, ``labels`` [N, K] float (1 / 0 / -1 / NaN) test labels; ``valid_scores``
    [M, K] and ``valid_labels`` [M, K] the validation role's, used only to choose each finding's threshold.
    Returns ``{"metrics": {macro_*/micro_*}, "per_finding": {name: {AUROC, AUROC_ci, AP, threshold, F1,
    sensitivity, specificity, n_positive, n_negative, n_uncertain, n_scored}}, "intervals", "n_boot"}``.
    A finding whose test rows hold a single class has no AUROC/AP (NaN, left out of the macro means).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    truth, scored = apply_policy(labels, uncertain)
    v_truth, v_scored = apply_policy(valid_labels, uncertain)
    n, k = scores.shape
    boot = np.full((n_boot, k), np.nan)
    defined = np.zeros(k, dtype=bool)
    per: dict[str, dict[str, Any]] = {}
    preds = np.zeros((n, k), dtype=bool)
    thresholds = np.full(k, np.nan)
    for j, name in enumerate(names):
        m, y, s = scored[:, j], truth[scored[:, j], j], scores[scored[:, j], j]
        entry: dict[str, Any] = {"n_positive": int(y.sum()), "n_negative": int((~y).sum()),
                                 "n_uncertain": int((labels[:, j] == -1).sum()), "n_scored": int(m.sum())}
        defined[j] = 0 < y.sum() < y.size
        entry["AUROC"] = float(roc_auc_score(y, s)) if defined[j] else float("nan")
        entry["AP"] = float(average_precision_score(y, s)) if defined[j] else float("nan")
        thresholds[j] = choose_threshold(v_truth[v_scored[:, j], j], valid_scores[v_scored[:, j], j], threshold_rule)
        entry["threshold"] = float(thresholds[j])
        preds[:, j] = scores[:, j] >= thresholds[j]
        entry.update(at_threshold(y, preds[m, j]) if not math.isnan(thresholds[j]) and y.size else
                     {"F1": float("nan"), "sensitivity": float("nan"), "specificity": float("nan")})
        per[name] = entry
    resamplers = {j: AurocResampler(truth[scored[:, j], j], scores[scored[:, j], j], np.flatnonzero(scored[:, j]))
                  for j in np.flatnonzero(defined)}
    start = 0
    for counts in bootstrap_counts(n, n_boot, seed):  # the same resamples for every finding
        for j, resample in resamplers.items():
            boot[start:start + len(counts), j] = resample(counts)
        start += len(counts)
    for j, name in enumerate(names):
        low, high, n_def = percentile_interval(boot[:, j])
        per[name]["AUROC_ci"] = [low, high]
        per[name]["n_boot_defined"] = n_def
    use = np.flatnonzero(defined)
    macro = {key: float(np.nanmean([per[names[j]][key] for j in use])) if len(use) else float("nan")
             for key in ("AUROC", "AP", "F1", "sensitivity", "specificity")}
    macro_ci = percentile_interval(boot[:, use].mean(axis=1)) if len(use) else (float("nan"),) * 2 + (0,)
    flat_y, flat_s = truth[scored], scores[scored]
    both = 0 < flat_y.sum() < flat_y.size
    cells = scored & ~np.isnan(thresholds)[None, :]  # F1 & co. where a threshold was chosen
    micro = {"AUROC": float(roc_auc_score(flat_y, flat_s)) if both else float("nan"),
             "AP": float(average_precision_score(flat_y, flat_s)) if both else float("nan"),
             **(at_threshold(truth[cells], preds[cells]) if cells.any() else {})}
    metrics = {f"macro_{k}": v for k, v in macro.items()}
    metrics.update({f"micro_{k}": v for k, v in micro.items()})
    return {"metrics": metrics, "per_finding": per, "n_boot": n_boot,
            "intervals": {"macro_AUROC": [macro_ci[0], macro_ci[1]],
                          **{f"{name}_AUROC": per[name]["AUROC_ci"] for name in names}}}


def logit_params(model: Any) -> tuple[float, float, str]:
    """(t, b, where they came from) of a model's sigmoid loss: ``t = exp(logit_scale)``, ``b = logit_bias``
    (FuseLIP and the SigLIP baselines); (1, 0, "none: cosine") for a model without them (then the score is the
    contrast of cosine similarities through the same formula)."""
    scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
    if scale is None or bias is None:
        return 1.0, 0.0, "none: cosine"
    value = lambda x: float(x.detach()) if hasattr(x, "detach") else float(x)  # noqa: E731
    return math.exp(value(scale)), value(bias), "model logit_scale (exp) and logit_bias"
