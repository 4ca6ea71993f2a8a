"""``zero-shot``: classify the ``labelled`` images into the user's classes, zero-shot.

Classes: ``--labels FILE`` (one class name per line; blank lines and lines starting with ``#`` ignored), in
that order; without it, the sorted distinct labels of the data. A sample's label is ``meta[label_field]``
(a CSV's ``label`` column, or the class folder of a folder-per-class layout). Class weights: every class name
put into every template (``--templates FILE``, one template per line with ``{c}`` or ``{}`` for the class;
default :data:`RADIOLOGY_TEMPLATES`), embedded text-only, averaged and re-normalised (reference section 6.3);
images are embedded image-only and the prediction is the argmax cosine. Metrics:
:func:`fuselip_med.eval.classification.classification_metrics` (accuracy, balanced accuracy, macro-F1,
per-class scores, confusion matrix rows = true, columns = predicted).

Single-label accuracy needs one class per image. A table's ``labels`` column (``;``-joined, read as a list) is
used when the label field is empty or is ``labels`` itself: a row with exactly one label is scored with it, a row
with several is a named skip (``several labels``: multi-label rows are scored by the ``findings`` task, per label,
not forced into one class here), a row with none has no label.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError, UsageError
from fuselip_med.inference.items import EmbedItem, sample_image_key

from .. import classification as cls
from .context import EvalContext
from .files import check_half

__all__ = ["MULTI_LABEL", "RADIOLOGY_TEMPLATES", "read_lines", "read_labels", "read_templates", "run"]

MULTI_LABEL = "several labels (a multi-label row: the findings task scores each label)"

RADIOLOGY_TEMPLATES: tuple[str, ...] = (
    "{c}.",
    "a radiology image of {c}.",
    "a medical image showing {c}.",
    "a radiograph showing {c}.",
    "a scan showing {c}.",
    "an image of {c}.",
)


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file that do not start with ``#``; ``ValueError`` naming the file
    when it is missing, undecodable or empty."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{what} file {file} does not exist") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} file {file} is not UTF-8 text; save it as UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise UsageError(f"{what} file {file} has no entries (one per line)")
    return lines


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a labels file (one per line, in order); ``ValueError`` on duplicates."""
    labels = read_lines(path, "labels")
    dupes = sorted(k for k, n in Counter(labels).items() if n > 1)
    if dupes:
        raise UsageError(f"labels file {path} lists {', '.join(map(repr, dupes))} more than once")
    return labels


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a file (one per line); ``{}`` is accepted for ``{c}``; ``ValueError`` when a line
    has no placeholder."""
    out = []
    for line in read_lines(path, "templates"):
        template = line.replace("{}", "{c}")
        if "{c}" not in template:
            raise UsageError(f"templates file {path}: line {line!r} has no {{c}} (or {{}}) for the class name")
        out.append(template)
    return out


def _single_label(meta: dict, field: str) -> str | None:
    """The one class of a sample (``meta[field]``, else its ``labels`` list), ``MULTI_LABEL`` when it has
    several, None when it has none."""
    value = meta.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        value = meta.get("labels")
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value if str(v).strip()]
        return names[0] if len(names) == 1 else (MULTI_LABEL if names else None)
    return str(value).strip() or None if value is not None else None


def run(ctx: EvalContext) -> dict:
    """Zero-shot accuracy, balanced accuracy, macro-F1, per-class scores and the confusion matrix."""
    o = ctx.opts
    source = ctx.source("labelled")
    name = getattr(source, "name", "labelled data")
    skipped = SkipReport.merged([getattr(source, "skipped", None)])  # rows the adapter could not use, named
    items, labels, ids = [], [], []
    for i in range(len(source)):
        s = source[i]
        image = s.query.image if s.query.image is not None else s.target.image
        label = _single_label(s.meta, o.label_field)
        reason = ("no image" if image is None else MULTI_LABEL if label is MULTI_LABEL
                  else "no label" if label is None else None)
        if reason is not None:
            skipped.add(s.id, name, reason)
            continue
        items.append(EmbedItem(image=image, image_key=sample_image_key(s, image)))
        labels.append(label)
        ids.append(str(s.id))
    ctx.add_skips(skipped)  # every row not scored is named in skipped.csv
    n_listed = len(items) + skipped.total  # each row once: labelled ones in items, the rest skipped so far
    if not items:
        raise InputError(f"{name} has no image with a label in meta[{o.label_field!r}] (give a label column or one "
                         f"folder per class)")
    classes = list(o.labels) if o.labels is not None else sorted(set(labels))
    known = {c: k for k, c in enumerate(classes)}
    rows = [r for r, lab in enumerate(labels) if lab in known]
    for r, label in enumerate(labels):
        if label not in known:
            skipped.add(ids[r], name, "label not in --labels", label)
    if not rows:
        raise InputError(f"none of the labels of {name} ({', '.join(sorted(set(labels))[:5])}, ...) is in the "
                         f"class list ({', '.join(classes[:5])}, ...)")
    check_half(name, len(rows), n_listed, skipped, ctx.allow_partial)  # before any embedding
    templates = list(o.templates) if o.templates is not None else list(RADIOLOGY_TEMPLATES)
    table = ctx.embedder.embed([items[r] for r in rows], desc=f"embedding {name}")
    scored = [r for r in rows if items[r].key in table]
    for r in rows:
        if items[r].key in table.failed:
            skipped.add(ids[r], items[r].image_key, table.failed[items[r].key])
    check_half(name, len(scored), n_listed, skipped, ctx.allow_partial)
    if not scored:
        raise InputError(f"no image of {name} could be decoded")
    weights = ctx.class_weights(classes, templates)
    pred, _ = cls.zero_shot_predict(table.lookup(items[r].key for r in scored), weights)
    m = cls.classification_metrics([known[labels[r]] for r in scored], pred.tolist(), classes)
    m["chance_accuracy"] = 1.0 / len(classes)
    return {"metrics": {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "chance_accuracy")},
            "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"], "n": len(scored),
            "n_listed": n_listed, "n_evaluated": len(scored), "classes": classes, "templates": templates,
            "skipped": skipped.by_reason(), "skip_examples": skipped.examples}
