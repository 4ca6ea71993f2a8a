"""Medical VQA as retrieval (FuseLIP's home ground: image + question fused into one query), read as published:
``vqa-rad``, ``slake``, ``pathvqa`` and ``pmc-vqa``. Scoring: :func:`fuselip_med.eval.vqa.evaluate_choice_vqa`.

- VQA-RAD (Lau et al., Scientific Data 2018; OSF ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``): one
  JSON list of objects with ``qid``, ``image_name``, ``image_organ``, ``question``, ``answer`` (a string or a
  number), ``answer_type`` (``CLOSED``/``OPEN``), ``question_type`` (``PRES``, ``SIZE``, ...), ``phrase_type``
  (``freeform``, ``para``, ``frame``, ``test_freeform``, ``test_para``). The test split is the rows whose
  ``phrase_type`` starts with ``test`` (the release's 451 test questions).
- SLAKE (Liu et al., ISBI 2021; ``Slake1.0/test.json`` + ``imgs/``): a JSON list of objects with ``img_id``,
  ``img_name`` (``xmlab102/source.jpg``, under ``imgs/``), ``question``, ``answer``, ``q_lang`` (``en``/``zh``;
  English only here), ``location``, ``modality``, ``answer_type`` (``OPEN``/``CLOSED``), ``base_type``,
  ``content_type``, ``triple``, ``qid``.
- PathVQA (He et al. 2020; Hugging Face ``flaviagiammarino/path-vqa``): parquet shards ``data/test-*.parquet`` with
  ``image`` ({``bytes``, ``path``}), ``question``, ``answer``. Yes/no answers are closed, the rest open (the
  release's own split of question kinds).
- PMC-VQA (Zhang et al. 2023; ``test_clean.csv`` or ``test.csv`` + the figures of ``images.zip``): CSV columns
  ``Figure_path`` (``PMC1064097_F1.jpg``), ``Question``, ``Answer``, ``Choice A`` ... ``Choice D`` (``A:...``),
  ``Answer_label`` (``A``-``D``); every question closed over its four choices.

Closed questions: yes/no answers are scored over (yes, no), PMC-VQA's over its four choices, other closed answers
over the split's distinct closed answers. Open questions: rank of the right answer among the split's distinct
answers. A row missing a field, or whose image is missing, is a named skip (half rule as every task).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError

from ..vqa import VQAItem, closed_options, evaluate_choice_vqa
from .context import EvalContext
from .files import check_half, read_table

__all__ = ["read_vqa_rad", "read_slake", "read_pathvqa", "read_pmc_vqa", "run_vqa_rad", "run_slake", "run_pathvqa",
           "run_pmc_vqa"]

_CHOICE_PREFIX = re.compile(r"^\s*[A-D]\s*[:.)]\s*")


def _json_list(path: Path, what: str) -> list:
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InputError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{what}: {path} is not JSON ({error})") from None
    if not isinstance(content, list):
        raise InputError(f"{what}: {path} must hold a JSON list of questions")
    return content


def _missing(row: dict, fields: tuple[str, ...]) -> list[str]:
    return [f for f in fields if row.get(f) is None or str(row.get(f)).strip() == ""]


def _first(base: Path, names: tuple[str, ...], what: str) -> Path:
    if base.is_file():
        return base
    for name in names:
        if (base / name).exists():
            return base / name
    raise InputError(f"{what}: none of {', '.join(names)} in {base}")


def read_vqa_rad(path: str | os.PathLike) -> tuple[list[VQAItem], SkipReport, int]:
    """(test questions, named skips, rows listed) of VQA-RAD (module docstring)."""
    file = _first(Path(path).expanduser(), ("VQA_RAD Dataset Public.json", "VQA_RAD_Dataset_Public.json"), "VQA-RAD")
    images = _first(file.parent, ("VQA_RAD Image Folder", "VQA_RAD_Image_Folder", "images"), "VQA-RAD images")
    rows = [r for r in _json_list(file, "VQA-RAD") if str(r.get("phrase_type", "")).startswith("test")]
    items, skips = [], SkipReport()
    for n, row in enumerate(rows):
        rid = str(row.get("qid", f"test row {n}"))
        gone = _missing(row, ("image_name", "question", "answer", "answer_type"))
        if gone:
            skips.add(rid, file.name, "missing field", ", ".join(gone))
        elif not (images / str(row["image_name"])).is_file():
            skips.add(rid, file.name, "missing image", str(row["image_name"]))
        else:
            items.append(VQAItem(rid, str(images / row["image_name"]), str(row["question"]), str(row["answer"]),
                                 str(row["answer_type"]).strip().lower() == "closed",
                                 str(row.get("question_type") or "").strip()))
    return items, skips, len(rows)


def read_slake(path: str | os.PathLike, split: str = "test") -> tuple[list[VQAItem], SkipReport, int]:
    """(English questions of ``split``, named skips, rows listed) of SLAKE (module docstring)."""
    file = _first(Path(path).expanduser(), (f"{split}.json",), "SLAKE")
    images = file.parent / "imgs"
    rows = [r for r in _json_list(file, "SLAKE") if r.get("q_lang", "en") == "en"]
    items, skips = [], SkipReport()
    for n, row in enumerate(rows):
        rid = str(row.get("qid", f"row {n}"))
        gone = _missing(row, ("img_name", "question", "answer", "answer_type"))
        if gone:
            skips.add(rid, file.name, "missing field", ", ".join(gone))
        elif not (images / str(row["img_name"])).is_file():
            skips.add(rid, file.name, "missing image", str(row["img_name"]))
        else:
            items.append(VQAItem(rid, str(images / row["img_name"]), str(row["question"]), str(row["answer"]),
                                 str(row["answer_type"]).strip().lower() == "closed",
                                 str(row.get("content_type") or "").strip()))
    return items, skips, len(rows)


def read_pathvqa(path: str | os.PathLike, split: str = "test") -> tuple[list[VQAItem], SkipReport, int]:
    """(questions of ``split``, named skips, rows listed) of PathVQA's parquet shards (module docstring)."""
    import pyarrow.parquet as pq

    base = Path(path).expanduser()
    shards = [*base.glob(f"data/{split}-*.parquet"), *base.glob(f"{split}-*.parquet")] if base.is_dir() else []
    files = [base] if base.is_file() else sorted(shards)
    if not files:
        raise InputError(f"PathVQA: no {split}-*.parquet under {base} (or {base}/data)")
    items, skips, listed = [], SkipReport(), 0
    for file in files:
        for n, row in enumerate(pq.read_table(file, columns=["image", "question", "answer"]).to_pylist()):
            listed += 1
            rid = f"{file.name}:{n}"
            image = row.get("image") or {}
            gone = _missing(row, ("question", "answer")) + ([] if image.get("bytes") else ["image.bytes"])
            if gone:
                skips.add(rid, file.name, "missing field", ", ".join(gone))
                continue
            answer = str(row["answer"])
            items.append(VQAItem(rid, image["bytes"], str(row["question"]), answer,
                                 answer.strip().lower() in ("yes", "no"), ""))
    return items, skips, listed


