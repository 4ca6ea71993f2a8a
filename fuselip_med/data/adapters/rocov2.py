"""ROCOv2 image-caption pairs with UMLS concepts, from the official release or the Hugging Face parquet mirror
(the layout is detected from ``path``; see shared data-formats: file names, columns, image folders)."""
from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuselip_med.vocab import ROCOV2_MANUAL_CUI_NAMES, ROCOV2_MODALITIES

from ...option_names import advise_dataset
from ..schema import Sample
from ..skips import SkipReport
from . import (
    DatasetEmptyError,
    DatasetNotFoundError,
    check_index,
    check_pair_mode,
    check_parquet_files,
    clean_caption,
    csv_rows,
    has_undecodable,
    image_files,
    load_hub_dataset,
    pair_sample,
    parquet_image_cells,
    register_adapter,
    require_column_types,
    require_nonempty,
    singleton_groups,
    skip_or_raise,
    take,
)

# Official release: {split}_captions.csv (ID,Caption), {split}_concepts.csv and {split}_concepts_manual.csv
# (ID,CUIs joined by ';'), cui_mapping.csv (CUI,Canonical name); images {split}_images/{split}/<ID>.jpg or
# flattened {split}/<ID>.jpg (.png/.dcm with the same stem too). HF mirror: data/{train,validation,test}-*.parquet
# with image {bytes, path}, image_id, caption, cui (manual concepts only, ["nan"] when none; train repeats 4 ids).

__all__ = ["ROCOV2_MANUAL_CUI_NAMES", "ROCOV2_MODALITIES", "RocoV2Source", "rocov2"]

_SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}
_FILE_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}
_HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")  # preference order when one ID has several files
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

def how_to_get() -> str:
    """Where to get ROCOv2 and how to pass it (to ``eval`` or to a recipe: ``option_names.advise_dataset``)."""
    get = ("download ROCOv2 with `python data_tools/download_rocov2.py --out ROCOv2_data` (or the docker download "
           "image) and pass that folder")
    return get + advise_dataset("rocov2", "ROCOv2_data")


def canonical_split(split: str) -> str:
    """``train``/``valid``/``test`` for a split name, accepting ``validation`` and ``val`` for ``valid``."""
    try:
        return _SPLIT_ALIASES[str(split).lower()]
    except KeyError:
        raise ValueError(f"unknown ROCOv2 split {split!r}: use one of train, valid (or validation), test") from None


def parse_cuis(text: str | None) -> tuple[str, ...]:
    """CUIs from a ``C1;C2`` cell (spaces tolerated); empty cells and the mirror's ``nan`` give none."""
    if not text:
        return ()
    return tuple(c for c in (part.strip() for part in text.split(";")) if c and c.lower() != "nan")


def modality_of(*concept_lists: Sequence[str]) -> str | None:
    """The short modality name of the first modality CUI found, looking through the lists in order."""
    for concepts in concept_lists:
        for cui in concepts:
            if cui in ROCOV2_MODALITIES:
                return ROCOV2_MODALITIES[cui]
    return None


@dataclass
class _Rows:
    """What a layout reader hands the source: parallel per-sample lists, already filtered. ``images`` holds
    paths (official layout, and path-only parquet cells checked by ``parquet_image_cells``) or row numbers into
    ``dataset`` (the mirror's parquet, whose embedded bytes are read one row at a time)."""

    ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    concepts: list[tuple[str, ...]] = field(default_factory=list)
    manual: list[tuple[str, ...]] = field(default_factory=list)
    images: list[str | int] = field(default_factory=list)
    dataset: Any = None
    skipped: SkipReport = field(default_factory=SkipReport)


