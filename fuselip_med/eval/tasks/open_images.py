"""``oi-crop`` and ``oi-pos``: the Open Images crop tasks of FuseLIP (``fuse_eval/eval_oi.py``,
``fuse_data/oi_data.py``; reference-facts section 6.4).

Task files (roles ``oi_crop``/``oi_pos``) in the released format (FuseLIP ``data/oi-crop.json``,
``data/oi-crop-positional-v3.json``), as :mod:`fuselip_med.eval.oi_build` writes them: ``{"meta": {"subset":
"test", ...}, "data": [...]}`` (OI-Pos: ``"data": {label: [...]}``), each sample with ``query_img``,
``query_target`` (the text) and ``retrieval_samples`` = [{"ImageID", "LabelName", "bbox": {"XMin", "XMax",
"YMin", "YMax"} in pixels}], the first one correct. Images: ``<folder of the task file>/<subset>/<ImageID>``
(or ``images/<ImageID>``). Query = query text + full image (fused); candidates = "" + each box's crop (fused);
correct iff the first candidate scores highest (ties: first). Accuracy = correct / samples.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from .context import EvalContext
from .pools import score_pools

__all__ = ["read_task_file", "run_crop", "run_pos"]

_CHUNK = 64  # samples whose crops are held in memory at once


def read_task_file(path: str | Path) -> tuple[list[dict], Path]:
    """(samples, image folder) of an OI task file (or a folder holding ``oi-crop.json``/``oi-pos.json``)."""
    file = Path(path).expanduser()
    data = json.loads(file.read_text(encoding="utf-8"))
    subset = str(data.get("meta", {}).get("subset", "test"))
    samples = data["data"]
    if isinstance(samples, dict):  # OI-Pos: {label: [sample, ...]}
        samples = [s for group in samples.values() for s in group]
    folder = next((d for d in (file.parent / subset, file.parent / "images", file.parent) if d.is_dir()
                   and samples and (d / samples[0]["query_img"]).is_file()), None)
    if folder is None:
        raise InputError(f"the Open Images images of {file} are not in {file.parent / subset} (nor images/ beside it)")
    return samples, folder


def _crop(folder: Path, entry: dict):
    from fuselip_med.data.images import load_image

    box = entry["bbox"]
    return load_image(str(folder / entry["ImageID"])).crop((box["XMin"], box["YMin"], box["XMax"], box["YMax"]))


def _run(ctx: EvalContext, role: str) -> dict:
    from fuselip_med.data.images import ImageDecodeError

    samples, folder = read_task_file(ctx.path(role))
    skipped: Counter = Counter()
    results = []
    for start in range(0, len(samples), _CHUNK):
        pools = []
        for s in samples[start:start + _CHUNK]:
            try:
                crops = [EmbedItem(image=_crop(folder, e), text="") for e in s["retrieval_samples"]]
            except (ImageDecodeError, OSError, KeyError) as error:
                skipped[getattr(error, "reason", None) or type(error).__name__] += 1
                continue
            pools.append((EmbedItem(image=str(folder / s["query_img"]), text=s["query_target"]), crops))
        results.extend(score_pools(ctx, pools, f"embedding {role}", skipped).tolist())
    if not results:
        raise InputError(f"no {role} sample could be scored")
    n_candidates = sorted({len(s["retrieval_samples"]) for s in samples})
    return {"metrics": {"accuracy": sum(results) / len(results)}, "n": len(results), "skipped": dict(skipped),
            "n_candidates": n_candidates, "seed": None}


def run_crop(ctx: EvalContext) -> dict:
    """OI-Crop accuracy."""
    return _run(ctx, "oi_crop")


def run_pos(ctx: EvalContext) -> dict:
    """OI-Pos accuracy."""
    return _run(ctx, "oi_pos")
