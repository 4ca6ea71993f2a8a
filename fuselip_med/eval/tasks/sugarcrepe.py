"""``sugarcrepe``: SugarCrepe compositionality (Hsieh et al. 2023; FuseLIP ``fuse_eval/eval_sugarcrepe.py``,
adapted from the benchmark's ``main_eval.py``).

Data (role ``sugarcrepe``): the seven JSON files of the release (``add_att``, ``add_obj``, ``replace_att``,
``replace_obj``, ``replace_rel``, ``swap_att``, ``swap_obj``; each ``{"<id>": {"filename", "caption",
"negative_caption"}}``; the first release named the three ``*_obj`` files ``add_ent``, ``replace_ent`` and
``swap_ent``, read as well) and the COCO val2017 images in ``val2017/`` beside them (or ``images/``). The image is
embedded image-only and both captions text-only; an item is correct iff cosine(image, caption) >
cosine(image, negative_caption) (strictly, as the reference). Accuracy per subset; ``mean_accuracy`` is the
mean over the subsets, with the ``replace``/``swap``/``add`` group means beside it. A subset that is absent or
has no decodable image is named in ``missing_subsets`` with the reason, and ``coverage`` gives each mean's
(subsets scored, subsets it stands for), so a mean over fewer subsets is labelled as such (``SugarCrepe (4/7)``).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from .context import EvalContext

__all__ = ["SUBSETS", "score_triples", "run"]

SUBSETS: tuple[str, ...] = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
# the names of the first release (github.com/RAIVNLab/sugar-crepe, data/ before the *_ent -> *_obj rename)
FIRST_RELEASE_NAMES = {"replace_obj": "replace_ent", "swap_obj": "swap_ent", "add_obj": "add_ent"}


def _subset_file(root: Path, subset: str) -> Path | None:
    """The JSON file of ``subset`` under its current or its first-release name; None when neither exists."""
    for name in (subset, FIRST_RELEASE_NAMES.get(subset)):
        if name and (root / f"{name}.json").is_file():
            return root / f"{name}.json"
    return None


def _absent_reason(root: Path, subset: str) -> str:
    old = FIRST_RELEASE_NAMES.get(subset)
    return f"no {subset}.json" + (f" (nor {old}.json)" if old else "") + f" in {root}"


def _image_root(root: Path) -> Path:
    for candidate in (root / "val2017", root / "images", root / "images" / "val2017", root):
        if candidate.is_dir() and (any(candidate.glob("*.jpg")) or any(candidate.glob("*.png"))):
            return candidate
    raise InputError(f"no COCO val2017 images under {root}: put them in {root / 'val2017'}")


def score_triples(ctx: EvalContext, entries: dict, images: Path, desc: str,
                  image_items: dict[str, EmbedItem] | None = None) -> dict:
    """``{"n", "correct", "accuracy", "skipped"}`` of SugarCrepe-layout ``entries`` (``{"<id>": {"filename",
    "caption", "negative_caption"}}``, ``filename`` under ``images``): correct iff cosine(image, caption) >
    cosine(image, negative_caption). Entries lacking a field or whose image did not decode count under ``skipped``;
    ``"ids"`` lists the entries scored, ``"skipped_ids"`` (id, reason) the others. ``image_items``: the image input
    of a ``filename`` given in memory (images that are not files)."""
    image_items = image_items or {}
    skipped: Counter = Counter()
    triples, ids, skipped_ids = [], [], []
    for key, e in entries.items():
        if not isinstance(e, dict) or not all(isinstance(e.get(f), str) and e.get(f)
                                              for f in ("filename", "caption", "negative_caption")):
            skipped["bad entry"] += 1
            skipped_ids.append((str(key), "bad entry"))
            continue
        image = image_items.get(e["filename"]) or EmbedItem(image=str(images / e["filename"]))
        triples.append((image, EmbedItem(text=e["caption"]),
                        EmbedItem(text=e["negative_caption"])))
        ids.append(str(key))
    table = ctx.embedder.embed([it for t in triples for it in t], desc=desc)
    kept, kept_ids = [], []
    for key, t in zip(ids, triples):
        if t[0].key in table:
            kept.append(t)
            kept_ids.append(key)
        else:
            why = table.failed.get(t[0].key, "not embedded")
            skipped[why] += 1
            skipped_ids.append((key, why))
    if not kept:
        return {"n": 0, "correct": 0, "skipped": dict(skipped), "ids": [], "skipped_ids": skipped_ids}
    img = table.lookup(t[0].key for t in kept)
    pos = (img * table.lookup(t[1].key for t in kept)).sum(dim=1)
    neg = (img * table.lookup(t[2].key for t in kept)).sum(dim=1)
    correct = int((pos > neg).sum())
    return {"n": len(kept), "correct": correct, "accuracy": correct / len(kept), "skipped": dict(skipped),
            "ids": kept_ids, "skipped_ids": skipped_ids}


def run(ctx: EvalContext) -> dict:
    """Accuracy per subset, per group and their mean."""
    root = Path(ctx.path("sugarcrepe")).expanduser()
    files = {s: _subset_file(root, s) for s in SUBSETS}
    present = [s for s in SUBSETS if files[s] is not None]
    missing = {s: _absent_reason(root, s) for s in SUBSETS if files[s] is None}
    if not present:
        raise InputError(f"no SugarCrepe subset file ({', '.join(f'{s}.json' for s in SUBSETS)}) in {root}")
    images = _image_root(root)
    per_subset: dict[str, dict] = {}
    for subset in present:
        entries = json.loads(files[subset].read_text(encoding="utf-8"))
        per_subset[subset] = score_triples(ctx, entries, images, f"embedding SugarCrepe {subset}")
        if not per_subset[subset]["n"]:
            missing[subset] = "no item could be scored (" + ", ".join(
                f"{n} {why}" for why, n in per_subset[subset]["skipped"].items()) + ")"
    acc = {s: r["accuracy"] for s, r in per_subset.items() if r["n"]}
    if not acc:
        raise InputError(f"no SugarCrepe image under {images} could be decoded")
    metrics = {f"{s}_accuracy": v for s, v in acc.items()}
    coverage = {"mean_accuracy": [len(acc), len(SUBSETS)]}
    for group in ("replace", "swap", "add"):
        values = [v for s, v in acc.items() if s.startswith(group)]
        if values:
            metrics[f"{group}_accuracy"] = float(np.mean(values))
            coverage[f"{group}_accuracy"] = [len(values), sum(s.startswith(group) for s in SUBSETS)]
    metrics["mean_accuracy"] = float(np.mean(list(acc.values())))
    for r in per_subset.values():
        r.pop("ids")
        r.pop("skipped_ids")
    return {"metrics": metrics, "per_subset": per_subset, "n": int(sum(r["n"] for r in per_subset.values())),
            "missing_subsets": {s: missing[s] for s in SUBSETS if s in missing}, "coverage": coverage, "seed": None}
