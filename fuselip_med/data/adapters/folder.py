"""A user's own image-caption data: a CSV/TSV with ``path,caption`` (+ ``id``, ``label``, ``labels``, ``modality``,
``group``), or a folder of images with sidecar captions (``scan.txt`` or ``scan.jpg.txt``)."""
from __future__ import annotations

import collections
import os
from pathlib import Path

from ..schema import Sample
from . import (
    DatasetEmptyError,
    DatasetNotFoundError,
    check_index,
    check_pair_mode,
    clean_caption,
    csv_rows,
    has_undecodable,
    pair_sample,
    register_adapter,
    require_nonempty,
    skip_or_raise,
    take,
)

__all__ = ["FolderSource", "folder", "normalize_modality"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
_SPLIT_FILE_NAMES = {"valid": ("valid", "validation", "val"), "validation": ("validation", "valid", "val"),
                     "val": ("val", "valid", "validation")}

# Spellings users write in a modality column -> the short names the ROCOv2 adapter uses.
_MODALITY_ALIASES = {
    "ct": "CT", "computed tomography": "CT", "x-ray computed tomography": "CT",
    "mr": "MRI", "mri": "MRI", "magnetic resonance imaging": "MRI",
    "x-ray": "X-ray", "xray": "X-ray", "x ray": "X-ray", "radiograph": "X-ray", "radiography": "X-ray",
    "plain x-ray": "X-ray", "cr": "X-ray", "dx": "X-ray",
    "us": "ultrasound", "ultrasound": "ultrasound", "ultrasonography": "ultrasound", "sonography": "ultrasound",
    "angiography": "angiography", "angiogram": "angiography", "xa": "angiography",
    "pet": "PET", "pt": "PET", "positron-emission tomography": "PET",
}

HOW_TO_USE = ("give a CSV/TSV with columns path,caption (paths relative to the table's folder or absolute) or a "
              "folder of images with <image>.txt captions")


def normalize_modality(value: str | None) -> str | None:
    """The short modality name (CT, MRI, X-ray, ultrasound, angiography, PET) for common spellings; other
    non-empty values are kept as written, empty ones give None."""
    if value is None or not value.strip():
        return None
    return _MODALITY_ALIASES.get(value.strip().lower(), value.strip())


class FolderSource:
    """A lazy, indexable image-caption source over a user table or sidecar folder."""

    def __init__(self, *, name: str, path: str, split: str, records: list[dict], skipped: collections.Counter,
                 pair_mode: str = "image_to_caption", limit: int | None = None):
        self.name = name
        self.path = path
        self.split = split
        self.pair_mode = check_pair_mode(pair_mode, "folder")
        self.skipped: collections.Counter[str] = skipped
        self._records = list(take(records, limit))
        require_nonempty(len(self._records), path, "image-caption data", skipped)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        record = self._records[check_index(index, len(self))]
        meta = {"labels": list(record["labels"]), "label": record["label"], "modality": record["modality"],
                "split": self.split, "path": record["path"]}
        return pair_sample(self.pair_mode, id=record["id"], source=self.name, image=record["path"],
                           caption=record["caption"], meta=meta, group=record["group"])

    def groups(self) -> list[list[int]]:
        """Indices grouped by the table's ``group`` column (singletons where it is absent or empty)."""
        by_key: dict[str, list[int]] = {}
        for i, record in enumerate(self._records):
            by_key.setdefault(record["group"] or f"\0{i}", []).append(i)
        return list(by_key.values())

    def labels(self, index: int) -> list[str]:
        return list(self._records[check_index(index, len(self))]["labels"])

    def modality_labels(self) -> list[str | None]:
        return [r["modality"] for r in self._records]

    def __repr__(self) -> str:
        return f"FolderSource(path={self.path!r}, split={self.split!r}, n={len(self)})"


@register_adapter("csv")
@register_adapter("folder")
def folder(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
           pair_mode: str = "image_to_caption", image_root: str | None = None, path_column: str = "path",
           caption_column: str = "caption", delimiter: str | None = None, check_files: bool = True,
           require_captions: bool = True) -> FolderSource:
    """Image-caption pairs from a table or a sidecar folder (see the module doc). ``check_files=False`` skips the
    per-row existence check of table paths (for huge tables on slow storage; decoding still reports them).
    ``require_captions=False`` keeps images without a caption (caption ""): labelled images for zero-shot
    classification; in a folder, an image in a subfolder gets the subfolder's name as its ``label``."""
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"image-caption data path {root} does not exist: {HOW_TO_USE}.")
    table = root if root.is_file() else _split_table(root, split)
    skipped: collections.Counter[str] = collections.Counter()
    if table is not None:
        records = _read_table(table, strict, skipped, image_root=image_root, path_column=path_column,
                              caption_column=caption_column, delimiter=delimiter, check_files=check_files,
                              require_captions=require_captions)
        name = f"csv/{table.stem}"
    else:
        images_dir = root / split if (root / split).is_dir() else root
        records = _read_sidecars(images_dir, strict, skipped, require_captions)
        name = f"folder/{images_dir.name}"
    return FolderSource(name=name, path=str(table or root), split=split, records=records, skipped=skipped,
                        pair_mode=pair_mode, limit=limit)


