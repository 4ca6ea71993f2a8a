"""``findings``: multi-label findings with AUROC (bootstrap interval), AP and thresholded F1 / sensitivity /
specificity; the scoring and metric conventions are in :mod:`fuselip_med.eval.findings`.

Tables (roles ``findings`` = the rows scored, ``findings_valid`` = the rows that choose each finding's threshold),
read as published:

- CheXpert (Irvin et al. 2019; ``train.csv`` / ``valid.csv`` of CheXpert-v1.0 and -small): ``Path`` (relative to
  the folder holding ``CheXpert-v1.0-small/``), ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14
  observation columns with ``1.0`` / ``0.0`` / ``-1.0`` / blank. The 5x200 CSVs and MIMIC-CXR's CheXpert-labeller
  tables (``Path``/``dicom_id``/``subject_id``/``study_id``) follow the same columns.
- VinDr-CXR (Nguyen et al. 2022; ``annotations/image_labels_test.csv``, ``image_labels_train.csv``):
  ``image_id`` (+ ``rad_id`` in train: one row per radiologist, merged here as positive if any radiologist marked
  the finding) and 28 columns of 0/1; the image is ``<split>/<image_id>.dicom`` beside or above the table.
- CT-RATE (Hamamci et al. 2024; ``multi_abnormality_labels.csv``): ``VolumeName`` and 18 columns of 0/1 are read;
  the image is looked up by that name beside the table, so a rendered 2-D image must sit there (the NIfTI volumes
  themselves do not decode in this 2-D pipeline and become named skips).
- Any table with a ``labels`` column of ``;``-joined finding names (and a path column ``path``/``image``/
  ``filepath``/``filename``): each listed finding positive, every other finding negative.

Finding columns are the columns whose non-blank cells are mostly labels (1 / 0 / -1); ``--labels FILE`` picks
them by name instead. A row with another value in a finding column, or whose image is missing, is a named skip.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from .. import classification as cls, findings as fnd
from .context import EvalContext
from .files import IMAGE_SUFFIXES, check_half, read_table, resolve_image

__all__ = ["FindingsTable", "read_findings_table", "score_findings", "run"]

_PATH_COLUMNS = ("Path", "path", "image", "filepath", "filename", "image_path", "VolumeName", "image_id",
                 "patientId")
_META_COLUMNS = {"Sex", "Age", "Frontal/Lateral", "AP/PA", "rad_id", "dicom_id", "subject_id", "study_id", "Report",
                 "Report Impression", "labels", "id", "ID", "split", "ViewPosition", "Study"}


@dataclass
class FindingsTable:
    """Rows of a label table: ``ids``, ``images`` (paths), ``labels`` [N, K] float (1 / 0 / -1 / NaN) over
    ``names``, the rows it could not use (``skipped``) and ``n_listed``."""

    name: str
    names: list[str]
    ids: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    skipped: SkipReport = field(default_factory=SkipReport)
    n_listed: int = 0


def _finding_columns(frame, names: list[str] | None) -> list[str]:
    if names is not None:
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise InputError(f"finding column(s) {', '.join(map(repr, missing))} are not in the table (columns: "
                             f"{', '.join(frame.columns)})")
        return list(names)
    out = []
    for column in frame.columns:
        if column in _META_COLUMNS or column in _PATH_COLUMNS:
            continue
        values = [v for v in frame[column].tolist() if v.strip()]
        parsed = sum(1 for v in values if _is_label(v))
        if values and 2 * parsed > len(values):
            out.append(column)
    return out


def _is_label(value: str) -> bool:
    try:
        fnd.parse_label(value)
    except fnd.LabelValueError:
        return False
    return True


def _image_of(path: str | os.PathLike, column: str, value: str) -> Path | None:
    if column == "image_id":  # VinDr-CXR: <split>/<image_id>.dicom beside the annotations folder
        stem = Path(path).stem
        splits = [s for s in ("test", "train") if s in stem] or ["test", "train"]
        return resolve_image(path, value, folders=("", *splits), suffixes=IMAGE_SUFFIXES)
    return resolve_image(path, value, suffixes=("", *IMAGE_SUFFIXES))


def read_findings_table(path: str | os.PathLike, names: list[str] | None = None) -> FindingsTable:
    """Read a findings label table (formats in the module docstring). ``names``: the finding columns or labels to
    use (default: all). Raises ``ValueError`` when the table has no path column or no finding."""
    frame = read_table(path, "findings table")
    column = next((c for c in _PATH_COLUMNS if c in frame.columns), None)
    if column is None:
        raise InputError(f"{path}: no image column (one of {', '.join(_PATH_COLUMNS)})")
    if "labels" in frame.columns:
        lists = [[x.strip() for x in v.split(";") if x.strip()] for v in frame["labels"].tolist()]
        findings = names or sorted({x for xs in lists for x in xs})
        labels = np.array([[1.0 if f in set(xs) else 0.0 for f in findings] for xs in lists]).reshape(-1, len(findings))
        bad = [None] * len(frame)
    else:
        findings = _finding_columns(frame, names)
        labels = np.full((len(frame), len(findings)), np.nan)
        bad = [None] * len(frame)
        for j, f in enumerate(findings):
            for i, v in enumerate(frame[f].tolist()):
                try:
                    labels[i, j] = fnd.parse_label(v)
                except fnd.LabelValueError as error:
                    bad[i] = bad[i] or f"column {f!r}: {error}"
    if not findings:
        raise InputError(f"{path}: no finding column (cells 1 / 0 / -1 / blank) and no 'labels' column")
    out = FindingsTable(name=Path(path).name, names=list(findings), n_listed=len(frame))
    rows: dict[str, int] = {}
    kept_labels: list[np.ndarray] = []
    for i, value in enumerate(frame[column].tolist()):
        row_id = value or f"line {i + 2}"
        if bad[i]:
            out.skipped.add(row_id, f"{path}:{i + 2}", "unexpected label value", bad[i])
            continue
        image = _image_of(path, column, value)
        if image is None:
            out.skipped.add(row_id, f"{path}:{i + 2}", "missing image", value)
            continue
        if row_id in rows:  # VinDr-CXR train: one row per radiologist -> positive if any marked it
            k = rows[row_id]
            kept_labels[k] = np.fmax(kept_labels[k], labels[i])
            out.n_listed -= 1  # a second radiologist's row of an image already listed
            continue
        rows[row_id] = len(out.ids)
        out.ids.append(row_id)
        out.images.append(image)
        kept_labels.append(labels[i].copy())
    out.labels = np.array(kept_labels).reshape(-1, len(findings))
    return out


def score_findings(ctx: EvalContext, images: list[Path], names: list[str]) -> tuple[np.ndarray, list[int], dict]:
    """([N', K] finding scores of the images that decoded, their positions, {"logit_scale", "logit_bias",
    "source", "prompts"}) with the run's prompt sets (``--prompts`` or the shipped ones)."""
    o = ctx.opts
    default, own = fnd.read_prompts(o.prompts) if o.prompts else fnd.default_prompts()
    sets = fnd.prompts_for(names, default, own)
    items = [EmbedItem(image=str(p)) for p in images]
    texts = [EmbedItem(text=t) for s in sets.values() for t in (*s.positive, *s.negative)]
    table = ctx.embedder.embed(items + texts, desc="embedding findings images and prompts")
    keep = [i for i, it in enumerate(items) if it.key in table]
    weights = {side: cls.class_weights([table.lookup(("text", t) for t in getattr(sets[n], side)) for n in names])
               for side in ("positive", "negative")}
    t, b, source = fnd.logit_params(ctx.embedder.model)
    img = table.lookup(items[i].key for i in keep).numpy() if keep else np.zeros((0, table.dim))
    scores = fnd.pairwise_scores(img, weights["positive"].numpy(), weights["negative"].numpy(), t, b)
    info = {"logit_scale": t, "logit_bias": b, "score_source": source,
            "prompts": {n: {"positive": list(s.positive), "negative": list(s.negative)} for n, s in sets.items()}}
    return scores, keep, info


