"""``mmeb``: the Massive Multimodal Embedding Benchmark (Jiang et al., VLM2Vec), as FuseLIP evaluates it.

Data (role ``mmeb``): the ``TIGER-Lab/MMEB-eval`` release, one folder per subset holding its test split
(``<Subset>/test-*.parquet``, or ``<Subset>.jsonl``/``.json``/``.parquet``), with the images of its
``images.zip`` extracted under ``eval_images/`` (or ``images/``, or the root). Rows have ``qry_text`` and
``qry_img_path`` (the query; VLM2Vec writes the instruction into ``qry_text`` after ``<|image_1|>``) and the
lists ``tgt_text``/``tgt_img_path`` (the candidates, the first one correct); a separate ``qry_inst``/
``tgt_inst`` column, where present, is the instruction. An empty image path means "no image".

Protocol (FuseLIP ``src/mmeb/mmeb_eval.py`` and ``mmeb_utils.py``; reference-facts section 6.3, "MMEB
style"): FuseLIP has no chat prompt, so texts are cleaned by
:func:`fuselip_med.data.adapters.mmeb.clean_text` (instructions removed, HatefulMemes' replaced by "Is this
image hateful?", ImageNet-1K names cut at the first comma, classification candidates prefixed). Queries
and candidates are embedded fused (image + text; text-only when there is no image).
Precision@1 per subset = share of queries whose top candidate is the first one (ties: first wins). The
category scores are the means over their subsets (MMEB's 10 classification, 10 VQA, 12 retrieval and 4
grounding subsets = 36), and ``Overall`` the mean over all evaluated subsets. A subset absent from the folder,
lacking one of the columns the protocol reads, or with no scorable query is named in ``missing_subsets`` with the
reason; ``coverage`` gives each mean's (subsets scored, subsets it stands for), so that a category mean over fewer
subsets than MMEB's is labelled with the count.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fuselip_med.data.adapters.mmeb import clean_text
from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem

from ..scoring import pad_candidates, top1_positions
from .context import EvalContext

__all__ = ["CATEGORIES", "SUBSETS", "read_subset", "find_subsets", "run"]

CATEGORIES: dict[str, tuple[str, ...]] = {
    "Classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "VQA": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "Retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                  "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
SUBSETS: tuple[str, ...] = tuple(s for subsets in CATEGORIES.values() for s in subsets)
CATEGORY_OF = {s: c for c, subsets in CATEGORIES.items() for s in subsets}

_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")  # what the protocol reads of every row


def find_subsets(root: str | os.PathLike) -> dict[str, list[Path]]:
    """{subset: data files} for the subsets present under ``root`` (``<Subset>/*.parquet|jsonl|json`` or
    ``<Subset>.parquet|jsonl|json``)."""
    base = Path(root)
    found: dict[str, list[Path]] = {}
    for subset in SUBSETS:
        folder = base / subset
        files = sorted(f for f in folder.glob("*") if f.suffix in _DATA_SUFFIXES) if folder.is_dir() else []
        files = [f for f in files if "train" not in f.name] or files
        if not files:
            files = [base / f"{subset}{s}" for s in _DATA_SUFFIXES if (base / f"{subset}{s}").is_file()][:1]
        if files:
            found[subset] = files
    return found


def read_subset(files: list[Path]) -> list[dict]:
    """The rows of one subset's data files (parquet via pyarrow, JSON lines, or a JSON list)."""
    rows: list[dict] = []
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(file).to_pylist())
        elif file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as handle:
                rows.extend(json.loads(line) for line in handle if line.strip())
        else:
            data = json.loads(file.read_text(encoding="utf-8"))
            rows.extend(data if isinstance(data, list) else data.get("data", []))
    return rows


def _image_base(root: Path, rows: list[dict]) -> Path | None:
    paths = [p for r in rows for p in [r.get("qry_img_path")] + list(r.get("tgt_img_path") or []) if p][:1]
    if not paths:
        return root
    for base in (root / "eval_images", root / "images", root):
        if (base / paths[0]).is_file():
            return base
    return None


class _UniqueItems:
    """Each distinct (image path, text) input once: MMEB's 1,000-candidate lists repeat the same targets."""

    def __init__(self, base: Path):
        self.base = base
        self.items: list[EmbedItem] = []
        self._position: dict[tuple[str, str], int] = {}

    def add(self, image: str | None, text: str) -> int:
        key = (image or "", text)
        if key not in self._position:
            self._position[key] = len(self.items)
            self.items.append(EmbedItem(image=str(self.base / image), text=text) if image else EmbedItem(text=text))
        return self._position[key]


def _evaluate_subset(ctx: EvalContext, subset: str, rows: list[dict], base: Path) -> dict:
    unique = _UniqueItems(base)
    queries: list[int] = []
    cand_lists: list[list[int]] = []
    skipped: Counter = Counter()
    for row in rows:
        texts, images = list(row.get("tgt_text") or []), list(row.get("tgt_img_path") or [])
        if not texts or len(texts) != len(images):
            skipped["bad candidate list"] += 1
            continue
        query_text = clean_text(row.get("qry_text"), subset, candidate=False, instruction=row.get("qry_inst"))
        queries.append(unique.add(row.get("qry_img_path"), query_text))
        cand_lists.append([unique.add(img, clean_text(t, subset, candidate=True)) for t, img in zip(texts, images)])
    table = ctx.embedder.embed(unique.items, desc=f"embedding MMEB {subset}")
    failed = [table.failed.get(it.key) for it in unique.items]
    embedded = [p for p, why in enumerate(failed) if why is None]
    row_of = [-1] * len(unique.items)
    for p, r in zip(embedded, table.index_of(unique.items[p].key for p in embedded).tolist()):
        row_of[p] = r
    keep = []
    for i, (q, cs) in enumerate(zip(queries, cand_lists)):
        bad = next((failed[p] for p in (q, *cs) if failed[p] is not None), None)
        if bad is None:
            keep.append(i)
        else:
            skipped[bad] += 1
    if not keep:
        return {"n": 0, "correct": 0, "skipped": dict(skipped)}
    ids, valid = pad_candidates([[row_of[p] for p in cand_lists[i]] for i in keep])
    query_rows = torch.tensor([row_of[queries[i]] for i in keep], dtype=torch.int64)
    top = top1_positions(table.embeddings[query_rows], table.embeddings, ids, valid)
    correct = int((top == 0).sum())
    return {"n": len(keep), "correct": correct, "precision_at_1": correct / len(keep), "skipped": dict(skipped)}


def run(ctx: EvalContext) -> dict:
    """Precision@1 per subset (``per_subset``), per category and overall (``metrics``)."""
    root = Path(ctx.path("mmeb")).expanduser()
    found = find_subsets(root)
    wanted = list(ctx.opts.mmeb_subsets) if ctx.opts.mmeb_subsets else [s for s in SUBSETS if s in found]
    missing = [s for s in wanted if s not in found]
    if missing or not wanted:
        raise InputError(f"MMEB folder {root} has no data for {', '.join(missing) or 'any subset'}: download "
                         f"TIGER-Lab/MMEB-eval there (one folder per subset) and extract images.zip into "
                         f"{root / 'eval_images'}")
    per_subset: dict[str, dict] = {}
    unusable: dict[str, str] = {}
    for subset in wanted:
        rows = read_subset(found[subset])
        absent = [c for c in COLUMNS if rows and not any(c in row for row in rows)]
        if absent or not rows:
            unusable[subset] = f"column {', '.join(absent)} missing" if absent else "no rows"
            continue
        base = _image_base(root, rows)
        if base is None:
            raise InputError(f"MMEB subset {subset}: its images are not under {root / 'eval_images'}, "
                             f"{root / 'images'} or {root}; extract images.zip there")
        per_subset[subset] = _evaluate_subset(ctx, subset, rows, base)
    scored = {s: r["precision_at_1"] for s, r in per_subset.items() if r["n"]}
    if not scored:
        raise InputError(f"no MMEB query under {root} could be scored")
    metrics, coverage = {}, {"Overall": [len(scored), len(SUBSETS)]}
    for category, subsets in CATEGORIES.items():
        values = [scored[s] for s in subsets if s in scored]
        if values:
            metrics[category] = float(np.mean(values))
            coverage[category] = [len(values), len(subsets)]
    metrics["Overall"] = float(np.mean(list(scored.values())))
    missing = {s: unusable.get(s) or ("no query could be scored" if s in per_subset else f"not in {root}")
               for s in SUBSETS if s not in scored}
    return {"metrics": metrics, "per_subset": per_subset, "n": int(sum(r["n"] for r in per_subset.values())),
            "n_subsets": len(scored), "missing_subsets": missing, "coverage": coverage,
            "categories": {c: [s for s in subsets if s in scored] for c, subsets in CATEGORIES.items()},
            "seed": None}
