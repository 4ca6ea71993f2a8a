"""MMEB-train (``TIGER-Lab/MMEB-train``, the data of FuseLIP's MMEB fine-tuning, paper App. B) as a training
source, and the MMEB text rules shared with the ``mmeb`` evaluation task.

Layout under ``path``: one folder per subset with its split file (``<Subset>/original-00000-of-00001.parquet``;
``split`` picks ``original``, ``diverse_instruction`` or ``train``) and the images of its image archive, whose
paths in the rows start with ``images/<Subset>/`` (relative to ``image_root``, default ``path``). Row fields:
``qry`` (instruction + query text), ``qry_image_path``, ``pos_text``, ``pos_image_path`` (``neg_*`` are not
used, as in the reference). An empty image path means "no image".

Sample: query = query image + cleaned query text, target = positive image + cleaned positive text
(:func:`clean_text`; FuseLIP ``src/mmeb/mmeb_dataset.py`` ``MMEBTrainDataset`` with ``TxtModifier(is_train=True,
empty_prompt=True)`` on the left and the classification prefixes on the right, ``src/open_clip_train/data.py``).
Each subset contributes its first ``per_subset`` rows (reference ``num_sample_per_subset`` = 50,000).
"""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path, PurePosixPath

from ..schema import Sample, SampleSide
from . import (
    DatasetNotFoundError,
    check_index,
    check_parquet_files,
    register_adapter,
    require_column_types,
    require_nonempty,
    skip_or_raise,
    take,
)

__all__ = ["TRAIN_SUBSETS", "HATEFUL_PROMPT", "INSTRUCTIONS", "CANDIDATE_PREFIX", "clean_text", "MMEBTrainSource",
           "mmeb"]

TRAIN_SUBSETS: tuple[str, ...] = (
    "ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
    "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
    "NIGHTS", "WebQA", "MSCOCO",
)

HATEFUL_PROMPT = "Is this image hateful?"
CANDIDATE_PREFIX = {"N24News": "a photo from the domain of ", "Country211": "this is in the country of ",
                    **{s: "a photo of a " for s in ("ImageNet-1K", "ImageNet_1K", "VOC2007", "SUN397", "Place365",
                                                    "ImageNet-A", "ImageNet-R", "ObjectNet")}}
# The VLM2Vec instructions written before the query's own text (MMEB's qry/qry_text and tgt_text); FuseLIP's
# training and evaluation replace each with "" (reference ``REPLACEMENTS_TRAIN``/``REPLACEMENTS_EVAL`` with
# ``empty_prompt=True``).
INSTRUCTIONS: tuple[str, ...] = (
    "Represent the given image with the following question:",
    "Represent the given image for classification",
    "Represent the given news image with the following caption for domain classification:",
    "Represent the given image for binary classification to determine whether it constitutes hateful speech or not",
    "Represent the given dialogue about an image, which is used for image retrieval:",
    "Find an image to match the fashion image and style note:",
    "Represent the given image.",
    "Represent the given image",
    "Given an image, find a similar everyday image with the described changes:",
    "Find a day-to-day image that looks similar to the provided image.",
    "Find a Wikipedia image that answers this question:",
    "Represent the given Wikipedia image with related text information:",
    "Select the portion of the image that isolates the object labeled as",
    "Represent the given cropped image of the object",
    "Find an image caption describing the given everyday image.",
    "Find me an everyday image that matches the given caption:",
    "Identify the scene shown in the image",
    "Identify the object shown in the image",
    "Find a caption for the news in the given photo.",
    "Retrieve an image of this news caption.",
    "Identify the country depicted in the image",
    "Find a news image that matches the provided caption:",
    "Crop the image to to isolate the object labeled as",
    "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image:",
    "Select the portion of the image that follows the language expressions.",
    "Select the portion of the image that follows the language expressions:",
    "Select the portion of the image that answers the question",
    "Find the document image that can answer the given query:",
)
#: The MMEB-train columns the adapter reads, all text (TIGER-Lab/MMEB-train parquet schema).
_TEXT_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>\s*")


def clean_text(text: str | None, subset: str, *, candidate: bool, instruction: str | None = None) -> str:
    """A query/candidate text as FuseLIP embeds it (module docstring): image token and instruction removed
    (HatefulMemes queries: "Is this image hateful?"), ImageNet-1K names cut at the first comma, the
    classification prefix added to candidates."""
    text = _IMAGE_TOKEN.sub("", text or "")
    hateful = subset == "HatefulMemes" and not candidate
    for known in INSTRUCTIONS:
        if known in text:
            text = text.replace(known, HATEFUL_PROMPT if hateful else "")
    if instruction and hateful:
        text = f"{HATEFUL_PROMPT} {text}"
    if subset in ("ImageNet-1K", "ImageNet_1K"):
        text = text.split(",")[0]
    text = text.strip()
    if candidate:
        text = f"{CANDIDATE_PREFIX.get(subset, '')}{text}"
    return text.rstrip("\n").strip()


