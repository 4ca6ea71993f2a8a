"""Visual Genome as two hard-negative sources: ``vg_crop`` (region phrase + image -> crop of that region) and
``vg_vqa`` (question + image -> answer), each in groups of 4 consecutive items of the flattened list.

Files under ``path``: ``region_descriptions.json`` / ``question_answers.json`` (or the reference's split files
``region_descriptions_{train,test}.json``) and images ``images/<id>.jpg`` or ``VG_100K{,_2}/<id>.jpg``. Without
split files, the train/test split is a fixed hash of the image id (``test_fraction`` of the images are test).
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..images import ImageDecodeError, load_image
from ..schema import Sample, SampleSide
from ..skips import SkipReport
from . import (
    DatasetNotFoundError,
    check_index,
    clean_caption,
    image_files,
    register_adapter,
    require_nonempty,
    skip_or_raise,
)
from .cc import check_limit

__all__ = ["VGCropSource", "VGVQASource", "region_filters", "suppress_overlaps", "vg_crop", "vg_vqa"]

SPLITS = ("train", "test", "all")
IMAGE_FOLDERS = ("images", "VG_100K", "VG_100K_2", "images/VG_100K", "images/VG_100K_2")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GROUP_SIZE = 4
# (min_size, max_iou) per split: the reference trains on every region and evaluates VG-Crop on regions with
# w, h > 32 px after greedy suppression of IoU > 0.3 overlaps (a max_iou of 1 suppresses nothing)
FILTER_DEFAULTS = {"train": (0.0, 1.0), "all": (0.0, 1.0), "test": (32.0, 0.3)}
HOW_TO_GET = ("download Visual Genome (v1.2: image_data.json, region_descriptions.json, question_answers.json and "
              "the VG_100K/VG_100K_2 image folders) and pass the folder holding them")


def check_split(split: str) -> str:
    """``split`` when it is one of ``SPLITS``; raises ``ValueError`` otherwise."""
    if split not in SPLITS:
        raise ValueError(f"unknown Visual Genome split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def split_of_image(image_id: int, test_fraction: float) -> str:
    """"test" for a fixed hash-chosen ``test_fraction`` of image ids, else "train"."""
    digest = hashlib.blake2b(str(image_id).encode("ascii"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") < test_fraction * 2.0**64 else "train"


def region_filters(split: str, min_size: float | None = None, max_iou: float | None = None) -> tuple[float, float]:
    """(min_size, max_iou) with the split's reference defaults filled in for the options left None."""
    default_size, default_iou = FILTER_DEFAULTS[check_split(split)]
    return (default_size if min_size is None else float(min_size)), (default_iou if max_iou is None else float(max_iou))


def suppress_overlaps(boxes: np.ndarray, max_iou: float) -> list[int]:
    """Indices of the (x, y, w, h) boxes kept by greedy suppression: a box goes when its IoU with an earlier kept
    box exceeds ``max_iou``."""
    kept: list[int] = []
    for i, (x, y, w, h) in enumerate(boxes):
        if kept:
            other = boxes[kept]
            inter_w = np.clip(np.minimum(x + w, other[:, 0] + other[:, 2]) - np.maximum(x, other[:, 0]), 0, None)
            inter_h = np.clip(np.minimum(y + h, other[:, 1] + other[:, 3]) - np.maximum(y, other[:, 1]), 0, None)
            inter = inter_w * inter_h
            iou = inter / (w * h + other[:, 2] * other[:, 3] - inter)
            if (iou > max_iou).any():
                continue
        kept.append(i)
    return kept


def _image_index(root: Path) -> dict[int, str]:
    """image id -> file over the known image folders (one listing each)."""
    files = image_files((root / name for name in IMAGE_FOLDERS), IMAGE_SUFFIXES)
    if files is None:
        raise DatasetNotFoundError(f"{root} has no image folder ({', '.join(IMAGE_FOLDERS)}): {HOW_TO_GET}.")
    found: dict[int, str] = {}
    for stem, _, path in files:
        if stem.isdigit():
            found.setdefault(int(stem), path)
    return found


def _load_json(file: Path) -> list[Any]:
    if not file.is_file():
        raise DatasetNotFoundError(f"{file} does not exist: {HOW_TO_GET}.")
    with open(file, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list):
        raise DatasetNotFoundError(f"{file} is not a Visual Genome list of per-image entries: {HOW_TO_GET}.")
    return data


def _entry_id(entry: Any) -> Any:
    return entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None