def _split_table(root: Path, split: str) -> Path | None:
    for name in _SPLIT_FILE_NAMES.get(split, (split,)):
        for suffix in TABLE_SUFFIXES:
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    return None


def _record(id: str, path: str, caption: str, labels: list[str] | None = None, label: str | None = None,
            modality: str | None = None, group: str | None = None) -> dict:
    return {"id": id, "path": path, "caption": caption, "labels": labels or [], "label": label,
            "modality": modality, "group": group}


def _unique_id(candidate: str, seen: dict[str, int]) -> str:
    """``candidate``, or ``candidate#k`` for its k-th repeat (one image listed with several captions)."""
    count = seen.get(candidate, 0) + 1
    seen[candidate] = count
    return candidate if count == 1 else f"{candidate}#{count}"


def _read_table(table: Path, strict: bool, skipped: collections.Counter, *, image_root: str | None,
                path_column: str, caption_column: str, delimiter: str | None, check_files: bool,
                require_captions: bool = True) -> list[dict]:
    base = Path(image_root).expanduser() if image_root else table.parent
    if delimiter is None:
        with open(table, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        tabbed = table.suffix.lower() in (".tsv", ".tab") or ("\t" in first and "," not in first)
        delimiter = "\t" if tabbed else ","
    rows = csv_rows(table, strict, skipped, delimiter=delimiter)
    header = [h.strip().lower() for h in next(rows, (0, []))[1]]
    columns = {name: i for i, name in reversed(list(enumerate(header)))}
    for wanted, option in ((path_column, "path_column"), (caption_column, "caption_column")):
        if wanted.lower() not in columns and (require_captions or option == "path_column"):
            raise DatasetEmptyError(
                f"{table} has no column {wanted!r} (its columns: {', '.join(header) or 'none'}); rename the "
                f"column or pass {option}=NAME.")
    at = {key: columns.get(key) for key in ("id", "label", "labels", "modality", "group")}
    i_path, i_caption = columns[path_column.lower()], columns.get(caption_column.lower())
    records: list[dict] = []
    seen: dict[str, int] = {}
    for line, fields in rows:
        where = f"{table}, line {line}"
        if len(fields) != len(header):
            skip_or_raise(skipped, strict, "bad csv row", where, f"{len(fields)} fields, header has {len(header)}")
            continue
        if any(has_undecodable(f) for f in fields):
            skip_or_raise(skipped, strict, "non-utf8 text", where)
            continue
        written = fields[i_path].strip()
        caption = clean_caption(fields[i_caption]) if i_caption is not None else ""
        if not caption and require_captions:
            skip_or_raise(skipped, strict, "empty caption", where, written)
            continue
        expanded = os.path.expanduser(written)
        resolved = expanded if os.path.isabs(expanded) else str(base / written)
        if not written or (check_files and not os.path.isfile(resolved)):
            skip_or_raise(skipped, strict, "missing image", where, resolved)
            continue
        cell = {key: fields[i].strip() if i is not None else "" for key, i in at.items()}
        labels = [x.strip() for x in cell["labels"].split(";") if x.strip()]
        label = cell["label"] or None
        if label is not None and label not in labels:
            labels.insert(0, label)
        records.append(_record(_unique_id(cell["id"] or written, seen), resolved, caption, labels, label,
                               normalize_modality(cell["modality"]), cell["group"] or None))
    return records


def _sidecar(image: Path) -> Path | None:
    for candidate in (image.with_name(image.name + ".txt"), image.with_suffix(".txt")):
        if candidate.is_file():
            return candidate
    return None


def _read_sidecars(root: Path, strict: bool, skipped: collections.Counter,
                   require_captions: bool = True) -> list[dict]:
    records: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if os.path.splitext(filename)[1].lower() not in IMAGE_SUFFIXES:
                continue
            image = Path(dirpath) / filename
            rel = image.relative_to(root).as_posix()
            caption_file = _sidecar(image)
            label = Path(rel).parts[0] if len(Path(rel).parts) > 1 else None
            if caption_file is None and not require_captions:
                records.append(_record(rel, str(image), "", [label] if label else None, label))
                continue
            if caption_file is None:
                skip_or_raise(skipped, strict, "missing caption", str(image), f"no {filename}.txt or "
                              f"{os.path.splitext(filename)[0]}.txt beside it")
                continue
            text = caption_file.read_text(encoding="utf-8", errors="surrogateescape")
            if has_undecodable(text):
                skip_or_raise(skipped, strict, "non-utf8 text", str(caption_file))
                continue
            caption = clean_caption(text)
            if not caption:
                skip_or_raise(skipped, strict, "empty caption", str(caption_file))
                continue
            records.append(_record(rel, str(image), caption, [label] if label else None, label))
    return records