class RocoV2Source:
    """A lazy, indexable ROCOv2 split: ``source[i]`` is a ``Sample`` whose image is a path or encoded bytes."""

    def __init__(self, rows: _Rows, *, path: str, split: str, layout: str, cui_names: dict[str, str],
                 pair_mode: str = "image_to_caption", limit: int | None = None):
        n = len(take(rows.ids, limit))
        self.name = f"rocov2/{split}"
        self.path = path
        self.split = split
        self.layout = layout  # "official" or "hf"
        self.pair_mode = check_pair_mode(pair_mode, "rocov2")
        self.skipped: collections.Counter[str] = rows.skipped
        self.cui_names: dict[str, str] = cui_names
        self.image_ids: list[str] = rows.ids[:n]
        self.captions: list[str] = rows.captions[:n]
        self._concepts = rows.concepts[:n]
        self._manual = rows.manual[:n]
        self._images = rows.images[:n]
        self._dataset = None if rows.dataset is None else rows.dataset.select_columns(["image"])
        self._modalities = [modality_of(m, c) for m, c in zip(self._manual, self._concepts)]
        require_nonempty(n, path, f"ROCOv2 split {split!r}", self.skipped)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        concepts = list(self._concepts[index])
        meta = {
            "concepts": concepts,
            "concepts_manual": list(self._manual[index]),
            "concept_names": [self.cui_names.get(c, c) for c in concepts],
            "modality": self._modalities[index],
            "split": self.split,
            "image_id": self.image_ids[index],
        }
        return pair_sample(self.pair_mode, id=self.image_ids[index], source="rocov2", image=self._image(index),
                           caption=self.captions[index], meta=meta)

    def _image(self, index: int) -> str | bytes:
        image = self._images[index]
        if isinstance(image, str):
            return image
        return self._dataset[image]["image"]["bytes"]  # one row: bytes stay encoded (decode=False)

    def groups(self) -> list[list[int]]:
        return singleton_groups(len(self))

    def concepts(self, index: int) -> list[str]:
        """All concepts of sample ``index`` (``concepts.csv``; the mirror has only the manual ones)."""
        return list(self._concepts[check_index(index, len(self))])

    def manual_concepts(self, index: int) -> list[str]:
        """The manually curated concepts of sample ``index`` (``concepts_manual.csv`` / the mirror's ``cui``)."""
        return list(self._manual[check_index(index, len(self))])

    def modality_labels(self) -> list[str | None]:
        """Per sample, the short modality name (CT, MRI, X-ray, ultrasound, angiography, PET) or None."""
        return list(self._modalities)

    def __repr__(self) -> str:
        return f"RocoV2Source(path={self.path!r}, split={self.split!r}, layout={self.layout!r}, n={len(self)})"


@register_adapter("rocov2")
def rocov2(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
           pair_mode: str = "image_to_caption", cache_dir: str | None = None,
           revision: str | None = None) -> RocoV2Source:
    """ROCOv2 ``split`` from an official-release folder, a folder of the mirror's parquet shards or a hub id
    (``eltorio/ROCOv2-radiology``); ``cache_dir``/``revision`` go to ``datasets.load_dataset``."""
    split = canonical_split(split)
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.exists():
        if local.is_dir() and _official_captions_file(local, split) is not None:
            rows = _read_official(local, split, strict)
            layout = "official"
        else:
            files = _parquet_files(local, split)
            if not files:
                raise DatasetNotFoundError(
                    f"{local} holds neither the official ROCOv2 files ({split}_captions.csv) nor the Hugging Face "
                    f"parquet shards (data/{_HF_SPLITS[split]}-*.parquet): {how_to_get()}.")
            dataset = _load_hf(files=files, split=split, cache_dir=cache_dir, revision=revision, where=str(local))
            rows = _read_hf(dataset, split, strict, where=str(local), files=files,
                            folder=str(local if local.is_dir() else local.parent))
            layout = "hf"
    else:
        hub_id = text.removeprefix("hf://datasets/")
        if not _HUB_ID.match(hub_id):
            raise DatasetNotFoundError(f"ROCOv2 path {text} does not exist: {how_to_get()}.")
        dataset = _load_hf(hub_id=hub_id, split=split, cache_dir=cache_dir, revision=revision, where=hub_id)
        rows = _read_hf(dataset, split, strict, where=hub_id, folder=None)
        layout = "hf"
    # the mirror ships no cui_mapping.csv: its concepts (the manual ones) get the fixed table's names
    cui_names = {**ROCOV2_MANUAL_CUI_NAMES, **_read_cui_mapping(local / "cui_mapping.csv")}
    return RocoV2Source(rows, path=text, split=split, layout=layout, cui_names=cui_names, pair_mode=pair_mode,
                        limit=limit)


# ------------------------------------------------------------------------------------- official release


