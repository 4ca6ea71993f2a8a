"""CC3M-VQA: generated questions about CC3M images, a CSV ``path,question,answer`` read with
``keep_default_na=False`` (answers such as "None" or "NA" stay text); image paths are relative to the CSV's folder."""
from __future__ import annotations

import collections
import os
from pathlib import Path, PurePosixPath

from ..schema import Sample, SampleSide
from ..skips import SkipReport
from . import (
    DatasetNotFoundError,
    check_index,
    clean_caption,
    has_undecodable,
    register_adapter,
    require_nonempty,
    singleton_groups,
    skip_or_raise,
)
from .cc import check_limit, read_csv_columns, resolve_image_path

__all__ = ["VQASource", "cc3m_vqa"]


class VQASource:
    """A lazy, indexable VQA table: ``source[i]`` is (question + image) -> answer text, no target image."""

    def __init__(self, *, path: str, split: str, records: list[tuple[str, str, str, str]],
                 skipped: collections.Counter):
        self.name = f"cc3m_vqa/{split}"
        self.path = path
        self.split = split
        self.skipped: collections.Counter[str] = skipped
        self._records = records  # (id, image path, question, answer)
        require_nonempty(len(records), path, "CC3M-VQA table", skipped)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        sample_id, image, question, answer = self._records[check_index(index, len(self))]
        return Sample(id=sample_id, source="cc3m_vqa", query=SampleSide(image=image, text=question),
                      target=SampleSide(text=answer),
                      meta={"split": self.split, "path": image})

    def groups(self) -> list[list[int]]:
        return singleton_groups(len(self))

    def __repr__(self) -> str:
        return f"VQASource(path={self.path!r}, split={self.split!r}, n={len(self)})"


@register_adapter("cc3m_vqa")
def cc3m_vqa(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
             check_files: bool = True) -> VQASource:
    """Question + image -> answer pairs from the CSV at ``path``; rows with an empty question or answer or a
    missing image are skipped and counted. ``check_files=False`` skips the per-row image existence check."""
    file = Path(os.fspath(path)).expanduser()
    if not file.is_file():
        raise DatasetNotFoundError(f"CC3M-VQA table {file} does not exist: give the CSV with columns "
                                   f"path,question,answer (image paths relative to its folder or absolute).")
    check_limit(limit)
    skipped = SkipReport()
    table = read_csv_columns(file, ("path", "question", "answer"), strict, skipped)
    records: list[tuple[str, str, str, str]] = []
    rows = zip(table["path"], table["question"], table["answer"])
    for row, (written, question, answer) in enumerate(rows, start=1):
        if limit is not None and len(records) >= limit:
            break
        where = f"{file}, row {row}"
        written, question, answer = written.strip(), clean_caption(question), clean_caption(answer)
        if any(has_undecodable(text) for text in (written, question, answer)):
            skip_or_raise(skipped, strict, "non-utf8 text", where)
            continue
        if not question:
            skip_or_raise(skipped, strict, "empty question", where, written, id=written)
            continue
        if not answer:
            skip_or_raise(skipped, strict, "empty answer", where, written, id=written)
            continue
        image = resolve_image_path(file.parent, written)
        if not written or (check_files and not os.path.isfile(image)):
            skip_or_raise(skipped, strict, "missing image", where, image, id=written)
            continue
        stem = PurePosixPath(written.replace("\\", "/")).stem
        records.append((f"{stem}/{row}", image, question, answer))
    return VQASource(path=str(file), split=split, records=records, skipped=skipped)
