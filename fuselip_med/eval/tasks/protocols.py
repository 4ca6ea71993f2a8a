"""Published radiology protocols, seeded and with their rows written out: ``roco2k``, ``chexpert5x200``,
``mimic5x200`` and ``rsna-pneumonia``. Each result names its ``protocol``, its ``seed`` and the exact ``rows`` used
(``{"count", "ids", "file"}``; the file, ``<task>_rows.txt`` beside ``metrics.json``, lists one ID per line).

- ROCO-2k (PMC-CLIP, Lin et al. 2023, section 4.2: 2,000 image-caption pairs of the ROCO test split, R@1/5/10 both
  directions). PMC-CLIP's draw is unseeded; here the 2,000 rows of role ``test`` are
  ``numpy.random.default_rng(seed).choice(n, 2000, replace=False)`` (sorted), scored as one pool
  (:func:`fuselip_med.eval.retrieval.evaluate_retrieval`), with exact binomial intervals on each R@k.
- CheXpert 5x200 (GLoRIA, Huang et al. 2021, section 4.1: 200 images for each of Atelectasis, Cardiomegaly,
  Consolidation, Edema and Pleural Effusion, each positive for exactly that one of the five; the published
  ``chexpert_5x200.csv`` has CheXpert's columns ``Path``, ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA``, the 14
  observations and ``Report Impression``) and MIMIC-CXR 5x200 (the same five classes; ``Path`` under MIMIC-CXR-JPG,
  ``dicom_id``, ``subject_id``, ``study_id``, ``Report`` and the five class columns): zero-shot five-way
  classification, each class weighted by its positive prompt set of :mod:`fuselip_med.eval.findings`; accuracy
  with its binomial interval, balanced accuracy, macro-F1 and the confusion matrix. A row positive for none or
  several of the five classes is a named skip.
- RSNA Pneumonia (the RSNA 2018 challenge's ``stage_2_train_labels.csv``: ``patientId``, ``x``, ``y``, ``width``,
  ``height``, ``Target``; one row per box, so a patient may be listed several times; the image is
  ``stage_2_train_images/<patientId>.dcm``): one label per patient (Target 1 on any row), scored with the
  ``Pneumonia`` prompt sets as the ``findings`` task scores (model's logit scale and bias); AUROC with its bootstrap
  interval, AP, and accuracy / F1 / sensitivity / specificity at score >= 0.5 (the positive prompts more probable
  than the negative ones: no threshold is fitted).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem
from fuselip_med.io import atomic_write_text

from .. import classification as cls, findings as fnd
from ..intervals import binomial_interval, bootstrap_auroc, percentile_interval
from ..retrieval import evaluate_retrieval
from .context import EvalContext
from .files import IMAGE_SUFFIXES, check_half, read_table, resolve_image

__all__ = ["ROCO2K_SIZE", "FIVE_CLASSES", "run_roco2k", "run_chexpert5x200", "run_mimic5x200", "run_rsna",
           "read_five_by_200", "read_rsna"]

ROCO2K_SIZE = 2000
FIVE_CLASSES: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _rows(ctx: EvalContext, task: str, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(ids), "ids": ids}
    if ctx.opts.out_dir is not None:
        out["file"] = str(atomic_write_text(Path(ctx.opts.out_dir) / f"{task}_rows.txt", "\n".join(ids) + "\n"))
    return out


def run_roco2k(ctx: EvalContext) -> dict:
    """ROCO-2k: image <-> caption R@1/5/10 on 2,000 seeded test pairs (module docstring)."""
    o = ctx.opts
    ic, keep, img, txt = ctx.embed_image_caption("test")
    n = len(keep)
    size = min(ROCO2K_SIZE, n)
    drawn = np.sort(np.random.default_rng(o.seed).choice(n, size=size, replace=False))
    sel = [keep[i] for i in drawn]
    res = evaluate_retrieval(img[drawn], txt[drawn], [ic.images[i].image_key for i in sel],
                             [ic.texts[i].text for i in sel], pool_size=None, seed=o.seed, chunk_size=o.chunk_size)
    res.pop("full_pool")
    res["intervals"] = {k: list(binomial_interval(round(v * size), size)) for k, v in res["metrics"].items()
                        if "R@" in k}
    res["counts"] = {k: size for k in res["intervals"]}
    res.update(ctx.rows(ic, keep))
    res.update({"protocol": f"ROCO-2k (PMC-CLIP): {size} test pairs drawn without replacement by "
                            f"numpy.random.default_rng({o.seed}).choice", "seed": o.seed,
                "rows": _rows(ctx, "roco2k", [ic.ids[i] for i in sel])})
    if size < ROCO2K_SIZE:
        res["requested_rows"] = ROCO2K_SIZE
    return res


def read_five_by_200(path: str, name: str) -> tuple[list[str], list[Path], list[int], SkipReport, int]:
    """(ids, images, class indices into :data:`FIVE_CLASSES`, named skips, rows listed) of a 5x200 CSV."""
    frame = read_table(path, name)
    column = next((c for c in ("Path", "path", "imgpath") if c in frame.columns), None)
    absent = [c for c in FIVE_CLASSES if c not in frame.columns]
    if column is None or absent:
        raise InputError(f"{name}: {path} needs a Path column and the class columns {', '.join(FIVE_CLASSES)} "
                         f"(missing: {', '.join(absent) or 'Path'})")
    ids, images, labels, skips = [], [], [], SkipReport()
    for i, row in enumerate(frame.to_dict("records")):
        rid = row.get("dicom_id") or row[column] or f"line {i + 2}"
        try:
            values = [fnd.parse_label(row[c]) for c in FIVE_CLASSES]
        except fnd.LabelValueError as error:
            skips.add(rid, f"{path}:{i + 2}", "unexpected label value", str(error))
            continue
        positive = [k for k, v in enumerate(values) if v == 1.0]
        image = resolve_image(path, row[column], suffixes=("", *IMAGE_SUFFIXES))
        if len(positive) != 1:
            skips.add(rid, f"{path}:{i + 2}", "not exactly one of the five classes positive",
                      ", ".join(FIVE_CLASSES[k] for k in positive) or "none")
        elif image is None:
            skips.add(rid, f"{path}:{i + 2}", "missing image", row[column])
        else:
            ids.append(rid)
            images.append(image)
            labels.append(positive[0])
    return ids, images, labels, skips, len(frame)


def _five_by_200(ctx: EvalContext, role: str, task: str, name: str) -> dict:
    ids, images, labels, skips, listed = read_five_by_200(ctx.path(role), name)
    ctx.add_skips(skips)
    check_half(name, len(ids), listed, skips, ctx.allow_partial)
    o = ctx.opts
    default, own = fnd.read_prompts(o.prompts) if o.prompts else fnd.default_prompts()
    sets = fnd.prompts_for(FIVE_CLASSES, default, own)
    items = [EmbedItem(image=str(p)) for p in images]
    texts = [EmbedItem(text=t) for s in sets.values() for t in s.positive]
    table = ctx.embedder.embed(items + texts, desc=f"embedding {name}")
    keep = [i for i, it in enumerate(items) if it.key in table]
    for i, it in enumerate(items):
        table.name_skip(skips, it.key, ids[i], str(images[i]), missing="not decoded")
    check_half(name, len(keep), listed, skips, ctx.allow_partial)
    weights = cls.class_weights([table.lookup(("text", t) for t in sets[c].positive) for c in FIVE_CLASSES])
    pred, _ = cls.zero_shot_predict(table.lookup(items[i].key for i in keep), weights)
    m = cls.classification_metrics([labels[i] for i in keep], pred.tolist(), list(FIVE_CLASSES))
    hits = int(round(m["accuracy"] * len(keep)))
    return {"metrics": {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                        "macro_f1": m["macro_f1"], "chance_accuracy": 1 / 5},
            "intervals": {"accuracy": list(binomial_interval(hits, len(keep)))}, "counts": {"accuracy": len(keep)},
            "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"], "n": len(keep),
            "n_listed": listed, "n_evaluated": len(keep), "skipped": skips.by_reason(),
            "skip_examples": skips.examples, "seed": None,
            "protocol": f"{name}: zero-shot 5-way classification ({', '.join(FIVE_CLASSES)}), positive prompt sets",
            "prompts": {c: list(sets[c].positive) for c in FIVE_CLASSES},
            "rows": _rows(ctx, task, [ids[i] for i in keep])}


def run_chexpert5x200(ctx: EvalContext) -> dict:
    """CheXpert 5x200 zero-shot classification (module docstring)."""
    return _five_by_200(ctx, "chexpert5x200", "chexpert5x200", "CheXpert 5x200")


def run_mimic5x200(ctx: EvalContext) -> dict:
    """MIMIC-CXR 5x200 zero-shot classification (module docstring)."""
    return _five_by_200(ctx, "mimic5x200", "mimic5x200", "MIMIC-CXR 5x200")


def read_rsna(path: str) -> tuple[list[str], list[Path], list[int], SkipReport, int]:
    """(patientIds, DICOM paths, Target per patient, named skips, patients listed) of ``stage_2_train_labels.csv``."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "stage_2_train_labels.csv"
    frame = read_table(file, "RSNA Pneumonia")
    if not {"patientId", "Target"} <= set(frame.columns):
        raise InputError(f"RSNA Pneumonia: {file} needs the columns patientId and Target")
    target: dict[str, int | None] = {}
    skips = SkipReport()
    for i, row in enumerate(frame.to_dict("records")):
        pid, value = row["patientId"], row["Target"].strip()
        if value not in ("0", "1"):
            skips.add(pid or f"line {i + 2}", f"{file}:{i + 2}", "unexpected label value", f"Target {value!r}")
            target[pid] = None
        elif target.get(pid, 0) is not None:
            target[pid] = max(target.get(pid, 0), int(value))
    ids, images, labels = [], [], []
    for pid, value in target.items():
        if value is None:
            continue
        image = resolve_image(file, pid, folders=("stage_2_train_images", ""), suffixes=(".dcm",))
        if image is None:
            skips.add(pid, str(file), "missing image", f"stage_2_train_images/{pid}.dcm")
            continue
        ids.append(pid)
        images.append(image)
        labels.append(value)
    return ids, images, labels, skips, len(target)


