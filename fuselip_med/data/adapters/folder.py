"""A user's own image-caption data: a CSV/TSV with ``path,caption`` (+ ``id``, ``label``, ``labels``, ``modality``,
``group``), or a folder of images with sidecar captions (``scan.txt`` or ``scan.jpg.txt``).

Captions are optional where the task does not need them (``require_caption=False``: image-only embedding). In a
folder, files are recognised as images by content, so scanner/PACS exports (``IM000001``, ``*.IMA``) work as they
are; files that are neither an image nor an image's caption are named in the skip report. Every image must
resolve (``..`` and symlinks followed) inside the table's folder or ``image_root``; others are refused."""
from __future__ import annotations

import os
from pathlib import Path

from fuselip_med.errors import InputError
from fuselip_med.vocab import modality_name

from ...option_names import advise_option
from ..schema import Sample
from ..skips import SkipReport
from . import (
    DatasetEmptyError,
    DatasetNotFoundError,
    check_image_path,
    check_index,
    check_pair_mode,
    clean_caption,
    csv_rows,
    encoding_hint,
    encoding_label,
    has_undecodable,
    pair_sample,
    register_adapter,
    require_nonempty,
    skip_or_raise,
    take,
    text_encoding,
    undecodable_reason,
)

__all__ = ["NON_UTF8_NAME", "FolderSource", "check_image_path", "folder", "normalize_modality"]

#: The skip reason of a file whose name is not valid UTF-8 (POSIX names are bytes): ``embed`` and ``index build``
#: store ids and paths as UTF-8 text (JSON, parquet), so such a file is skipped, named with its bytes escaped.
NON_UTF8_NAME = "file name is not valid UTF-8"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom", ".ima")
_SEP_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
_SPLIT_FILE_NAMES = {"valid": ("valid", "validation", "val"), "validation": ("validation", "valid", "val"),
                     "val": ("val", "valid", "validation")}

HOW_TO_USE = ("give a CSV/TSV with columns path,caption (paths relative to the table's folder) or a folder of images "
              "with <image>.txt captions")


def normalize_modality(value: str | None) -> str | None:
    """The short modality name (CT, MRI, X-ray, ultrasound, angiography, PET) for common spellings; other
    non-empty values are kept as written, empty ones give None."""
    if value is None or not value.strip():
        return None
    return modality_name(value) or value.strip()


class FolderSource:
    """A lazy, indexable image-caption source over a user table or sidecar folder."""

    def __init__(self, *, name: str, path: str, split: str, records: list[dict], skipped: SkipReport,
                 pair_mode: str = "image_to_caption", limit: int | None = None):
        self.name = name
        self.path = path
        self.split = split
        self.pair_mode = check_pair_mode(pair_mode, "folder")
        self.skipped = skipped
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
           caption_column: str = "caption", id_column: str = "id", sep: str | None = None,
           encoding: str | None = None, require_caption: bool = True, check_files: bool = True) -> FolderSource:
    """Image-caption pairs from a table or a sidecar folder (see the module doc).

    Options (the ``embed``/``eval`` commands take them as ``--path-column`` etc.): ``path_column``,
    ``caption_column``, ``id_column`` (default: the path as written), ``sep`` (``,``, ``tab``/``\\t`` or any one
    character; default: tab when the header has a tab and no comma or the file is ``.tsv``, semicolon when it has
    a semicolon and neither, else comma),
    ``encoding`` (default UTF-8, a BOM is dropped), ``image_root`` (where relative paths point, tried before the
    table's folder; images may come only from the table's folder and this root). ``require_caption=False`` keeps
    rows without a (decodable) caption, for image-only use and labelled images; their caption is None. In a
    folder, an image in a subfolder gets the subfolder name as its ``label`` (class-per-folder layouts).
    ``check_files=False`` skips the per-row file checks (for text-only use, or huge tables on slow storage;
    decoding still reports them).

    Raises ``DatasetNotFoundError``/``DatasetEmptyError`` naming the path, ``LookupError`` for an unknown encoding,
    ``ValueError`` for a bad ``sep``; bad rows are named in ``source.skipped`` (or raise ``BadRowError`` when strict).
    """
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"image-caption data path {root} does not exist: {HOW_TO_USE}.")
    if root.is_file() and _is_image(str(root), root.name):  # read as a table, its header would be quoted
        raise InputError(f"{root} is an image, not a table of images: give the folder that holds it (or a CSV/TSV "
                         "listing it).")
    roots = _allowed_roots(root if root.is_dir() else root.parent, image_root)
    table = root if root.is_file() else _split_table(root, split)
    skipped = SkipReport()
    if table is not None:
        columns = {"path": path_column, "caption": caption_column, "id": id_column}
        records = _read_table(table, strict, skipped, image_root=image_root, roots=roots, columns=columns,
                              sep=sep, encoding=text_encoding(encoding), require_caption=require_caption,
                              check_files=check_files)
        name = f"csv/{table.stem}"
    else:
        images_dir = root / split if (root / split).is_dir() else root
        records = _read_sidecars(images_dir, strict, skipped, roots=roots, encoding=text_encoding(encoding),
                                 require_caption=require_caption)
        name = f"folder/{images_dir.name}"
    return FolderSource(name=name, path=str(table or root), split=split, records=records, skipped=skipped,
                        pair_mode=pair_mode, limit=limit)


