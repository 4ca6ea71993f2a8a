"""Embed a user's images, texts or image+text pairs (from a CSV/TSV or a folder) into a .npy or parquet file.

Every row not embedded is named: the adapter's skips (missing file, undecodable text, a path outside the
table's folder, ...), rows without what ``kind`` needs, and images that fail to decode all go into one
:class:`~fuselip_med.data.skips.SkipReport`, written as ``<out stem>.skipped.csv`` beside the output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fuselip_med.data.adapters import SampleSource, get_adapter
from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import UsageError
from fuselip_med.eval.embedding import EmbedItem, embed_items
from fuselip_med.io import atomic_write, atomic_write_bytes, atomic_write_json

Kind = Literal["image", "text", "pair"]
KINDS = ("image", "text", "pair")


@dataclass
class EmbedRow:
    """One input row: its id, the image reference and/or the text."""

    id: str
    image: Any
    text: str | None


def open_input(path: str | os.PathLike, kind: Kind, **options: Any) -> SampleSource:
    """The csv/folder source of ``path`` read for ``kind``: captions are required only for ``text``/``pair``,
    image files are checked only for ``image``/``pair``. ``options`` are the adapter's (``path_column``,
    ``caption_column``, ``id_column``, ``sep``, ``image_root``, ``encoding``). Raises the adapter's errors
    (``DatasetNotFoundError``, ``DatasetEmptyError``, ``LookupError``, ``ValueError``) before any work starts."""
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose image, text or pair.")
    return get_adapter("folder")(os.fspath(path), split="train", require_caption=kind != "image",
                                 check_files=kind != "text", **options)


def rows_from_source(source: SampleSource, kind: Kind, skips: SkipReport | None = None) -> list[EmbedRow]:
    """Image sides and/or caption texts of a folder/CSV source, per ``kind``; rows lacking what ``kind`` needs
    are named in ``skips`` (``missing image`` / ``missing caption``)."""
    rows = []
    for index in range(len(source)):
        sample = source[index]
        image = sample.query_image if sample.query_image is not None else sample.target_image
        text = sample.target_text if sample.target_text is not None else sample.query_text
        lacking = ("missing image" if kind != "text" and image is None else
                   "missing caption" if kind != "image" and not text else None)
        if lacking is not None:
            if skips is not None:
                skips.add(sample.id, sample.meta.get("path", source.name), lacking)
            continue
        rows.append(EmbedRow(str(sample.id), image if kind != "text" else None, text if kind != "image" else None))
    return rows


def embed_rows(model, rows: list[EmbedRow], *, batch_size: int = 64, num_workers: int = 0, device=None,
               progress: bool = True, skips: SkipReport | None = None) -> tuple[np.ndarray, list[EmbedRow], dict]:
    """(embeddings [N, D] float32 (L2-normalised) of the rows that worked, those rows, {id: reason} of the rows
    whose image failed to decode); failures are also named in ``skips`` (source: the image)."""
    items = [EmbedItem(image=r.image, text=r.text) for r in rows]
    table = embed_items(model, items, batch_size=batch_size, num_workers=num_workers, device=device,
                        progress=progress)
    kept, vectors, failed = [], [], {}
    for row, item in zip(rows, items):
        if item.key in table:
            kept.append(row)
            vectors.append(int(table.index_of([item.key])[0]))
        else:
            failed[row.id] = table.failed.get(item.key, "not embedded")
            if skips is not None:
                source = row.image if isinstance(row.image, (str, os.PathLike)) else "input"
                skips.add(row.id, source, failed[row.id])
    matrix = table.embeddings[vectors].numpy() if vectors else np.zeros((0, table.dim), dtype=np.float32)
    return matrix.astype(np.float32), kept, failed


def skipped_csv_path(out: str | os.PathLike) -> Path:
    """Where ``embed`` writes its skip list: ``<out stem>.skipped.csv`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped.csv")


def write_embeddings(path: str | os.PathLike, embeddings: np.ndarray, rows: list[EmbedRow],
                     model_id: str) -> list[Path]:
    """``.npy`` (+ ``.ids.json`` beside it) or ``.parquet`` (id, image, text, embedding), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, embeddings)
        atomic_write_bytes(path, buffer.getvalue())
        ids = path.with_suffix(".ids.json")
        atomic_write_json(ids, {"model": model_id, "ids": [r.id for r in rows]}, indent=1)
        return [path, ids]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "id": [r.id for r in rows],
            "image": [str(r.image) if r.image is not None else None for r in rows],
            "text": [r.text for r in rows],
            "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32())),
        })
        atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata({"model": model_id}), tmp))
        return [path]
    raise UsageError(f"--out {path}: use a .npy or .parquet file name.")