def run_rsna(ctx: EvalContext) -> dict:
    """RSNA Pneumonia: AUROC [95% bootstrap CI], AP, accuracy/F1/sensitivity/specificity at 0.5 (module docstring)."""
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    from .findings import score_findings

    o = ctx.opts
    ids, images, labels, skips, listed = read_rsna(ctx.path("rsna"))
    ctx.add_skips(skips)
    check_half("RSNA Pneumonia", len(ids), listed, skips, ctx.allow_partial)
    scores, keep, info = score_findings(ctx, images, ["Pneumonia"])
    kept = set(keep)
    for i in range(len(ids)):
        if i not in kept:
            skips.add(ids[i], str(images[i]), ctx.embedder.table.failed.get(EmbedItem(image=images[i]).key,
                                                                            "not decoded"))
    check_half("RSNA Pneumonia", len(keep), listed, skips, ctx.allow_partial)
    y = np.array([labels[i] for i in keep], dtype=bool)
    s = scores[:, 0]
    both = 0 < y.sum() < y.size
    pred = s >= 0.5
    metrics = {"AUROC": float(roc_auc_score(y, s)) if both else float("nan"),
               "AP": float(average_precision_score(y, s)) if both else float("nan"),
               "accuracy": float(accuracy_score(y, pred)), **fnd.at_threshold(y, pred)}
    low, high, _ = percentile_interval(bootstrap_auroc(y, s, o.n_boot, o.seed)) if both else (np.nan, np.nan, 0)
    hits = int((y == pred).sum())
    return {"metrics": {k: v for k, v in metrics.items() if v == v}, "n": len(keep), "n_listed": listed,
            "n_evaluated": len(keep), "n_positive": int(y.sum()), "skipped": skips.by_reason(),
            "skip_examples": skips.examples, "intervals": {"AUROC": [low, high],
                                                           "accuracy": list(binomial_interval(hits, len(keep)))},
            "counts": {"AUROC": len(keep), "accuracy": len(keep)}, "n_boot": o.n_boot, "seed": o.seed,
            "protocol": "RSNA Pneumonia stage 2 train labels: one label per patient, Pneumonia prompt sets, "
                        "threshold 0.5", **info, "rows": _rows(ctx, "rsna-pneumonia", [ids[i] for i in keep])}
