"""ROCOv2-VQA: (image + question) -> answer text, from the JSONL that ``fuselip-med data synth-vqa`` writes, or
made on the fly by the rule generator from a ROCOv2 split (a folder, parquet mirror or hub id).

Questions about one image are hard negatives of each other, as the paper groups VG-VQA: they form groups of
up to ``group_size`` consecutive questions, which the sampler keeps in one batch (same image, different
questions, different answers: only the question tells them apart).
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from ..schema import Sample, SampleSide
from . import (
    DatasetNotFoundError,
    check_index,
    clean_caption,
    has_undecodable,
    register_adapter,
    require_nonempty,
    skip_or_raise,
)

__all__ = ["RocoV2VQASource", "rocov2_vqa"]


class RocoV2VQASource:
    """A lazy, indexable VQA source. ``records`` hold (id, image, question, answer, qtype); an image is a path,
    or None when it comes from ``image_source`` (a ROCOv2 source, looked up by ID when indexed)."""

    def __init__(self, *, path: str, split: str, records: list[tuple[str, str | None, str, str, str]],
                 skipped: collections.Counter, group_size: int, image_source: Any = None):
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.name = f"rocov2_vqa/{split}"
        self.path = path
        self.split = split
        self.skipped: collections.Counter[str] = skipped
        self.group_size = group_size
        self._image_source = image_source
        self._image_index = ({image_id: i for i, image_id in enumerate(image_source.image_ids)}
                             if image_source is not None else {})
        self._records = records
        self._groups = _image_groups([r[0] for r in records], group_size)
        self._group_of = {i: g for g, members in enumerate(self._groups) for i in members}
        require_nonempty(len(records), path, "ROCOv2-VQA data", skipped)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        image_id, image, question, answer, qtype = self._records[index]
        if image is None:
            image = self._image_source[self._image_index[image_id]].query.image
        return Sample(id=f"{image_id}/{index}", source="rocov2_vqa", query=SampleSide(image=image, text=question),
                      target=SampleSide(text=answer), group=f"rocov2_vqa/{self._group_of[index]}",
                      meta={"split": self.split, "image_id": image_id, "qtype": qtype})

    def groups(self) -> list[list[int]]:
        """Indices of each image's questions, in groups of at most ``group_size``."""
        return [list(g) for g in self._groups]

    def __repr__(self) -> str:
        return f"RocoV2VQASource(path={self.path!r}, split={self.split!r}, n={len(self)})"


def _image_groups(image_ids: list[str], group_size: int) -> list[list[int]]:
    by_image: dict[str, list[int]] = {}
    for i, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(i)
    return [members[k:k + group_size] for members in by_image.values() for k in range(0, len(members), group_size)]


@register_adapter("rocov2_vqa")
def rocov2_vqa(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
               group_size: int = 4, images: str | None = None, check_files: bool = True,
               qtypes: list[str] | None = None) -> RocoV2VQASource:
    """ROCOv2-VQA from ``path``: a ``.jsonl`` written by ``data synth-vqa`` (``split`` is then only a label), or
    a ROCOv2 split for which the rule generator runs now. ``images``: a ROCOv2 folder/hub id to find records'
    images by ID where the JSONL has none (a parquet-mirror source). ``qtypes`` keeps only those question
    types; ``limit`` caps the records. Bad lines are skipped and counted (``BadRowError`` when strict).
    """
    text = os.fspath(path)
    wanted = set(qtypes) if qtypes else None
    if text.endswith(".jsonl"):
        file = Path(text).expanduser()
        if not file.is_file():
            raise DatasetNotFoundError(f"ROCOv2-VQA file {file} does not exist: write it with `fuselip-med data "
                                       f"synth-vqa --input ROCOv2_data --out {file.name}`.")
        image_source = _rocov2(images, split) if images else None
        records, skipped = _read_jsonl(file, strict, check_files, image_source, wanted, limit)
        return RocoV2VQASource(path=str(file), split=split, records=records, skipped=skipped,
                               group_size=group_size, image_source=image_source)
    from ..synth.rules import rules_qa

    source = _rocov2(text, split)
    records = []
    for i, image_id in enumerate(source.image_ids):
        image = source[i].query.image if source.layout == "official" else None  # parquet bytes: read when indexed
        for qtype, question, answer in rules_qa(source.captions[i], source.manual_concepts(i), image_id):
            if wanted is None or qtype in wanted:
                records.append((image_id, image, question, answer, qtype))
    records = records[:limit] if limit is not None else records
    return RocoV2VQASource(path=text, split=split, records=records, skipped=collections.Counter(source.skipped),
                           group_size=group_size, image_source=source)


def _rocov2(path: str, split: str):
    from .rocov2 import rocov2

    return rocov2(path, split=split)


def _read_jsonl(file: Path, strict: bool, check_files: bool, image_source: Any, wanted: set[str] | None,
                limit: int | None) -> tuple[list[tuple[str, str | None, str, str, str]], collections.Counter]:
    skipped: collections.Counter[str] = collections.Counter()
    known = set(image_source.image_ids) if image_source is not None else set()
    records = []
    with open(file, encoding="utf-8", errors="surrogateescape") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file}, line {line_number}"
            if has_undecodable(line):
                skip_or_raise(skipped, strict, "non-utf8 text", where)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                skip_or_raise(skipped, strict, "bad json line", where, error.msg)
                continue
            if not isinstance(obj, dict):
                skip_or_raise(skipped, strict, "bad json line", where, "not an object")
                continue
            image_id = str(obj.get("id") or "").strip()
            question, answer = clean_caption(obj.get("question")), clean_caption(obj.get("answer"))
            if not image_id:
                skip_or_raise(skipped, strict, "missing id", where)
                continue
            if not question or not answer:
                skip_or_raise(skipped, strict, "empty question" if not question else "empty answer", where, image_id)
                continue
            if wanted is not None and obj.get("qtype") not in wanted:
                continue
            image = obj.get("image")
            if isinstance(image, str) and image:
                image = image if os.path.isabs(image) else str(file.parent / image)
                if check_files and not os.path.isfile(image):
                    if image_id not in known:
                        skip_or_raise(skipped, strict, "missing image", where, image)
                        continue
                    image = None
            elif image_id in known:
                image = None
            else:
                skip_or_raise(skipped, strict, "missing image", where, f"no image for {image_id}; pass images=DIR")
                continue
            records.append((image_id, image, question, answer, str(obj.get("qtype") or "")))
    return records, skipped
