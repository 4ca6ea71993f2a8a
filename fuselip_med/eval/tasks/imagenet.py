"""``imagenet``: ImageNet-1k zero-shot classification on the validation set (reference-facts section 6.3,
"ImageNet style", as open_clip's ``zero_shot.py``).

Class weights: each of the 1000 standard class names (OpenAI's cleaned names, shipped in
``eval/data/imagenet_classes.tsv`` with their WordNet ids) put into each of OpenAI's 80 templates
(``eval/data/imagenet_templates.txt``), embedded text-only, L2-normalised, averaged and re-normalised.
Images are embedded image-only; top-1 / top-5 accuracy of the cosine scores (the logit scale does not change
the ranking). Data (role ``imagenet``): ``val/<wnid>/*.JPEG`` (the layout of the usual ``valprep.sh``), or a
flat ``val/`` folder with ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString`` whose first token is
the wnid); the folder given may be the ``val`` folder itself.
"""
from __future__ import annotations

import csv
from collections import Counter
from importlib import resources
from pathlib import Path

import torch

from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from .context import EvalContext

__all__ = ["imagenet_classes", "imagenet_templates", "list_validation_images", "run"]

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _data_lines(name: str) -> list[str]:
    text = resources.files("fuselip_med.eval").joinpath("data", name).read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 (wnid, class name) pairs in the standard class-index order."""
    return [tuple(ln.split("\t", 1)) for ln in _data_lines("imagenet_classes.tsv")]  # type: ignore[misc]


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates, ``{c}`` = class name."""
    return _data_lines("imagenet_templates.txt")


def list_validation_images(root: str | Path) -> list[tuple[str, str]]:
    """(image path, wnid) of the validation images under ``root`` (layouts in the module docstring), sorted;
    ``ValueError`` naming ``root`` when none is found."""
    base = Path(root).expanduser()
    val = base / "val" if (base / "val").is_dir() else base
    solution = next((p for p in (base / "LOC_val_solution.csv", val / "LOC_val_solution.csv") if p.is_file()), None)
    out: list[tuple[str, str]] = []
    if solution is not None:
        with open(solution, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                stem, wnid = row["ImageId"], row["PredictionString"].split()[0]
                image = next((val / f"{stem}{s}" for s in (".JPEG", ".jpg", ".jpeg", ".png")
                              if (val / f"{stem}{s}").is_file()), None)
                if image is not None:
                    out.append((str(image), wnid))
    else:
        for folder in sorted(p for p in val.iterdir() if p.is_dir() and p.name.startswith("n")):
            out.extend((str(f), folder.name) for f in sorted(folder.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES)
    if not out:
        raise InputError(f"no ImageNet validation image under {base}: expected val/<wnid>/*.JPEG or a val/ folder "
                         f"with LOC_val_solution.csv")
    return sorted(out)


def run(ctx: EvalContext) -> dict:
    """Top-1 and top-5 accuracy (fractions) over the decodable validation images."""
    classes = imagenet_classes()
    index = {wnid: k for k, (wnid, _) in enumerate(classes)}
    images = list_validation_images(ctx.path("imagenet"))
    skipped = Counter()
    items, truth = [], []
    for path, wnid in images:
        if wnid not in index:
            skipped["unknown wnid"] += 1
            continue
        items.append(EmbedItem(image=path))
        truth.append(index[wnid])
    table = ctx.embedder.embed(items, desc="embedding ImageNet")
    keep = [i for i, it in enumerate(items) if it.key in table]
    for it in items:
        if it.key in table.failed:
            skipped[table.failed[it.key]] += 1
    if not keep:
        raise InputError("no ImageNet validation image could be decoded")
    weights = ctx.class_weights([name for _, name in classes], imagenet_templates())
    scores = table.lookup(items[i].key for i in keep) @ weights.T
    top5 = scores.topk(5, dim=1).indices
    y = torch.tensor([truth[i] for i in keep])
    top1 = float((top5[:, 0] == y).float().mean())
    return {"metrics": {"top1": top1, "top5": float((top5 == y[:, None]).any(dim=1).float().mean())},
            "n": len(keep), "n_classes": len(classes), "n_templates": len(imagenet_templates()),
            "skipped": dict(skipped), "seed": None}
