"""What both QA generators share: the caption rows they read (through the adapters), the JSONL record they
write, answer normalisation, and atomic writes."""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fuselip_med.errors import InputError
from fuselip_med.io import atomic_write_text

__all__ = ["CaptionRow", "QARecord", "answer_in_caption", "normalize_text", "read_caption_rows", "read_jsonl",
           "write_jsonl_atomic"]

RECORD_KEYS = ("id", "image", "caption", "question", "answer", "qtype", "generator", "model", "prompt_version")


@dataclass(frozen=True)
class CaptionRow:
    """One caption to turn into questions: the source row's ID, its image (a path, or None when the source
    holds encoded bytes, e.g. the ROCOv2 parquet mirror), the caption and the manual ROCOv2 concepts (CUIs)."""

    id: str
    image: str | None
    caption: str
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class QARecord:
    """One output line: a question about ``image`` whose ``answer`` the caption states.

    ``qtype`` names the rule (``modality``, ``side``, ...) or ``llm``; ``model`` is None for the rules; the
    ``prompt_version`` (rules: the rule set's version) says which generator wording made it.
    """

    id: str
    image: str | None
    caption: str
    question: str
    answer: str
    qtype: str
    generator: str
    model: str | None
    prompt_version: str

    def to_json(self) -> str:
        return json.dumps({key: getattr(self, key) for key in RECORD_KEYS}, ensure_ascii=False)


# ----------------------------------------------------------------------------------------- normalisation

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
                         "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
                         "\u2212": "-", "\u00d7": "x", "\u00a0": " "})
_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\s\"'.,;:!?()\[\]]+|[\s\"'.,;:!?()\[\]]+$")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_TIMES = re.compile(r"(?<=\d)\s*x\s*(?=\d)")


def normalize_text(text: str) -> str:
    """Lower case, NFKC, no double quotes, ASCII hyphens and apostrophes, ``3×4``/``3 x 4`` -> ``3 x 4``, one
    space, no surrounding punctuation or leading article: the form in which answers are compared with captions."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower().replace('"', "")
    text = _TIMES.sub(" x ", text)
    text = _SPACES.sub(" ", text)
    return _EDGE_PUNCT.sub("", _ARTICLE.sub("", _EDGE_PUNCT.sub("", text)))


def answer_in_caption(answer: str, caption: str) -> bool:
    """True when the normalised ``answer`` occurs in the normalised ``caption`` on word boundaries."""
    needle = normalize_text(answer)
    if not needle:
        return False
    hay = normalize_text(caption)
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", hay) is not None


# ------------------------------------------------------------------------------------------ reading inputs

TABLE_SUFFIXES = (".csv", ".tsv", ".tab")


def guess_adapter(path: str) -> str:
    """The adapter for a caption source: ``csv`` for tables, ``cc`` for webdataset shards, else ``rocov2``
    (official folder, parquet mirror folder or hub id)."""
    lowered = path.lower()
    if lowered.endswith(TABLE_SUFFIXES):
        return "csv"
    if ".tar" in lowered:
        return "cc"
    return "rocov2"


def read_caption_rows(path: str | os.PathLike, *, adapter: str | None = None, split: str = "train",
                      limit: int | None = None, options: dict[str, Any] | None = None
                      ) -> tuple[list[CaptionRow], dict[str, int]]:
    """Caption rows of any source the adapters read, and the adapter's skip counts (reason -> rows).

    Raises ``DatasetEmptyError``/``DatasetNotFoundError`` (naming the path) when there is nothing to read,
    ``KeyError`` for an unknown adapter name.
    """
    from fuselip_med.data.adapters import get_adapter

    path = os.fspath(path)
    name = adapter or guess_adapter(path)
    source = get_adapter(name)(path, split=split, limit=limit, **(options or {}))
    manual = getattr(source, "manual_concepts", None)
    rows = []
    if getattr(source, "layout", None) == "hf":  # the ROCOv2 parquet mirror: no image paths, skip reading bytes
        for i, (image_id, caption) in enumerate(zip(source.image_ids, source.captions)):
            rows.append(CaptionRow(image_id, None, caption, tuple(manual(i))))
        return rows, dict(source.skipped)
    for i in range(len(source)):
        sample = source[i]
        image = sample.query.image if sample.query.image is not None else sample.target.image
        caption = sample.target.text if sample.target.text else sample.query.text
        if not caption:
            continue
        concepts = tuple(manual(i)) if manual is not None else ()
        rows.append(CaptionRow(sample.id, image if isinstance(image, str) else None, caption, concepts))
    return rows, dict(getattr(source, "skipped", {}) or {})


# ------------------------------------------------------------------------------------------------ files


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[QARecord]) -> int:
    """Write one JSON object per line, atomically; returns the number of lines."""
    lines = [record.to_json() for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file (blank lines ignored); ``ValueError`` names the file and line of bad JSON."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}, line {number}: not JSON ({error.msg})") from None
    return out


def dedupe(records: Sequence[QARecord]) -> tuple[list[QARecord], int]:
    """Records without repeats of (id, normalised question), first kept; returns (kept, number removed)."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for record in records:
        key = (record.id, normalize_text(record.question))
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)
