"""``rocov2-modality``: zero-shot modality classification of the ``test`` images against the six ROCOv2
modalities (labels from ``meta["modality"]``; class weights as in reference section 6.3)."""
from __future__ import annotations

from fuselip_med.errors import InputError

from .. import classification as cls
from .context import EvalContext

__all__ = ["run"]


def run(ctx: EvalContext) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and chance over the modalities present in the data."""
    o = ctx.opts
    ic, keep, img, _ = ctx.embed_image_caption("test")
    classes = list(o.modality_classes)
    labels = [cls.normalize_modality(ic.meta[i].get("modality"), classes) for i in keep]
    rows = [r for r, lab in enumerate(labels) if lab is not None]
    if not rows:
        raise InputError(f"no sample of {ic.name} has a modality label in meta['modality']")
    # Zero-shot over the modalities that occur in the data, so that chance is 1 / (number of classes).
    classes = [c for c in classes if c in {labels[r] for r in rows}]
    weights = ctx.class_weights(classes, o.modality_templates)
    pred, _ = cls.zero_shot_predict(img[rows], weights)
    y_true = [classes.index(labels[r]) for r in rows]
    m = cls.classification_metrics(y_true, pred.tolist(), classes)
    m["chance_accuracy"] = 1.0 / len(classes)
    counts = ctx.rows(ic, keep)
    if len(rows) < len(keep):
        counts["skipped"]["no modality label"] = len(keep) - len(rows)
        counts["skip_examples"]["no modality label"] = [ic.ids[keep[r]] for r, lab in enumerate(labels)
                                                        if lab is None][:3]
    counts["n_evaluated"] = len(rows)
    return {"metrics": {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "chance_accuracy")},
            "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"], "n": len(rows),
            "classes": classes, "templates": list(o.modality_templates), **counts}
