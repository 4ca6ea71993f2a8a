"""HQ-Edit image edits (``UCSC-VLAA/HQ-Edit``, or a local folder of its parquet shards): each of the N rows gives
three samples, i = edit + input image -> output image, N+i = inverse edit + output image -> input image (the
forward edit's hard negative, same group), 2N+i = edit + input image -> output text + output image (alone).
Images stay encoded bytes (``Image(decode=False)``), fetched one row at a time."""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Any

from ..schema import Sample, SampleSide
from ..skips import SkipReport
from . import (
    DatasetEmptyError,
    DatasetNotFoundError,
    check_index,
    check_parquet_files,
    clean_caption,
    load_hub_dataset,
    parquet_image_cells,
    register_adapter,
    require_column_types,
    require_nonempty,
    skip_or_raise,
)
from .cc import check_limit

__all__ = ["HQEditSource", "hq_edit"]

HUB_ID = "UCSC-VLAA/HQ-Edit"
TEXT_COLUMNS = ("input", "edit", "inverse_edit", "output")
IMAGE_COLUMNS = ("input_image", "output_image")
KINDS = ("edit", "inverse", "edit_text")  # the three samples of a row, in index blocks of N
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HOW_TO_GET = (f"pass the hub id {HUB_ID} (with network access or a filled Hugging Face cache) or a folder of its "
              "parquet shards (data/train-*.parquet)")


class HQEditSource:
    """A lazy, indexable HQ-Edit split of 3N samples (module docstring); groups [i, N+i] and [2N+i]."""

    def __init__(self, dataset: Any, rows: list[int], texts: dict[str, list[str]], *, path: str, split: str,
                 skipped: collections.Counter, paths: dict[tuple[int, str], str] | None = None):
        self.name = f"hq_edit/{split}"
        self.path = path
        self.split = split
        self.skipped: collections.Counter[str] = skipped
        self.rows = rows  # the dataset row of each kept edit
        self._paths = paths or {}  # (row, image column) -> checked path of a path-only cell (parquet_image_cells)
        self._texts = texts
        self._dataset = dataset.select_columns(list(IMAGE_COLUMNS))
        require_nonempty(len(rows), path, f"HQ-Edit split {split!r}", skipped)

    def __len__(self) -> int:
        return 3 * len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        block, i = divmod(check_index(index, len(self)), len(self.rows))
        row = self.rows[i]
        record = self._dataset[row]  # one row read: both images' bytes stay encoded (decode=False)
        source_image, target_image = (self._paths.get((row, name)) or record[name]["bytes"] for name in IMAGE_COLUMNS)
        text = self._texts["edit"][i]
        target_text = None
        if block == 1:
            source_image, target_image = target_image, source_image
            text = self._texts["inverse_edit"][i]
        elif block == 2:
            target_text = self._texts["output"][i] or None
        meta = {"split": self.split, "row": row, "kind": KINDS[block], "input": self._texts["input"][i],
                "output": self._texts["output"][i]}
        return Sample(id=f"{row}/{KINDS[block]}", source="hq_edit", query=SampleSide(image=source_image, text=text),
                      target=SampleSide(image=target_image, text=target_text),
                      group=f"{self.name}/{row}" if block < 2 else None, meta=meta)

    def groups(self) -> list[list[int]]:
        n = len(self.rows)
        return [[i, n + i] for i in range(n)] + [[2 * n + i] for i in range(n)]

    def __repr__(self) -> str:
        return f"HQEditSource(path={self.path!r}, split={self.split!r}, edits={len(self.rows)}, n={len(self)})"


@register_adapter("hq_edit")
def hq_edit(path: str | os.PathLike = HUB_ID, split: str = "train", limit: int | None = None, strict: bool = False,
            *, cache_dir: str | None = None, revision: str | None = None) -> HQEditSource:
    """HQ-Edit ``split`` from a hub id or a local parquet folder/file; ``limit`` counts rows (3 samples each).
    Rows with an empty edit or inverse edit or a missing image are skipped and counted."""
    check_limit(limit)
    text = os.fspath(path)
    dataset = _load(text, split, cache_dir, revision)
    where = f"{text} ({split})"
    skipped = SkipReport()
    table = dataset.select_columns(list(TEXT_COLUMNS)).with_format("arrow")[:]
    columns = {name: table.column(name).to_pylist() for name in TEXT_COLUMNS}
    local = Path(text).expanduser()
    folder = str(local if local.is_dir() else local.parent) if local.exists() else None
    cells = {name: parquet_image_cells(dataset, name, folder) for name in IMAGE_COLUMNS}
    paths: dict[tuple[int, str], str] = {}
    rows: list[int] = []
    texts: dict[str, list[str]] = {name: [] for name in TEXT_COLUMNS}
    for row in range(len(dataset)):
        if limit is not None and len(rows) >= limit:
            break
        values = {name: clean_caption(columns[name][row]) for name in TEXT_COLUMNS}
        if not values["edit"]:
            skip_or_raise(skipped, strict, "empty edit", f"{where}, row {row}")
        elif not values["inverse_edit"]:
            skip_or_raise(skipped, strict, "empty inverse edit", f"{where}, row {row}")
        elif problem := next((cells[name][row] for name in IMAGE_COLUMNS if isinstance(cells[name][row], tuple)),
                             None):
            reason = "missing image" if problem[0] == "null image" else problem[0]
            skip_or_raise(skipped, strict, reason, f"{where}, row {row}", problem[1])
        else:
            rows.append(row)
            paths.update({(row, name): cells[name][row] for name in IMAGE_COLUMNS if isinstance(cells[name][row], str)})
            for name in TEXT_COLUMNS:
                texts[name].append(values[name])
    return HQEditSource(dataset, rows, texts, path=text, split=split, skipped=skipped, paths=paths)


def _parquet_files(root: Path, split: str) -> list[str]:
    if root.is_file():
        return [str(root)] if root.suffix == ".parquet" else []
    for pattern in (f"data/{split}-*.parquet", f"{split}-*.parquet", "**/*.parquet"):
        files = sorted(root.glob(pattern))
        if files:
            return [str(f) for f in files]
    return []


def _load(text: str, split: str, cache_dir: str | None, revision: str | None):
    """The split as a ``datasets.Dataset`` whose image columns yield raw bytes."""
    import datasets

    kwargs: dict[str, Any] = {} if cache_dir is None else {"cache_dir": cache_dir}
    local = Path(text).expanduser()
    if local.exists():
        files = _parquet_files(local, split)
        if not files:
            raise DatasetNotFoundError(f"{local} holds no HQ-Edit parquet shards: {HOW_TO_GET}.")
        check_parquet_files(files, "HQ-Edit")
        dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split, **kwargs)
    else:
        hub_id = text.removeprefix("hf://datasets/")
        if not _HUB_ID.match(hub_id):
            raise DatasetNotFoundError(f"HQ-Edit path {text} does not exist: {HOW_TO_GET}.")
        if revision is not None:
            kwargs["revision"] = revision
        dataset = load_hub_dataset(hub_id, split, "HQ-Edit", HOW_TO_GET, **kwargs)
    missing = sorted(set(TEXT_COLUMNS + IMAGE_COLUMNS) - set(dataset.column_names))
    if missing:
        raise DatasetEmptyError(f"{text} ({split}) lacks the HQ-Edit columns {missing} (has {dataset.column_names}).")
    require_column_types(dataset.data.schema, dict.fromkeys(TEXT_COLUMNS, "text"), f"{text} ({split})")
    for name in IMAGE_COLUMNS:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


