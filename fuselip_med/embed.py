"""Embed a user's images, texts or image+text pairs (from a CSV/TSV or a folder) into a .npy or parquet file.

Every row not embedded is named: the adapter's skips (missing file, undecodable text, a path outside the
table's folder, ...), rows without what ``kind`` needs, and images that fail to decode all go into one
:class:`~fuselip_med.data.skips.SkipReport`, written as ``<out stem>.skipped.csv`` beside the output.

DICOM rows are named by salted instance keys, never by their paths (``pseudonymize_rows``, rules in
``data/phi.py``); PNG/JPEG rows keep their relative paths as ids.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fuselip_med.data.adapters import SampleSource, get_adapter
from fuselip_med.data.phi import PrivacyOptions, Pseudonyms, instance_key
from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import UsageError
from fuselip_med.inference.engine import embed_items
from fuselip_med.inference.items import EmbedItem
from fuselip_med.io import atomic_write, atomic_write_bytes, atomic_write_json

Kind = Literal["image", "text", "pair"]
KINDS = ("image", "text", "pair")


@dataclass
class EmbedRow:
    """One input row: its id, the image reference and/or the text; ``dicom``: the image is a DICOM file and
    ``id`` its salted instance key (set by ``pseudonymize_rows``)."""

    id: str
    image: Any
    text: str | None
    dicom: bool = False


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
        image = sample.query.image if sample.query.image is not None else sample.target.image
        text = sample.target.text if sample.target.text is not None else sample.query.text
        lacking = ("missing image" if kind != "text" and image is None else
                   "missing caption" if kind != "image" and not text else None)
        if lacking is not None:
            if skips is not None:
                skips.add(sample.id, sample.meta.get("path", source.name), lacking)
            continue
        rows.append(EmbedRow(str(sample.id), image if kind != "text" else None, text if kind != "image" else None))
    return rows


def pseudonymize_rows(rows: list[EmbedRow], pseudonyms: Pseudonyms, privacy: PrivacyOptions = PrivacyOptions(),
                      skips: SkipReport | None = None, rename: bool = True) -> list[EmbedRow]:
    """The rows with every DICOM file's id replaced by its salted instance key (``phi.instance_key``; PS3.15
    Annex E: PACS exports name folders after patients). A second file of the same SOP Instance is named in
    ``skips`` (``duplicate instance``). When DICOM is found and paths are not kept, the entries ``skips``
    already holds (the adapter's, named by path) are renamed to salted ``file-`` keys, source ``input``.
    ``rename=False`` (a dataset adapter whose ids are its own, not paths: ``rocov2``, ...) keeps the ids and
    only marks DICOM rows (``dicom``: no path written)."""
    out: list[EmbedRow] = []
    seen: set[str] = set()
    for row in rows:
        key = instance_key(pseudonyms, row.image) if isinstance(row.image, (str, os.PathLike)) else None
        if key is None:
            out.append(row)
        elif not rename:
            out.append(EmbedRow(row.id, row.image, row.text, dicom=True))
        elif key in seen:
            if skips is not None:
                skips.add(key, "input", "duplicate instance", "a second file of the same SOP Instance")
        else:
            seen.add(key)
            out.append(EmbedRow(key, row.image, row.text, dicom=True))
    if seen and skips is not None and not privacy.keep_paths:
        skips.entries = [entry if entry.id in seen or entry.source == "input" else
                         type(entry)(pseudonyms.key(entry.source, "file-"), "input", entry.reason)
                         for entry in skips.entries]
    return out


def embed_rows(model, rows: list[EmbedRow], *, batch_size: int = 64, num_workers: int = 0, device=None,
               progress: bool = True, skips: SkipReport | None = None) -> tuple[np.ndarray, list[EmbedRow], dict]:
    """(embeddings [N, D] float32 (L2-normalised) of the rows that worked, those rows, {id: reason} of the rows
    whose image failed to decode); failures are also named in ``skips`` (source: the image; ``input`` for
    DICOM), with the inference engine's reason (``EmbeddingTable.name_skip``)."""
    items = [EmbedItem(image=r.image, text=r.text) for r in rows]
    table = embed_items(model, items, batch_size=batch_size, num_workers=num_workers, device=device,
                        progress=progress, warn_skips=False)  # named in skips, by row id
    skips = skips if skips is not None else SkipReport()
    kept, vectors, failed = [], [], {}
    for row, item in zip(rows, items):
        source = row.image if isinstance(row.image, (str, os.PathLike)) and not row.dicom else "input"
        if table.name_skip(skips, item.key, row.id, source):
            failed[row.id] = skips.entries[-1].reason
        else:
            kept.append(row)
            vectors.append(int(table.index_of([item.key])[0]))
    matrix = table.embeddings[vectors].numpy() if vectors else np.zeros((0, table.dim), dtype=np.float32)
    return matrix.astype(np.float32), kept, failed


def skipped_csv_path(out: str | os.PathLike) -> Path:
    """Where ``embed`` writes its skip list: ``<out stem>.skipped.csv`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped.csv")


def write_embeddings(path: str | os.PathLike, embeddings: np.ndarray, rows: list[EmbedRow], model_id: str,
                     salt: str | None = None, privacy: PrivacyOptions = PrivacyOptions()) -> list[Path]:
    """``.npy`` (+ ``.ids.json`` beside it) or ``.parquet`` (id, image, text, embedding), written atomically.

    ``salt``: the pseudonym salt of the rows' instance keys, kept in the output (``.ids.json`` / parquet
    metadata) so a re-run gives the same keys; the ``image`` column holds no DICOM path unless
    ``privacy.keep_paths``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, embeddings)
        atomic_write_bytes(path, buffer.getvalue())
        ids = path.with_suffix(".ids.json")
        atomic_write_json(ids, {"model": model_id, "ids": [r.id for r in rows],
                                **({"salt": salt} if salt else {})}, indent=1)
        return [path, ids]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "id": [r.id for r in rows],
            "image": [privacy.written_path(str(r.image), r.dicom) if r.image is not None else None for r in rows],
            "text": [r.text for r in rows],
            "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32())),
        })
        metadata = {"model": model_id, **({"salt": salt} if salt else {})}
        atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata(metadata), tmp))
        return [path]
    raise UsageError(f"--out {path}: use a .npy or .parquet file name.")