class MMEBTrainSource:
    """The MMEB-train samples of the chosen subsets (module docstring); every sample is its own group."""

    def __init__(self, rows: list[tuple[str, int, dict]], *, path: str, split: str, image_root: Path,
                 skipped: collections.Counter):
        self.name = f"mmeb/{split}"
        self.path = path
        self.split = split
        self.skipped: collections.Counter[str] = skipped
        self._rows = rows
        self._images = image_root
        require_nonempty(len(rows), path, f"MMEB-train split {split!r}", skipped)

    def __len__(self) -> int:
        return len(self._rows)

    def _image(self, value) -> str | None:
        return str(self._images / value) if value else None

    def __getitem__(self, index: int) -> Sample:
        subset, number, row = self._rows[check_index(index, len(self))]
        query = SampleSide(image=self._image(row.get("qry_image_path")),
                           text=clean_text(row.get("qry"), subset, candidate=False))
        target = SampleSide(image=self._image(row.get("pos_image_path")),
                            text=clean_text(row.get("pos_text"), subset, candidate=True))
        return Sample(id=f"{subset}/{number}", source="mmeb", query=query, target=target, meta={"subset": subset})

    def groups(self) -> list[list[int]]:
        return [[i] for i in range(len(self))]

    def __repr__(self) -> str:
        return f"MMEBTrainSource(path={self.path!r}, split={self.split!r}, n={len(self)})"


def _escapes(path: str) -> bool:
    """Whether an image path written in the parquet would leave the image root (absolute, ``~`` or ``..``): the
    published paths are relative (``images/ImageNet_1K/Train/x.jpg``), so such a row is refused, not read.
    A lexical check: stat-ing a million images at load would be slow; the decoder reads only what passes."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return path.startswith(("/", "~", "\\")) or os.path.isabs(path) or ".." in parts or (
        bool(parts) and ":" in parts[0])


@register_adapter("mmeb")
def mmeb(path: str | os.PathLike, split: str = "original", limit: int | None = None, strict: bool = False, *,
         subsets: list[str] | tuple[str, ...] = TRAIN_SUBSETS, per_subset: int = 50_000,
         image_root: str | None = None) -> MMEBTrainSource:
    """MMEB-train rows of ``subsets`` (``split`` "train" reads the ``original`` files when there is no train
    file); rows without query or positive content are skipped ("empty sample"), rows whose image path is
    absolute or climbs out with ``..`` too ("outside image root"). Raises
    ``DatasetNotFoundError`` naming the subsets whose files are missing."""
    import pyarrow.parquet as pq

    root = Path(os.fspath(path)).expanduser()
    skipped: collections.Counter[str] = collections.Counter()
    files, missing = {}, []
    for subset in subsets:
        found = sorted((root / subset).glob(f"{split}-*.parquet"))
        if not found and split == "train":
            found = sorted((root / subset).glob("original-*.parquet"))
        if found:
            files[subset] = found
        else:
            missing.append(subset)
    if missing:
        raise DatasetNotFoundError(f"MMEB-train at {root} has no {split!r} parquet file for {', '.join(missing)}: "
                                   f"download TIGER-Lab/MMEB-train there (one folder per subset) or pass subsets=.")
    check_parquet_files((shard for shards in files.values() for shard in shards), "TIGER-Lab/MMEB-train")
    rows: list[tuple[str, int, dict]] = []
    for subset, shards in files.items():
        taken = 0
        for shard in shards:
            table = pq.read_table(shard)
            require_column_types(table.schema, dict.fromkeys(_TEXT_COLUMNS, "text"), str(shard))
            for row in table.slice(0, per_subset - taken).to_pylist():
                escaping = next((p for p in (row.get("qry_image_path"), row.get("pos_image_path"))
                                 if p and _escapes(p)), None)
                if not (row.get("qry") or row.get("qry_image_path")) or not (row.get("pos_text")
                                                                              or row.get("pos_image_path")):
                    skip_or_raise(skipped, strict, "empty sample", f"{shard}, row {taken}")
                elif escaping is not None:
                    skip_or_raise(skipped, strict, "outside image root", f"{shard}, row {taken}",
                                  f"{escaping}: image paths are relative to the image root, without '..'")
                else:
                    rows.append((subset, taken, row))
                taken += 1
            if taken >= per_subset:
                break
    return MMEBTrainSource(list(take(rows, limit)), path=str(root), split=split,
                           image_root=Path(image_root).expanduser() if image_root else root, skipped=skipped)