def _split_table(root: Path, split: str) -> Path | None:
    for name in _SPLIT_FILE_NAMES.get(split, (split,)):
        for suffix in TABLE_SUFFIXES:
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    return None


def _record(id: str, path: str, caption: str | None, labels: list[str] | None = None, label: str | None = None,
            modality: str | None = None, group: str | None = None) -> dict:
    return {"id": id, "path": path, "caption": caption, "labels": labels or [], "label": label,
            "modality": modality, "group": group}


def _unique_id(candidate: str, seen: dict[str, int]) -> str:
    """``candidate``, or ``candidate#k`` for its k-th repeat (one image listed with several captions)."""
    count = seen.get(candidate, 0) + 1
    seen[candidate] = count
    return candidate if count == 1 else f"{candidate}#{count}"


# ------------------------------------------------------------------------------------------ path checks


def _allowed_roots(folder: Path, image_root: str | None) -> list[str]:
    """The real folders images may come from: the table's (or sidecar) folder, and ``image_root`` when given."""
    roots = [os.path.realpath(folder)]
    if image_root:
        given = Path(image_root).expanduser()
        if not given.is_dir():
            raise DatasetNotFoundError(f"image_root {given} is not a folder; pass the folder your images are in.")
        roots.append(os.path.realpath(given))
    return roots


# ------------------------------------------------------------------------------------------------ tables


def _separator(sep: str | None, table: Path, encoding: str) -> str:
    if sep is not None:
        value = _SEP_NAMES.get(sep.lower(), sep)
        if len(value) != 1:
            raise InputError(f"sep {sep!r}: use one character, e.g. ',' or 'tab' ({advise_option('sep', 'tab')}).")
        return value
    with open(table, encoding=encoding, errors="replace") as handle:
        first = handle.readline()
    if table.suffix.lower() in (".tsv", ".tab") or ("\t" in first and "," not in first):
        return "\t"
    # spreadsheets in locales whose decimal mark is a comma save "CSV" with semicolons (Excel, LibreOffice)
    return ";" if ";" in first and "," not in first and "\t" not in first else ","


def _column(header: list[str], columns: dict[str, int], table: Path, key: str, wanted: str, default: str,
            needed: bool) -> int | None:
    """The index of column ``wanted``; a missing column is an error when ``needed`` or when the user named it."""
    index = columns.get(wanted.lower())
    if index is None and (needed or wanted != default):
        raise DatasetEmptyError(
            f"{table} has no column {wanted!r} (its columns: {', '.join(header) or 'none'}); rename the column or "
            f"pass {advise_option(f'{key}_column')}.")
    return index


def _read_table(table: Path, strict: bool, skipped: SkipReport, *, image_root: str | None, roots: list[str],
                columns: dict[str, str], sep: str | None, encoding: str, require_caption: bool,
                check_files: bool) -> list[dict]:
    delimiter = _separator(sep, table, encoding)
    rows = csv_rows(table, strict, skipped, delimiter=delimiter, encoding=encoding)
    header = [h.strip().lower() for h in next(rows, (0, []))[1]]
    by_name = {name: i for i, name in reversed(list(enumerate(header)))}
    i_path = _column(header, by_name, table, "path", columns["path"], "path", True)
    i_caption = _column(header, by_name, table, "caption", columns["caption"], "caption", require_caption)
    i_id = _column(header, by_name, table, "id", columns["id"], "id", False)
    at = {key: by_name.get(key) for key in ("label", "labels", "modality", "group")}
    base = Path(image_root).expanduser() if image_root else None
    undecodable = undecodable_reason(encoding)
    records: list[dict] = []
    failed_text: list[str] = []
    seen: dict[str, int] = {}
    for line, fields in rows:
        where = f"{table}, line {line}"
        row_id = fields[i_id].strip() if i_id is not None and i_id < len(fields) else ""
        written = fields[i_path].strip() if i_path < len(fields) else ""
        name = row_id or written or f"line {line}"
        if len(fields) != len(header):
            skip_or_raise(skipped, strict, "bad csv row", where, f"{len(fields)} fields, header has {len(header)}",
                          id=name)
            continue
        caption_cell = fields[i_caption] if i_caption is not None else ""
        others = [f for i, f in enumerate(fields) if i != i_caption]
        if any(has_undecodable(f) for f in others) or (require_caption and has_undecodable(caption_cell)):
            failed_text.append("".join(fields))
            skip_or_raise(skipped, strict, undecodable, where, f"not valid {encoding_label(encoding)}",
                          id=f"line {line}" if has_undecodable(name) else name)
            continue
        caption = None if has_undecodable(caption_cell) else clean_caption(caption_cell) or None
        if require_caption and not caption:
            skip_or_raise(skipped, strict, "empty caption", where, written, id=name)
            continue
        if not written:
            skip_or_raise(skipped, strict, "missing image", where, "empty path", id=name)
            continue
        resolved = _resolve(written, base, table.parent)
        problem = check_image_path(resolved, roots) if check_files else None
        if problem is not None:
            skip_or_raise(skipped, strict, problem[0], where, problem[1], id=name)
            continue
        cell = {key: fields[i].strip() if i is not None else "" for key, i in at.items()}
        labels = [x.strip() for x in cell["labels"].split(";") if x.strip()]
        label = cell["label"] or None
        if label is not None and label not in labels:
            labels.insert(0, label)
        records.append(_record(_unique_id(row_id or written, seen), resolved, caption, labels, label,
                               normalize_modality(cell["modality"]), cell["group"] or None))
    if failed_text:
        skipped.hint(encoding_hint(table, failed_text, encoding))
    return records