def stored_salt(path: str | os.PathLike) -> str | None:
    """The pseudonym salt an earlier output at ``path`` keeps (so a re-run gives the same keys), or None."""
    path = Path(path)
    if path.suffix == ".npy":
        ids = path.with_suffix(".ids.json")
        if ids.is_file():
            import json

            return json.loads(ids.read_text()).get("salt")
        return None
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        value = (pq.read_schema(path).metadata or {}).get(b"salt")
        return value.decode() if value else None
    return None


def write_unit_embeddings(path: str | os.PathLike, rows, model_id: str, unit: str, salt: str,
                          settings: dict) -> list[Path]:
    """Series/study vectors (``inference.units.UnitRow``) written atomically, keyed by salted keys only (no paths,
    no UIDs):

    ``.npy``: [N, D] float32 unit vectors, ``<stem>.slices.npy`` [S, D] float32 slice vectors, ``<stem>.ids.json``
    {model, unit, settings, salt, ids [N], studies [N], slices: {ids [S], series [S], rows [S]}} (``rows``: the
    unit row each slice belongs to). ``.parquet``: id, study, embedding, slice_ids, slice_series,
    slice_embeddings; model, unit, settings and salt in the schema metadata.
    """
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = int(rows[0].vector.shape[-1])
    vectors = np.stack([r.vector for r in rows]).astype(np.float32)
    if path.suffix == ".npy":
        slices = np.concatenate([r.slice_vectors for r in rows]).astype(np.float32).reshape(-1, dim)
        slices_path = path.with_name(f"{path.stem}.slices.npy")
        for target, array in ((path, vectors), (slices_path, slices)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            atomic_write_bytes(target, buffer.getvalue())
        ids = path.with_suffix(".ids.json")
        atomic_write_json(ids, {
            "model": model_id, "unit": unit, "settings": settings, "salt": salt, "ids": [r.id for r in rows],
            "studies": [r.study for r in rows],
            "slices": {"ids": [k for r in rows for k in r.slice_ids],
                       "series": [k for r in rows for k in r.slice_series],
                       "rows": [n for n, r in enumerate(rows) for _ in r.slice_ids]}}, indent=1)
        return [path, slices_path, ids]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "id": [r.id for r in rows], "study": [r.study for r in rows],
            "embedding": pa.array(list(vectors), type=pa.list_(pa.float32())),
            "slice_ids": [r.slice_ids for r in rows], "slice_series": [r.slice_series for r in rows],
            "slice_embeddings": pa.array([[list(v) for v in r.slice_vectors.astype(np.float32)] for r in rows],
                                         type=pa.list_(pa.list_(pa.float32()))),
        })
        metadata = {"model": model_id, "unit": unit, "settings": json.dumps(settings), "salt": salt}
        atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata(metadata), tmp))
        return [path]
    raise UsageError(f"--out {path}: use a .npy or .parquet file name.")
