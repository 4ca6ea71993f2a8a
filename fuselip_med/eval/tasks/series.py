"""Evaluation over series (CT-RATE layouts): ``series-zero-shot`` and ``series-retrieval``.

Data roles: ``volumes`` (a folder, DICOMDIR, NIfTI file or CSV of them: ``data.studies.find_series``),
``series_labels`` (CT-RATE's ``multi_abnormality_labels.csv``: ``VolumeName`` + one 0/1 column per abnormality),
``series_reports`` (CT-RATE's reports CSV: ``VolumeName``, ``Findings_EN``, ``Impressions_EN``, ...), and
optionally ``series_keys`` (an ``embed --unit series`` output whose salt keys DICOM series the way the labels do).
Rows are matched by ``VolumeName`` (the NIfTI file name) or, for DICOM series, by a ``series`` column holding
salted series keys. Series vectors: ``inference.units.embed_series`` (``--slices`` 16, plain rendering).

* zero-shot: per abnormality, score = cos(series, "There is {c}.") - cos(series, "There is no {c}.") (the
  positive/negative prompt pair of CT-CLIP's zero-shot evaluation, Hamamci et al. 2024, CT-RATE); AUROC per
  abnormality (scikit-learn ``roc_auc_score``; an abnormality with one class only is reported as skipped) and
  their mean.
* retrieval: series <-> report text (Findings_EN + Impressions_EN), R@1/5/10 both ways
  (``eval.retrieval.retrieval_metrics``).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from .context import EvalContext

__all__ = ["KEY_COLUMNS", "REPORT_COLUMNS", "read_keyed_table", "run_retrieval", "run_zero_shot"]

KEY_COLUMNS = ("VolumeName", "series")
REPORT_COLUMNS = ("Findings_EN", "Impressions_EN")
PROMPTS = ("There is {c}.", "There is no {c}.")


def read_keyed_table(path: str, what: str) -> tuple[str, list[dict[str, str]]]:
    """(key column, rows) of a CSV keyed by ``VolumeName`` or ``series``; ``ValueError`` naming the file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} file {file} does not exist")
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        key = next((c for c in KEY_COLUMNS if c in columns), None)
        if key is None:
            raise InputError(f"{what} file {file} has no VolumeName or series column (columns: {', '.join(columns)})")
        return key, [row for row in reader if row.get(key)]


def _series_vectors(ctx: EvalContext, skips: SkipReport) -> dict[str, np.ndarray]:
    """{series key: [D] float32 series vector} of the ``volumes`` data (NIfTI keys: the file name)."""
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.studies import find_series
    from fuselip_med.embed import stored_salt
    from fuselip_med.inference.units import embed_series

    salt = stored_salt(ctx.path("series_keys")) if ctx.has("series_keys") else None
    series = find_series(ctx.path("volumes"), Pseudonyms(salt) if salt else Pseudonyms.fresh(), skips)
    embedded = embed_series(ctx.embedder.model, series, skips=skips, progress=ctx.embedder.progress)
    return {item.series.key: item.vector for item in embedded}


def _match(rows: list[dict], key: str, vectors: dict, skips: SkipReport, what: str) -> list[dict]:
    kept = []
    for row in rows:
        if row[key] in vectors:
            kept.append(row)
        else:
            skips.add(row[key], what, "no series for this row")
    if not kept:
        raise InputError(f"no {what} row matches a series of the volumes ({skips.summary()})")
    return kept


def _texts(ctx: EvalContext, texts: list[str]) -> torch.Tensor:
    return ctx.embedder.embeddings([EmbedItem(text=t) for t in texts], desc="embedding texts")


def run_zero_shot(ctx: EvalContext) -> dict:
    """Per-abnormality AUROC and their mean over the labelled series."""
    from sklearn.metrics import roc_auc_score

    skips = SkipReport()
    key, rows = read_keyed_table(ctx.path("series_labels"), "labels")
    vectors = _series_vectors(ctx, skips)
    rows = _match(rows, key, vectors, skips, "labels")
    classes = [c for c in rows[0] if c not in KEY_COLUMNS and c not in ("AccessionNo",)]
    series = torch.as_tensor(np.stack([vectors[r[key]] for r in rows]))
    positive = _texts(ctx, [PROMPTS[0].format(c=c) for c in classes])
    negative = _texts(ctx, [PROMPTS[1].format(c=c) for c in classes])
    scores = (series @ positive.T - series @ negative.T).numpy()  # [N, C]
    auroc, single_class = {}, []
    for j, name in enumerate(classes):
        truth = np.array([int(float(r[name] or 0)) for r in rows])
        if truth.min() == truth.max():
            single_class.append(name)
            continue
        auroc[name] = float(roc_auc_score(truth, scores[:, j]))
    metrics = {f"auroc/{name}": value for name, value in auroc.items()}
    if auroc:
        metrics["mean_auroc"] = float(np.mean(list(auroc.values())))
    return {"metrics": metrics, "n": len(rows), "single_class": single_class, "skipped": skips.by_reason(),
            "skip_examples": skips.examples}


def run_retrieval(ctx: EvalContext) -> dict:
    """Series <-> report retrieval R@1/5/10 both ways over the series that have a report."""
    from ..retrieval import retrieval_metrics

    skips = SkipReport()
    key, rows = read_keyed_table(ctx.path("series_reports"), "reports")
    missing = [c for c in REPORT_COLUMNS if c not in rows[0]] if rows else list(REPORT_COLUMNS)
    if len(missing) == len(REPORT_COLUMNS):
        raise InputError(f"reports file {ctx.path('series_reports')} has neither {' nor '.join(REPORT_COLUMNS)}")
    vectors = _series_vectors(ctx, skips)
    rows = _match(rows, key, vectors, skips, "reports")
    texts = [" ".join((r.get(c) or "").strip() for c in REPORT_COLUMNS).strip() for r in rows]
    keep = [i for i, t in enumerate(texts) if t]
    for i in set(range(len(rows))) - set(keep):
        skips.add(rows[i][key], "reports", "empty report")
    series = torch.as_tensor(np.stack([vectors[rows[i][key]] for i in keep]))
    reports = _texts(ctx, [texts[i] for i in keep])
    ids = [rows[i][key] for i in keep]
    metrics, _ = retrieval_metrics(series, reports, ids, ids, names=("series", "report"))
    return {"metrics": metrics, "n": len(keep), "skipped": skips.by_reason(), "skip_examples": skips.examples}