def _scored_table(ctx: EvalContext, role: str, names: list[str] | None):
    table = read_findings_table(ctx.path(role), names)
    failed = ctx.embedder.table.failed
    scores, keep, info = score_findings(ctx, table.images, names or table.names)
    kept = set(keep)
    for i, image in enumerate(table.images):
        if i not in kept:
            table.skipped.add(table.ids[i], str(image), failed.get(("image", f"path:{image}"), "not decoded"))
    ctx.add_skips(table.skipped)
    check_half(table.name, len(keep), table.n_listed, table.skipped, ctx.allow_partial)
    return table, scores, keep, info


def run(ctx: EvalContext) -> dict:
    """Per-finding AUROC [95% CI], AP, F1 / sensitivity / specificity at the validation-chosen thresholds; macro
    and micro averages; the uncertain policy, threshold rule, prompts and row counts recorded."""
    o = ctx.opts
    test, scores, keep, info = _scored_table(ctx, "findings", list(o.labels) if o.labels else None)
    valid, v_scores, v_keep, _ = _scored_table(ctx, "findings_valid", test.names)
    res = fnd.findings_metrics(test.names, scores, test.labels[keep], v_scores, valid.labels[v_keep],
                               uncertain=o.uncertain, threshold_rule=o.threshold_rule, n_boot=o.n_boot, seed=o.seed)
    res["metrics"].update({f"{name}_AUROC": e["AUROC"] for name, e in res["per_finding"].items()})
    res["metrics"] = {k: v for k, v in res["metrics"].items() if not (isinstance(v, float) and math.isnan(v))}
    res["counts"] = {"macro_AUROC": len(keep), **{f"{n}_AUROC": e["n_scored"] for n, e in res["per_finding"].items()}}
    res.update(info)
    res.update({"n": len(keep), "n_listed": test.n_listed, "n_evaluated": len(keep),
                "n_valid": len(v_keep), "findings": test.names, "uncertain": o.uncertain, "blank": "negative",
                "threshold_rule": o.threshold_rule, "threshold_role": "findings_valid",
                "skipped": test.skipped.by_reason(), "skip_examples": test.skipped.examples,
                "rows": {"count": len(keep), "ids": [test.ids[i] for i in keep]}})
    return res
