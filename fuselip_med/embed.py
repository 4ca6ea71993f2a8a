"""Embed a user's images, texts or image+text pairs (from a CSV or a folder) into a .npy or parquet file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fuselip_med.data.adapters import SampleSource
from fuselip_med.eval.embedding import EmbedItem, embed_items
from fuselip_med.io import atomic_write, atomic_write_bytes, atomic_write_json

Kind = Literal["image", "text", "pair"]


@dataclass
class EmbedRow:
    """One input row: its id, the image reference and/or the text."""

    id: str
    image: Any
    text: str | None


def rows_from_source(source: SampleSource, kind: Kind) -> list[EmbedRow]:
    """Image sides and/or caption texts of a folder/CSV source, per ``kind``."""
    rows = []
    for index in range(len(source)):
        sample = source[index]
        image = sample.query_image if sample.query_image is not None else sample.target_image
        text = sample.target_text if sample.target_text is not None else sample.query_text
        if (kind == "image" and image is None or kind == "text" and not text
                or kind == "pair" and (image is None or text is None)):
            continue
        rows.append(EmbedRow(str(sample.id), image if kind != "text" else None, text if kind != "image" else None))
    return rows


def embed_rows(model, rows: list[EmbedRow], *, batch_size: int = 64, num_workers: int = 0, device=None,
               progress: bool = True) -> tuple[np.ndarray, list[EmbedRow], dict[str, str]]:
    """(embeddings (N, D) float32 for the rows that worked, those rows, {id: reason} for rows that failed)."""
    items = [EmbedItem(image=r.image, text=r.text) for r in rows]
    table = embed_items(model, items, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    kept, vectors, failed = [], [], {}
    for row, item in zip(rows, items):
        if item.key in table:
            kept.append(row)
            vectors.append(int(table.index_of([item.key])[0]))
        else:
            failed[row.id] = table.failed.get(item.key, "not embedded")
    matrix = table.embeddings[vectors].numpy() if vectors else np.zeros((0, table.dim), dtype=np.float32)
    return matrix.astype(np.float32), kept, failed


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
    raise ValueError(f"--out {path}: use a .npy or .parquet file name.")