def read_pmc_vqa(path: str | os.PathLike) -> tuple[list[VQAItem], SkipReport, int]:
    """(questions, named skips, rows listed) of PMC-VQA's test CSV (module docstring)."""
    file = _first(Path(path).expanduser(), ("test_clean.csv", "test.csv"), "PMC-VQA")
    images = next((file.parent / d for d in ("images", "figures") if (file.parent / d).is_dir()), file.parent)
    frame = read_table(file, "PMC-VQA")
    fields = ("Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label")
    absent = [f for f in fields if f not in frame.columns]
    if absent:
        raise InputError(f"PMC-VQA: {file} lacks the column(s) {', '.join(absent)}")
    items, skips = [], SkipReport()
    for n, row in enumerate(frame.to_dict("records")):
        rid = f"{row['Figure_path'] or 'row'}:{n}"
        gone = _missing(row, fields)
        label = str(row["Answer_label"]).strip().upper()
        if gone or label not in ("A", "B", "C", "D"):  # a substring test would take "AB" as A and "CD" as C
            skips.add(rid, f"{file.name}:{n + 2}", "missing field", ", ".join(gone) or f"Answer_label {label!r}")
        elif not (images / row["Figure_path"]).is_file():
            skips.add(rid, f"{file.name}:{n + 2}", "missing image", row["Figure_path"])
        else:
            options = tuple(_CHOICE_PREFIX.sub("", row[f"Choice {c}"]).strip() for c in "ABCD")
            items.append(VQAItem(rid, str(images / row["Figure_path"]), row["Question"], options["ABCD".index(label)],
                                 True, "", options=options))
    return items, skips, len(frame)


def _run(ctx: EvalContext, role: str, name: str, read) -> dict[str, Any]:
    items, skips, listed = read(ctx.path(role))
    ctx.add_skips(skips)
    check_half(name, len(items), listed, skips, ctx.allow_partial)
    res = evaluate_choice_vqa(ctx.embedder, closed_options(items), desc=f"embedding {name}")
    for row_id, why in res.pop("failed"):
        skips.add(row_id, name, why)
    check_half(name, res["n"], listed, skips, ctx.allow_partial)
    res.update({"n_listed": listed, "n_evaluated": res["n"], "skipped": skips.by_reason(),
                "skip_examples": skips.examples, "protocol": f"{name}: closed accuracy over options, open R@k over "
                                                            "the split's distinct answers"})
    return res


def run_vqa_rad(ctx: EvalContext) -> dict:
    """VQA-RAD test split: closed accuracy, open R@1/R@5, per answer and question type."""
    return _run(ctx, "vqa_rad", "VQA-RAD", read_vqa_rad)


def run_slake(ctx: EvalContext) -> dict:
    """SLAKE English test questions: closed accuracy, open R@1/R@5, per answer and content type."""
    return _run(ctx, "slake", "SLAKE", read_slake)


def run_pathvqa(ctx: EvalContext) -> dict:
    """PathVQA test split: yes/no accuracy, open R@1/R@5."""
    return _run(ctx, "pathvqa", "PathVQA", read_pathvqa)


def run_pmc_vqa(ctx: EvalContext) -> dict:
    """PMC-VQA test: accuracy over the four choices."""
    return _run(ctx, "pmc_vqa", "PMC-VQA", read_pmc_vqa)
