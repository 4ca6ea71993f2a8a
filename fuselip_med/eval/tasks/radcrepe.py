"""``radcrepe``: radiology hard negatives (:mod:`fuselip_med.eval.radcrepe`): the image must score its caption above
the rule-edited one. Accuracy per edit type with chance 0.5 and an exact binomial 95% interval.

Data: role ``radcrepe`` = the folder ``fuselip-med data radcrepe`` wrote (SugarCrepe's layout, ``<edit type>.json``,
filenames relative to the folder), so every model sees the same items; without it the edits are made in memory from
the captions of role ``test`` (ROCOv2 test by default).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from ..intervals import binomial_interval
from ..radcrepe import EDIT_TYPES, make_edits
from .context import EvalContext
from .sugarcrepe import score_triples

__all__ = ["run"]


def _from_folder(root: Path) -> dict[str, dict]:
    present = {kind: root / f"{kind}.json" for kind in EDIT_TYPES if (root / f"{kind}.json").is_file()}
    if not present:
        raise InputError(f"no RadCrepe file ({', '.join(f'{k}.json' for k in EDIT_TYPES)}) in {root}; write the set "
                         "with `fuselip-med data radcrepe`")
    return {kind: json.loads(path.read_text(encoding="utf-8")) for kind, path in present.items()}


def _from_test(ctx: EvalContext) -> tuple[dict[str, dict], dict[str, EmbedItem]]:
    ic = ctx.image_caption("test")
    sets: dict[str, dict] = {kind: {} for kind in EDIT_TYPES}
    images: dict[str, EmbedItem] = {}
    for row_id, image, text in zip(ic.ids, ic.images, ic.texts):
        for kind, negative in make_edits(text.text).items():
            sets[kind][row_id] = {"filename": row_id, "caption": text.text, "negative_caption": negative}
            images[row_id] = image
    return sets, images


def run(ctx: EvalContext) -> dict:
    """Accuracy [95% CI] and row count per edit type; ``mean_accuracy`` over the edit types."""
    if ctx.has("radcrepe"):
        root = Path(ctx.path("radcrepe")).expanduser()
        sets, images, origin = _from_folder(root), {}, str(root)
    else:
        sets, images = _from_test(ctx)
        root, origin = Path("."), f"edits made in memory from role 'test' ({ctx.image_caption('test').name})"
    per_edit, skips = {}, SkipReport()
    for kind, entries in sets.items():
        if not entries:
            continue
        r = score_triples(ctx, entries, root, f"embedding RadCrepe {kind}", images)
        for row_id, why in r.pop("skipped_ids"):
            skips.add(row_id, f"radcrepe {kind}", why)
        r.pop("ids")
        low, high = binomial_interval(r["correct"], r["n"])
        per_edit[kind] = {**r, "ci": [low, high]}
    ctx.add_skips(skips)
    scored = {k: v for k, v in per_edit.items() if v["n"]}
    if not scored:
        raise InputError(f"no RadCrepe item could be scored ({origin})")
    metrics = {f"{k}_accuracy": v["accuracy"] for k, v in scored.items()}
    metrics["mean_accuracy"] = float(np.mean([v["accuracy"] for v in scored.values()]))
    metrics["chance"] = 0.5
    return {"metrics": metrics, "per_edit": per_edit, "n": int(sum(v["n"] for v in scored.values())),
            "intervals": {f"{k}_accuracy": v["ci"] for k, v in scored.items()},
            "counts": {f"{k}_accuracy": v["n"] for k, v in scored.items()}, "source": origin,
            "skipped": skips.by_reason(), "protocol": "RadCrepe: caption vs rule-edited caption, one fact changed",
            "seed": None}