def _official_captions_file(root: Path, split: str) -> Path | None:
    for name in _FILE_SPLIT_NAMES[split]:
        candidate = root / f"{name}_captions.csv"
        if candidate.is_file():
            return candidate
    return None


def _data_rows(file: Path, strict: bool, skipped: collections.Counter,
               reason: str = "bad csv row") -> Iterator[tuple[int, list[str]]]:
    """The rows of a ROCOv2 CSV after its header (a file without one starts with data)."""
    rows = csv_rows(file, strict, skipped, reason=reason)
    for line, fields in rows:
        if fields[0].strip().upper() not in ("ID", "CUI"):
            yield line, fields
        break
    yield from rows


def _read_concepts(file: Path, strict: bool, skipped: collections.Counter) -> dict[str, tuple[str, ...]]:
    concepts: dict[str, tuple[str, ...]] = {}
    if not file.is_file():
        return concepts
    for line, fields in _data_rows(file, strict, skipped, "bad concepts row"):
        if len(fields) > 2 or not fields[0].strip():
            skip_or_raise(skipped, strict, "bad concepts row", f"{file}, line {line}", f"{len(fields)} fields")
            continue
        concepts[fields[0].strip()] = parse_cuis(fields[1] if len(fields) > 1 else "")
    return concepts