def _group_members(n: int, group_size: int, fraction: float, limit: int | None) -> np.ndarray:
    """Flattened indices kept: whole groups of ``group_size`` consecutive items (the incomplete tail dropped),
    downsampled to ``int(fraction * groups)`` groups drawn by ``default_rng(0)`` as the reference does, then the
    first groups up to ``limit`` items."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    groups = np.arange(n // group_size, dtype=np.int64)
    if fraction < 1.0:
        chosen = np.random.default_rng(0).choice(groups.size, int(fraction * groups.size), replace=False)
        groups = np.sort(chosen).astype(np.int64)
    if limit is not None:
        groups = groups[: limit // group_size]
    return (groups[:, None] * group_size + np.arange(group_size)).ravel()


class _GroupedSource:
    """Shared by both VG sources: parallel per-item columns, consecutive groups of ``group_size``."""

    kind = ""

    def __init__(self, *, path: str, split: str, columns: dict[str, list], images: dict[int, str],
                 skipped: collections.Counter, filtered: collections.Counter, group_size: int, fraction: float,
                 limit: int | None):
        n = len(columns["image_id"])
        keep = _group_members(n, group_size, fraction, limit)
        filtered["incomplete group"] += n % group_size
        self.name = f"{self.kind}/{split}"
        self.path = path
        self.split = split
        self.group_size = group_size
        self.skipped: collections.Counter[str] = skipped
        self.filtered: collections.Counter[str] = +filtered  # intentional filtering, not bad data
        self._images = images
        self._columns = {key: [values[i] for i in keep.tolist()] for key, values in columns.items()}
        require_nonempty(len(keep), path, f"Visual Genome {self.kind} split {split!r}", self.skipped)

    def __len__(self) -> int:
        return len(self._columns["image_id"])

    def groups(self) -> list[list[int]]:
        g = self.group_size
        return [list(range(start, start + g)) for start in range(0, len(self), g)]

    def _common(self, index: int) -> tuple[int, str, str, dict[str, Any]]:
        """(image id, image path, group key, meta) of item ``index``."""
        image_id = self._columns["image_id"][index]
        group = f"{self.name}/{index // self.group_size}"
        return image_id, self._images[image_id], group, {"split": self.split, "image_id": image_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, split={self.split!r}, n={len(self)})"


class VGCropSource(_GroupedSource):
    """VG-Crop items: query = region phrase + full image (a path), target = the crop (x, y, x+w, y+h) as a PIL
    image, cut in ``__getitem__`` (it decodes the image, so call it in DataLoader workers). The box is clipped to
    the image; one wholly outside raises ``ImageDecodeError`` ("region outside image", a named skip)."""

    kind = "vg_crop"

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        image_id, path, group, meta = self._common(index)
        x, y, w, h = self._columns["box"][index]
        region_id = self._columns["item_id"][index]
        image = load_image(path)
        # the box clipped to the image: a region declared beyond it (width 1e9) would make PIL allocate the whole
        # black canvas (GBs, or DecompressionBombError); one wholly outside it is a named skip
        box = (max(x, 0), max(y, 0), min(x + w, image.width), min(y + h, image.height))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise ImageDecodeError("region outside image", path, f"box {(x, y, w, h)} on a {image.width}x"
                                   f"{image.height} image")
        crop = image.crop(box)
        meta.update(region_id=region_id, box=(x, y, w, h))
        return Sample(id=f"{image_id}/{region_id}", source=self.kind,
                      query=SampleSide(image=path, text=self._columns["text"][index]), target=SampleSide(image=crop),
                      group=group, meta=meta)


class VGVQASource(_GroupedSource):
    """VG-VQA items: query = question + image (a path), target = the answer without its trailing period."""

    kind = "vg_vqa"

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        image_id, path, group, meta = self._common(index)
        qa_id = self._columns["item_id"][index]
        meta["qa_id"] = qa_id
        return Sample(id=f"{image_id}/{qa_id}", source=self.kind,
                      query=SampleSide(image=path, text=self._columns["text"][index]),
                      target=SampleSide(text=self._columns["answer"][index]), group=group, meta=meta)


def _number(value: Any) -> float | None:
    """A finite JSON number as float, else None (Python's json reads ``NaN``/``Infinity``: such a box is bad)."""
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return number if number is not None and math.isfinite(number) else None


@register_adapter("vg_crop")
def vg_crop(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
            min_size: float | None = None, max_iou: float | None = None, group_size: int = GROUP_SIZE,
            fraction: float = 1.0, test_fraction: float = 0.01) -> VGCropSource:
    """VG-Crop regions of ``split`` ("train", "test" or "all"); keeps regions with w, h > ``min_size`` and drops
    those overlapping an earlier kept region of the image by IoU > ``max_iou`` (None: the split's reference
    defaults, train/all none, test 32 px and 0.3)."""
    root = Path(os.fspath(path)).expanduser()
    split = check_split(split)
    check_limit(limit)
    min_size, max_iou = region_filters(split, min_size, max_iou)
    split_file = root / f"region_descriptions_{split}.json"
    hashed = not split_file.is_file()
    entries = _load_json(root / "region_descriptions.json" if hashed else split_file)
    images = _image_index(root)
    skipped = SkipReport()
    filtered: collections.Counter[str] = collections.Counter()
    columns: dict[str, list] = {"image_id": [], "item_id": [], "box": [], "text": []}
    for number, entry in enumerate(entries):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            skip_or_raise(skipped, strict, "bad entry", f"{root}, entry {number}", "no 'regions' list")
            continue
        kept: list[tuple[int, Any, tuple[float, ...], str]] = []
        for position, region in enumerate(regions):
            where = f"{root}, entry {number}, region {position}"
            fields = region if isinstance(region, dict) else {}
            image_id = fields.get("image_id", _entry_id(entry))
            box = tuple(_number(fields.get(key)) for key in ("x", "y", "width", "height"))
            if not isinstance(image_id, int) or None in box or box[2] <= 0 or box[3] <= 0:
                skip_or_raise(skipped, strict, "bad region", where, f"{region!r:.120}")
                continue
            if hashed and split != "all" and split_of_image(image_id, test_fraction) != split:
                continue
            phrase = clean_caption(fields.get("phrase") if isinstance(fields.get("phrase"), str) else "")
            if not phrase:
                skip_or_raise(skipped, strict, "empty phrase", where)
            elif image_id not in images:
                skip_or_raise(skipped, strict, "missing image", where, f"no {image_id}.jpg")
            elif box[2] <= min_size or box[3] <= min_size:
                filtered["small region"] += 1
            else:
                kept.append((image_id, fields.get("region_id", position), box, phrase))
        by_image: dict[int, list[int]] = {}
        for i, item in enumerate(kept):
            by_image.setdefault(item[0], []).append(i)
        survivors = set()
        for members in by_image.values():
            boxes = np.asarray([kept[i][2] for i in members], dtype=np.float64)
            survivors.update(members[j] for j in suppress_overlaps(boxes, max_iou))
        filtered["overlapping region"] += len(kept) - len(survivors)
        for i in sorted(survivors):
            image_id, region_id, box, phrase = kept[i]
            columns["image_id"].append(image_id)
            columns["item_id"].append(region_id)
            columns["box"].append(tuple(int(v) if float(v).is_integer() else v for v in box))
            columns["text"].append(phrase)
    return VGCropSource(path=str(root), split=split, columns=columns, images=images, skipped=skipped,
                        filtered=filtered, group_size=group_size, fraction=fraction, limit=limit)


@register_adapter("vg_vqa")
def vg_vqa(path: str | os.PathLike, split: str = "train", limit: int | None = None, strict: bool = False, *,
           group_size: int = GROUP_SIZE, fraction: float = 1.0, test_fraction: float = 0.01) -> VGVQASource:
    """VG-VQA question-answer pairs of ``split`` ("train", "test" or "all", the reference trains on all) from
    ``question_answers.json``; answers lose their trailing period."""
    root = Path(os.fspath(path)).expanduser()
    split = check_split(split)
    check_limit(limit)
    entries = _load_json(root / "question_answers.json")
    images = _image_index(root)
    skipped = SkipReport()
    columns: dict[str, list] = {"image_id": [], "item_id": [], "text": [], "answer": []}
    for number, entry in enumerate(entries):
        qas = entry.get("qas") if isinstance(entry, dict) else None
        if not isinstance(qas, list):
            skip_or_raise(skipped, strict, "bad entry", f"{root}, entry {number}", "no 'qas' list")
            continue
        for position, qa in enumerate(qas):
            where = f"{root}, entry {number}, qa {position}"
            fields = qa if isinstance(qa, dict) else {}
            image_id = fields.get("image_id", _entry_id(entry))
            question, answer = fields.get("question"), fields.get("answer")
            if not isinstance(image_id, int) or not isinstance(question, str) or not isinstance(answer, str):
                skip_or_raise(skipped, strict, "bad qa", where, f"{qa!r:.120}")
                continue
            if split != "all" and split_of_image(image_id, test_fraction) != split:
                continue
            question, answer = clean_caption(question), clean_caption(answer).rstrip(".").strip()
            if not question:
                skip_or_raise(skipped, strict, "empty question", where)
            elif not answer:
                skip_or_raise(skipped, strict, "empty answer", where)
            elif image_id not in images:
                skip_or_raise(skipped, strict, "missing image", where, f"no {image_id}.jpg")
            else:
                columns["image_id"].append(image_id)
                columns["item_id"].append(fields.get("qa_id", position))
                columns["text"].append(question)
                columns["answer"].append(answer)
    return VGVQASource(path=str(root), split=split, columns=columns, images=images, skipped=skipped,
                       filtered=collections.Counter(), group_size=group_size, fraction=fraction, limit=limit)
