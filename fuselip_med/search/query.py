"""Queries against a search index: text, image (PNG/JPEG/DICOM) or image + instruction fused into one
sequence as FuseLIP does (paper Sec. 3: one transformer over text ids and TiTok image ids), and "more like
this" from a stored vector."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fuselip_med.search.index import ModelId, SearchIndex, SearchIndexError

__all__ = ["Hit", "check_model", "encode_query", "hits", "load_index_model", "more_like_this", "search"]


@dataclass(frozen=True)
class Hit:
    """One result: rank (1 = best), cosine score, metadata row and the item's id, path, caption, source.

    In a series or study index (``unit``) the hit also names its ``study`` and ``series`` keys and the
    ``best_slice`` (the slice key closest to the query, ``slice_score`` its cosine score, ``slice_row`` its row
    in the slice table, whose stored thumbnail the page shows). Keys are salted hashes; no UID, no path
    unless the index was built with --keep-paths."""

    rank: int
    score: float
    row: int
    id: str
    path: str | None
    caption: str | None
    source: str
    unit: str = "image"
    study: str | None = None
    series: str | None = None
    best_slice: str | None = None
    slice_score: float | None = None
    slice_row: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model(index: SearchIndex, model_id: ModelId) -> None:
    """Raise ``SearchIndexError`` unless ``model_id`` has the weights and the runtime the index was built with."""
    if not model_id.same_model(index.model):
        runtime = f" --runtime {index.model.runtime}" if index.model.runtime != "pytorch" else ""
        rebuild = (f"`fuselip-med index build --model {model_id.name} --input <the images> --out {index.directory} "
                   "--rebuild`")
        if (model_id.name, model_id.runtime) == (index.model.name, index.model.runtime):
            # the weights under that name changed: no --model choice helps
            raise SearchIndexError(
                f"the weights of {model_id.name} changed since the index {index.directory} was built "
                f"({index.model} then, {model_id} now); rebuild the index with {rebuild}.")
        raise SearchIndexError(
            f"the index {index.directory} was built with model {index.model}, but the query model is {model_id}; "
            f"search with --model {index.model.name}{runtime} (or leave --model and --runtime out), or rebuild the "
            f"index with {rebuild}.")


def load_index_model(index: SearchIndex, model: str | os.PathLike | None = None, device: str = "cpu",
                     runtime: str | None = None):
    """(model, ModelId) for querying ``index``: ``model`` run by ``runtime`` when given (checked against the
    index), else the model and runtime recorded in the index. Raises ``SearchIndexError`` on a mismatch and
    ``CheckpointError`` / ``ExportNotFoundError`` (from ``export.runtime.load_for_runtime``) when the model cannot
    be read."""
    from fuselip_med.export.runtime import load_for_runtime

    name = str(model) if model is not None else index.model.name
    loaded, model_id = load_for_runtime(name, runtime or index.model.runtime, device)
    check_model(index, model_id)
    return loaded, model_id


def encode_query(model, *, text: str | None = None, image: Any = None, decode_options=None) -> np.ndarray:
    """[D] float32 unit query vector: ``text`` alone, ``image`` alone (path, bytes, PIL image; DICOM is
    decoded with its window) or both fused into one sequence. Raises ``ValueError`` when both are empty and
    ``ImageDecodeError`` naming the image when it cannot be decoded."""
    from fuselip_med.inference.engine import embed_items
    from fuselip_med.inference.items import EmbedItem

    text = text if text and text.strip() else None
    if text is None and image is None:
        raise ValueError("give a query text, a query image, or both")
    item = EmbedItem(image=image, text=text)
    table = embed_items(model, [item], batch_size=1, decode_options=decode_options, on_error="raise",
                        progress=False)
    return table.lookup([item.key])[0].numpy().astype(np.float32)


def hits(index: SearchIndex, scores: np.ndarray, rows: np.ndarray, query: np.ndarray | None = None) -> list[Hit]:
    """Hits for one query's ``scores`` [k] and ``rows`` [k] (rows < 0, i.e. missing, are dropped); with the
    ``query`` vector [D], hits of a series/study index name their best-matching slice."""
    meta = index.meta
    out = []
    for score, row in zip(scores, rows):
        if row < 0:
            continue
        record = meta.iloc[int(row)]
        best = index.best_slice(int(row), query) if query is not None else None
        detail = {}
        if best is not None:
            slice_record = index.slices.iloc[best[0]]
            detail = {"study": str(slice_record["study"]), "series": str(slice_record["series"]),
                      "best_slice": str(slice_record["slice"]), "slice_score": best[1], "slice_row": best[0]}
        out.append(Hit(len(out) + 1, float(score), int(row), str(record["id"]), record["path"],
                       record["caption"], str(record["source"]), index.unit, **detail))
    return out


def search(index: SearchIndex, model, *, text: str | None = None, image: Any = None, k: int = 10,
           target: str = "image", decode_options=None) -> list[Hit]:
    """Top-``k`` hits for a text, image or image+instruction query over the ``image`` (default) or
    ``caption`` vectors of ``index``. ``k`` must be >= 1 (``ValueError``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query = encode_query(model, text=text, image=image, decode_options=decode_options)
    scores, rows = index.search(query[None], k, target=target)
    return hits(index, scores[0], rows[0], query)


def more_like_this(index: SearchIndex, id: str, k: int = 10) -> list[Hit]:
    """Top-``k`` images like the indexed item ``id`` (its stored image vector as the query; the item itself
    is left out). No model is needed. ``KeyError`` when ``id`` is not in the index."""
    row = index.row_of(id)
    query = np.asarray(index.image_vectors[row], dtype=np.float32)
    scores, rows = index.search(query[None], k + 1)
    keep = rows[0] != row
    return hits(index, scores[0][keep][:k], rows[0][keep][:k], query)