def _read_cui_mapping(file: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    if not file.is_file():
        return names
    for _, fields in _data_rows(file, False, collections.Counter(), "bad cui_mapping row"):
        if len(fields) >= 2 and fields[0].strip():
            names[fields[0].strip()] = ",".join(fields[1:]).strip()
    return names


def _image_index(root: Path, split: str) -> dict[str, str]:
    """ID -> image path over the nested and flattened image folders of ``split`` (one directory listing each)."""
    folders = []
    for name in _FILE_SPLIT_NAMES[split]:
        folders += [root / f"{name}_images" / name, root / f"{name}_images", root / name]
    files = image_files(folders, IMAGE_SUFFIXES)
    if files is None:
        archive = root / f"{split}_images.zip"
        hint = f"unzip {archive} in {root}" if archive.is_file() else how_to_get()
        raise DatasetNotFoundError(
            f"{root} has {split}_captions.csv but no image folder ({root / f'{split}_images' / split} or "
            f"{root / split}): {hint}.")
    found: dict[str, str] = {}
    for stem, _, path in sorted(files, key=lambda file: IMAGE_SUFFIXES.index(file[1])):  # stable: folder order
        found.setdefault(stem, path)
    return found


def _read_official(root: Path, split: str, strict: bool) -> _Rows:
    captions_file = _official_captions_file(root, split)
    assert captions_file is not None
    prefix = captions_file.name[: -len("_captions.csv")]
    rows = _Rows()
    skipped = rows.skipped
    images = _image_index(root, split)
    concepts = _read_concepts(root / f"{prefix}_concepts.csv", strict, skipped)
    manual = _read_concepts(root / f"{prefix}_concepts_manual.csv", strict, skipped)
    seen: set[str] = set()
    for line, fields in _data_rows(captions_file, strict, skipped, "bad csv row"):
        where = f"{captions_file}, line {line}"
        row_id = fields[0].strip() if fields and not has_undecodable(fields[0]) else ""
        if len(fields) != 2 or not fields[0].strip():
            skip_or_raise(skipped, strict, "bad csv row", where, f"expected ID,Caption, got {len(fields)} fields",
                          id=row_id or f"line {line}")
            continue
        image_id, caption = fields[0].strip(), clean_caption(fields[1])
        if has_undecodable(fields[0]) or has_undecodable(caption):
            skip_or_raise(skipped, strict, "non-utf8 text", where, id=row_id or f"line {line}")
            continue
        if image_id in seen:
            skip_or_raise(skipped, strict, "duplicate id", where, image_id, id=image_id)
            continue
        if not caption:
            skip_or_raise(skipped, strict, "empty caption", where, image_id, id=image_id)
            continue
        image = images.get(image_id)
        if image is None:
            skip_or_raise(skipped, strict, "missing image", where, f"no {image_id}.jpg/.png/.dcm", id=image_id)
            continue
        seen.add(image_id)
        manual_cuis = manual.get(image_id, ())
        rows.ids.append(image_id)
        rows.captions.append(caption)
        rows.manual.append(manual_cuis)
        rows.concepts.append(concepts.get(image_id, manual_cuis))
        rows.images.append(image)
    return rows


# ----------------------------------------------------------------------------------- Hugging Face mirror


def _parquet_files(root: Path, split: str) -> list[str]:
    if root.is_file():
        return [str(root)] if root.suffix == ".parquet" else []
    for name in (_HF_SPLITS[split], *_FILE_SPLIT_NAMES[split]):
        for folder in (root / "data", root):
            files = sorted(folder.glob(f"{name}-*.parquet"))
            if files:
                return [str(f) for f in files]
    return []


def _load_hf(*, split: str, where: str, files: list[str] | None = None, hub_id: str | None = None,
             cache_dir: str | None = None, revision: str | None = None):
    """The split as a ``datasets.Dataset`` whose image column yields raw bytes (``Image(decode=False)``)."""
    import datasets  # heavy; only the parquet layouts need it

    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    hf_split = _HF_SPLITS[split]
    if files is not None:
        check_parquet_files(files, "ROCOv2")
        dataset = datasets.load_dataset("parquet", data_files={hf_split: files}, split=hf_split, **kwargs)
    else:
        if revision is not None:
            kwargs["revision"] = revision
        dataset = load_hub_dataset(hub_id, hf_split, "ROCOv2", how_to_get(), **kwargs)
    missing = {"image", "image_id", "caption"} - set(dataset.column_names)
    if missing:
        raise DatasetEmptyError(
            f"{where} ({hf_split}) lacks the ROCOv2 columns {sorted(missing)} (has {dataset.column_names}).")
    require_column_types(dataset.data.schema, {"image_id": "text", "caption": "text", "cui": "text list"},
                         f"{where} ({hf_split})")
    return dataset.cast_column("image", datasets.Image(decode=False))


def _shard_rows(files: list[str]) -> list[tuple[int, str]]:
    """(first global row, file) of each parquet shard, from the footers (the loader concatenates them in order)."""
    import pyarrow.parquet as pq

    starts, first = [], 0
    for file in files:
        starts.append((first, file))
        first += pq.ParquetFile(file).metadata.num_rows
    return starts


def _read_hf(dataset, split: str, strict: bool, where: str, files: list[str] | None = None, *,
             folder: str | None) -> _Rows:
    rows = _Rows()
    skipped = rows.skipped
    columns = ["image_id", "caption"] + (["cui"] if "cui" in dataset.column_names else [])
    table = dataset.select_columns(columns).with_format("arrow")[:]
    ids = table.column("image_id").to_pylist()
    captions = table.column("caption").to_pylist()
    cuis = table.column("cui").to_pylist() if "cui" in columns else [None] * len(ids)
    cells = parquet_image_cells(dataset, "image", folder)
    shards = _shard_rows(files) if files else []
    seen: dict[str, str] = {}
    for row, (image_id, caption, cui) in enumerate(zip(ids, captions, cuis)):
        first, shard = next(((f, name) for f, name in reversed(shards) if f <= row), (0, None))
        at = f"{shard}, row {row - first}" if shard else f"{where} ({_HF_SPLITS[split]}), row {row}"
        image_id = (image_id or "").strip()
        caption = clean_caption(caption)
        if not image_id:
            skip_or_raise(skipped, strict, "missing id", at, id=f"row {row}")
            continue
        if image_id in seen:  # the train split of the mirror repeats 4 image ids, also across shards
            skip_or_raise(skipped, strict, "duplicate id", at, f"first at {seen[image_id]}", id=image_id)
            continue
        if not caption:
            skip_or_raise(skipped, strict, "empty caption", at, image_id, id=image_id)
            continue
        if isinstance(cells[row], tuple):
            skip_or_raise(skipped, strict, cells[row][0], at, cells[row][1], id=image_id)
            continue
        seen[image_id] = at
        manual = parse_cuis(";".join(cui or ()))
        rows.images.append(cells[row] if isinstance(cells[row], str) else row)
        rows.ids.append(image_id)
        rows.captions.append(caption)
        rows.manual.append(manual)
        rows.concepts.append(manual)
    rows.dataset = dataset
    return rows