def _resolve(written: str, image_root: Path | None, folder: Path) -> str:
    """An absolute path stays; a relative one is looked up under ``image_root`` first, then the table's folder."""
    expanded = os.path.expanduser(written)
    if os.path.isabs(expanded):
        return expanded
    if image_root is not None:
        candidate = image_root / written
        if os.path.lexists(candidate):
            return str(candidate)
    return str(folder / written)


# ----------------------------------------------------------------------------------------- sidecar folders


def _escaped(name: str) -> str:
    """A file name as UTF-8 text with its undecodable bytes written ``\\xe9`` (``os.fsencode`` +
    ``backslashreplace``): how a skip names a file whose name is not valid UTF-8."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _sidecar_names(image: str) -> tuple[str, str]:
    return image + ".txt", os.path.splitext(image)[0] + ".txt"


def _is_image(path: str, name: str) -> bool:
    """Known image names are taken as images (decoding names a corrupt one); any other file is judged by its
    content, so DICOM named ``IM000001`` or ``scan.IMA`` is found."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix in (".txt", *TABLE_SUFFIXES):
        return False
    from ..images import image_kind  # pixels stack (torch, pydicom): only folders with unknown names need it

    return image_kind(path) is not None


def _read_sidecars(root: Path, strict: bool, skipped: SkipReport, *, roots: list[str], encoding: str,
                   require_caption: bool) -> list[dict]:
    records: list[dict] = []
    failed_text: list[str] = []
    undecodable = undecodable_reason(encoding)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for linked in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:  # os.walk skips them
            skipped.add(Path(dirpath, linked).relative_to(root).as_posix(), os.path.join(dirpath, linked),
                        "symlinked folder", "not followed; list its images in a table and pass "
                        f"{advise_option('image_root', 'DIR')} for their folder")
        images, others = [], []
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            rel = Path(path).relative_to(root).as_posix()
            if has_undecodable(rel):  # ids, paths and thumbnails are stored as UTF-8 text (parquet, JSON)
                skip_or_raise(skipped, strict, NON_UTF8_NAME, _escaped(path), "rename it", id=_escaped(rel))
                continue
            problem = check_image_path(path, roots)
            if problem is not None:
                skip_or_raise(skipped, strict, problem[0], path, problem[1], id=rel)
            elif _is_image(path, filename):
                images.append(filename)
            else:
                others.append(filename)
        sidecars = {name for image in images for name in _sidecar_names(image)}
        for filename in others:  # listed even when strict: a README beside the images is not a bad row
            if filename not in sidecars:
                skipped.add(Path(dirpath, filename).relative_to(root).as_posix(), os.path.join(dirpath, filename),
                            "not an image", "neither an image nor the caption of one")
        for filename in images:
            image = Path(dirpath) / filename
            rel = image.relative_to(root).as_posix()
            caption_file = next((Path(dirpath) / n for n in _sidecar_names(filename) if n in others), None)
            caption = None
            if caption_file is not None:
                text = caption_file.read_text(encoding=encoding, errors="surrogateescape")
                if has_undecodable(text):
                    failed_text.append(text)
                    if require_caption:
                        skip_or_raise(skipped, strict, undecodable, str(caption_file),
                                      f"not valid {encoding_label(encoding)}", id=rel)
                        continue
                else:
                    caption = clean_caption(text) or None
            if require_caption and caption_file is None:
                stem = os.path.splitext(filename)[0]
                skip_or_raise(skipped, strict, "missing caption", str(image),
                              f"no {filename}.txt or {stem}.txt beside it", id=rel)
                continue
            if require_caption and not caption:
                skip_or_raise(skipped, strict, "empty caption", str(caption_file), id=rel)
                continue
            label = Path(rel).parts[0] if len(Path(rel).parts) > 1 else None  # class-per-folder layout
            records.append(_record(rel, str(image), caption, [label] if label else None, label))
    if failed_text and require_caption:
        skipped.hint(encoding_hint(root, failed_text, encoding))
    return records
