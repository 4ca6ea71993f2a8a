"""A search index over a folder of images: float16 vectors (memory-mapped), a parquet metadata table, FAISS.

Layout of an index directory (one *generation* is live; ``manifest.json`` names its files and is written
last, atomically, so a reader never sees a half-written index)::

    manifest.json               format, model (name + weight fingerprint), dim, counts, FAISS settings, files
    meta.<gen>.parquet          one row per image: id, path, caption, source, content_hash, model_id,
                                size, mtime_ns, caption_row (row in the caption vectors, -1 without caption),
                                thumbnail (the index's own PNG under thumbs/, DICOM rows only)
    thumbs/                     thumbnails of DICOM rows (and of series/study slices): the page needs no file
    image.<gen>.npy             [N, D] float16, L2-normalised image embeddings (``np.load(mmap_mode="r")``)
    caption.<gen>.npy           [C, D] float16, embeddings of the C captions (the second, text index)
    image.<gen>.faiss           FAISS index over the image vectors (ids = row numbers)
    caption.<gen>.faiss         FAISS index over the caption vectors (ids = caption rows)
    .work/                      per-chunk embeddings of an unfinished build (removed when it commits)

Build = list inputs (any dataset adapter ``embed`` reads) -> content hashes (``data.hashing.content_hash``:
SHA-256 of the file bytes, the inference engine's ``image_key`` of the same bytes; unchanged
``(path, size, mtime_ns)`` reuse the stored hash) -> vectors for hashes the current index already
holds are reused, the rest are embedded in fixed chunks -> new generation committed. The chunks are cut from
the sorted hashes of the whole listing and each is written atomically to ``.work/`` as it finishes, so a build
killed at any point resumes with the finished chunks and re-embeds the unfinished ones with the same batch
composition: the resumed index equals an uninterrupted build. Under ``accelerate launch`` chunk ``c`` is
embedded by process ``c % world``; the main process merges the chunk files and commits.

DICOM rows carry salted instance keys (``data/phi.py``): no path is stored unless ``PrivacyOptions.keep_paths``,
so a rebuild matches them by content hash alone; the salt is kept in the manifest.

Search is exact up to ``exact_max`` vectors and approximate above it (HNSW by default, IVF on request); inner
product on unit vectors = cosine similarity (FuseLIP embeddings are L2-normalised, FuseLIP paper Sec. 3).
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fuselip_med.data.hashing import content_hash, text_hash
from fuselip_med.data.phi import PrivacyOptions, Pseudonyms
from fuselip_med.data.skips import SKIPPED_CSV, SkipReport
from fuselip_med.errors import UsageError, UserError
from fuselip_med.io import (
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    damaged_files,
    file_record,
    remove_temp_files,
)

__all__ = [
    "FORMAT_VERSION", "IndexDamagedError", "IndexEntry", "SearchIndexError", "IndexSettings", "ModelId",
    "BuildReport", "SearchIndex",
    "build_index", "build_unit_index", "list_entries", "make_faiss_index", "model_fingerprint",
    "index_salt", "open_index", "series_digest", "stored_index_salt",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WORK = ".work"
THUMBS = "thumbs"
THUMBNAIL_PX = 256
IndexType = Literal["auto", "flat", "ivf", "hnsw"]


class SearchIndexError(UserError, ValueError):
    """A user-facing problem with an index directory or its inputs (message names the path and the fix)."""


class IndexDamagedError(SearchIndexError):
    """A file of a committed index is missing, cut short or altered (its size or SHA-256 differs from the
    manifest's record); the message names the file and the ``index build`` command that repairs it."""


def repair_advice(directory: Path, model: str | None) -> str:
    """The command that rebuilds the damaged files of the index at ``directory``."""
    return (f"repair it with `fuselip-med index build --model {model or '<the model>'} --input <the images> "
            f"--out {directory}` (the damaged files are rebuilt)")


@dataclass(frozen=True)
class ModelId:
    """Which model made the vectors: the name it was loaded from, a fingerprint of its weights (PyTorch) or of
    its graphs (an ONNX export, ``export.runtime.export_fingerprint``), and the runtime that ran it."""

    name: str
    fingerprint: str
    runtime: str = "pytorch"  # indexes written before runtimes were recorded were all built with PyTorch

    def __str__(self) -> str:
        return f"{self.name}@{self.fingerprint[:12]}" + (f" (runtime {self.runtime})" if self.runtime != "pytorch"
                                                         else "")

    def same_model(self, other: "ModelId") -> bool:
        """Same weights run by the same runtime (the name it was loaded from may differ)."""
        return (self.fingerprint, self.runtime) == (other.fingerprint, other.runtime)


def model_fingerprint(model) -> str:
    """sha256 hex digest of a model's weights (``core.hub.state_dict_sha256``: names, dtypes, shapes, bytes).

    Two loads of the same weights give the same fingerprint whatever path or hub id they came from.
    """
    from fuselip_med.core.hub import state_dict_sha256

    return state_dict_sha256(model.state_dict())


@dataclass(frozen=True)
class IndexSettings:
    """How the FAISS index is chosen and tuned, and how embedding is chunked.

    ``index_type``: ``auto`` = exact (``flat``) up to ``exact_max`` vectors, else ``hnsw``. HNSW: ``hnsw_m``
    links per node, ``ef_construction`` / ``ef_search`` beam widths (Malkov & Yashunin 2018); IVF: ``nlist``
    lists (default ``4 * sqrt(N)`` rounded to a power of two, at most 65536), searched with ``nprobe``.
    The HNSW defaults aim at recall@10 >= 0.95 within 10 ms per query at 1M x 512 on 2 cores; IVF needs a
    large ``nprobe`` for that on embedding-like data (see ``benchmarks/bench_search.py``).
    """

    index_type: IndexType = "auto"
    exact_max: int = 200_000
    nlist: int | None = None
    nprobe: int = 128
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    chunk_size: int = 256
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.index_type not in ("auto", "flat", "ivf", "hnsw"):
            raise UsageError(f"index type {self.index_type!r}: choose auto, flat, ivf or hnsw")
        for name in ("exact_max", "nprobe", "hnsw_m", "ef_construction", "ef_search", "chunk_size", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")

    def faiss_settings(self) -> dict[str, Any]:
        """The settings that shape the FAISS index (not how embedding was chunked or batched)."""
        return {k: v for k, v in asdict(self).items() if k not in ("chunk_size", "batch_size")}

    def resolved_type(self, n: int) -> str:
        """``flat``, ``ivf`` or ``hnsw`` for an index of ``n`` vectors."""
        if self.index_type != "auto":
            return self.index_type
        return "flat" if n <= self.exact_max else "hnsw"

    def resolved_nlist(self, n: int) -> int:
        """IVF list count for ``n`` vectors: the setting, else ``4 sqrt(n)`` as a power of two (FAISS wiki
        "Guidelines to choose an index"), never more than ``n // 39`` (FAISS's minimum training points per list)."""
        if self.nlist is not None:
            return max(1, min(self.nlist, n))
        target = 1 << max(0, int(round(np.log2(max(1.0, 4 * np.sqrt(n))))))
        return int(max(1, min(target, 65536, n // 39 or 1)))


def make_faiss_index(vectors: np.ndarray, kind: str, settings: IndexSettings):
    """A FAISS inner-product index of ``kind`` holding ``vectors`` ([N, D] float32) with ids 0..N-1.

    Every kind stores the vectors as float16 (``ScalarQuantizer.QT_fp16``), which is what the index keeps on
    disk anyway, so ``flat`` is exact search over the stored vectors (and reads half the bytes of float32).
    ``ivf`` = IVF (k-means coarse quantizer, seed 1234, trained on at most 64 points per list) + fp16 lists;
    ``hnsw`` = HNSW graph + fp16 storage.
    """
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    fp16, ip = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    if kind == "flat" or n == 0:
        index = faiss.IndexScalarQuantizer(dim, fp16, ip)
    elif kind == "hnsw":
        index = faiss.IndexHNSWSQ(dim, fp16, settings.hnsw_m, ip)
        index.hnsw.efConstruction = settings.ef_construction
        index.hnsw.efSearch = settings.ef_search
    elif kind == "ivf":
        nlist = settings.resolved_nlist(n)
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, fp16, ip)
        index.cp.seed = 1234
        index.cp.max_points_per_centroid = 64  # k-means on <= 64 points per list: 4x faster than FAISS's 256
        index.nprobe = min(settings.nprobe, nlist)
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}")
    if n:
        index.train(vectors)
        index.add(vectors)
    return index


def _to_gpu(index):
    """The index on all GPUs when FAISS was built with GPU support and sees one; kinds the GPU build cannot hold
    (HNSW) stay on the CPU."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as error:  # FAISS raises RuntimeError for index types without a GPU version
        log.info("searching on the CPU: %s", error)
        return index


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class IndexEntry:
    """One image to index: its id, the image reference (a path, or bytes from a table), caption, source;
    ``dicom``: a DICOM file, ``id`` its salted instance key (its path is stored only with ``keep_paths``)."""

    id: str
    image: Any
    caption: str | None
    source: str
    dicom: bool = False

    @property
    def path(self) -> str | None:
        return os.path.abspath(os.fspath(self.image)) if isinstance(self.image, (str, os.PathLike)) else None


def list_entries(input: str | os.PathLike, adapter: str = "folder", split: str = "train",
                 pseudonyms: Pseudonyms | None = None, privacy: PrivacyOptions = PrivacyOptions(),
                 **adapter_options: Any) -> tuple[list[IndexEntry], SkipReport]:
    """The images (with their captions where present) a dataset adapter lists, as ``embed`` reads them.

    ``adapter``: a registered adapter name (``folder``/``csv`` for folders incl. DICOM and CSV/TSV tables,
    ``rocov2``, ...). With ``pseudonyms``, DICOM files are marked (no path written, own thumbnail; source
    ``dicom``) and, where ids are paths (``folder``/``csv``), named by salted instance keys
    (``embed.pseudonymize_rows``). Without ``pseudonyms``, a folder/CSV listing DICOM files is refused
    (``UsageError``: their paths would be the ids, and stored; PS3.15 Annex E) unless ``privacy.keep_paths``
    asks for exactly that. Returns (entries sorted by id, a ``SkipReport`` naming the adapter's skips too; with
    DICOM found and paths not kept, skips named by path get salted ``file-`` keys as in ``embed``). Raises
    ``DatasetEmptyError``/``FileNotFoundError`` from the adapter and ``KeyError`` for an unknown adapter.
    """
    from fuselip_med.data.adapters import get_adapter
    from fuselip_med.embed import pseudonymize_rows, rows_from_source

    if adapter in ("folder", "csv"):
        adapter_options.setdefault("check_files", False)
        adapter_options.setdefault("require_caption", False)  # captions are optional: the second text index
    source = get_adapter(adapter)(str(input), split=split, **adapter_options)
    captions = {row.id: row.text for row in rows_from_source(source, "text")}
    skipped = SkipReport.merged([getattr(source, "skipped", None)])
    rows = rows_from_source(source, "image")
    for row in rows:
        row.text = captions.get(row.id) or None
    if pseudonyms is None and not privacy.keep_paths and adapter in ("folder", "csv"):
        from fuselip_med.data.images import is_dicom

        if any(isinstance(row.image, (str, os.PathLike)) and is_dicom(row.image) for row in rows):
            raise UsageError(f"{input} holds DICOM files: pass pseudonyms=Pseudonyms(index_salt(out)) (and that "
                             "salt to build_index) so they are named by salted instance keys, not by their paths "
                             "(PACS exports name folders after patients), or privacy=PrivacyOptions(keep_paths=True)")
    if pseudonyms is not None:
        rows = pseudonymize_rows(rows, pseudonyms, privacy, skips=skipped, rename=adapter in ("folder", "csv"))
    entries: dict[str, IndexEntry] = {}
    for row in rows:
        if row.id in entries:
            skipped.add(row.id, source.name, "duplicate id")
            continue
        entries[row.id] = IndexEntry(row.id, row.image, row.text, "dicom" if row.dicom else source.name, row.dicom)
    return [entries[k] for k in sorted(entries)], skipped


# ------------------------------------------------------------------------------------------------ reading
class SearchIndex:
    """A committed index opened for search: metadata, memory-mapped float16 vectors and the FAISS indexes."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise SearchIndexError(f"{self.directory} is not a search index (no {MANIFEST}); "
                              "build one with `fuselip-med index build`.")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = self.manifest["files"]
            model = self.manifest["model"]["name"]
        except (ValueError, KeyError, TypeError):
            raise IndexDamagedError(f"{manifest_path} is damaged (not a complete index manifest); "
                                    f"{repair_advice(self.directory, None)}.") from None
        if self.manifest.get("format") != FORMAT_VERSION:
            raise SearchIndexError(f"{manifest_path}: index format {self.manifest.get('format')} is not "
                                   f"{FORMAT_VERSION}; rebuild it with `fuselip-med index build --model {model} "
                                   f"--input <the images> --out {self.directory} --rebuild`.")
        damaged = damaged_files(self.directory, self.manifest.get("checksums", {}))
        if damaged:
            name, why = next(iter(damaged.items()))
            more = f" (and {len(damaged) - 1} more file(s))" if len(damaged) > 1 else ""
            raise IndexDamagedError(f"{self.directory / name} is damaged ({why}){more}; "
                                    f"{repair_advice(self.directory, model)}.")
        import pandas as pd

        self.meta = pd.read_parquet(self.directory / files["meta"])
        for column in ("path", "caption", "thumbnail"):  # no stored value reads as None, not NaN
            if column in self.meta.columns:
                self.meta[column] = self.meta[column].astype(object).where(self.meta[column].notna(), None)
        self.image_vectors = np.load(self.directory / files["image_vectors"], mmap_mode="r")
        self.caption_vectors = np.load(self.directory / files["caption_vectors"], mmap_mode="r")
        self._faiss: dict[str, Any] = {}
        self._row_of_id = {str(i): r for r, i in enumerate(self.meta["id"])}
        self.caption_rows = np.flatnonzero(self.meta["caption_row"].to_numpy() >= 0)
        self.unit: str = self.manifest.get("unit", "image")
        self.privacy = PrivacyOptions(**self.manifest.get("privacy", {}))
        self.slices = pd.read_parquet(self.directory / files["slices"]) if "slices" in files else None
        self.slice_vectors = (np.load(self.directory / files["slice_vectors"], mmap_mode="r")
                              if "slice_vectors" in files else None)
        self._slice_rows: dict[int, np.ndarray] = {}
        if self.slices is not None:
            for row, group in self.slices.groupby("row").groups.items():
                self._slice_rows[int(row)] = np.asarray(group, dtype=np.int64)

    def slice_rows(self, row: int) -> np.ndarray:
        """Rows of the slice table behind unit row ``row`` (int64 [k]; empty for an image index)."""
        return self._slice_rows.get(int(row), np.zeros(0, dtype=np.int64))

    def best_slice(self, row: int, query: np.ndarray) -> tuple[int, float] | None:
        """(slice table row, cosine score) of the slice of unit row ``row`` closest to ``query`` [D] float32;
        None for an image index."""
        rows = self.slice_rows(row)
        if not len(rows) or self.slice_vectors is None:
            return None
        scores = np.asarray(self.slice_vectors[rows], dtype=np.float32) @ np.asarray(query, dtype=np.float32)
        best = int(np.argmax(scores))
        return int(rows[best]), float(scores[best])

    def row_thumbnail_path(self, row: int) -> Path | None:
        """The index's own thumbnail of image row ``row`` (DICOM rows), or None (none stored)."""
        if "thumbnail" not in self.meta.columns:
            return None
        name = self.meta.iloc[int(row)]["thumbnail"]
        return self.directory / THUMBS / name if isinstance(name, str) and name else None

    def thumbnail_path(self, slice_row: int) -> Path | None:
        """The stored thumbnail of a slice, or None (burned-in risk without --allow-burned-in)."""
        name = self.slices.iloc[int(slice_row)]["thumbnail"] if self.slices is not None else None
        return self.directory / THUMBS / name if name else None

    @property
    def model(self) -> ModelId:
        return ModelId(**self.manifest["model"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.meta)

    def row_of(self, id: str) -> int:
        """Row number of an item id (``KeyError`` naming it when absent)."""
        try:
            return self._row_of_id[id]
        except KeyError:
            raise KeyError(f"no item {id!r} in the index {self.directory}") from None

    def faiss_index(self, target: str = "image"):
        """The FAISS index over ``image`` or ``caption`` vectors (read once; on GPUs where FAISS has them)."""
        if target not in ("image", "caption"):
            raise ValueError(f"search target {target!r}: use image or caption")
        if target not in self._faiss:
            import faiss

            path = self.directory / self.manifest["files"][f"{target}_faiss"]
            self._faiss[target] = _to_gpu(faiss.read_index(str(path)))
        return self._faiss[target]

    def search(self, queries: np.ndarray, k: int = 10, target: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: (scores [Q, k] float32 inner products, rows [Q, k] int64 metadata rows).

        ``queries``: [Q, D] (or [D]) L2-normalised float32. Missing hits (k > size) have row -1, score -inf.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match the index dimension {self.dim}")
        index = self.faiss_index(target)
        scores, ids = index.search(queries, k)
        if target == "caption":
            ids = np.where(ids >= 0, self.caption_rows[np.clip(ids, 0, None)] if len(self.caption_rows) else -1, -1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)


def open_index(directory: str | os.PathLike) -> SearchIndex:
    """Open a committed index (``SearchIndexError`` naming the directory when it is none)."""
    return SearchIndex(directory)


# ------------------------------------------------------------------------------------------------ building
@dataclass
class BuildReport:
    """What a build did: counts of rows, reused/embedded vectors, skipped items by id with the reason.

    ``skipped`` ({id: reason}, kept in the manifest) and ``skips`` (the same rows as a ``data.skips.SkipReport``:
    id, source (the file, or ``input`` for DICOM), reason, as ``embed`` and ``eval`` name theirs) are filled by
    the main process.

    ``embedded_*`` count the vectors this process made (an image that failed to decode is not counted: it is in
    ``skipped``); ``embedded_elsewhere`` the new image vectors the main process
    took from chunks written by other processes or by an earlier, interrupted run of the same build. In a
    series/study index the items are series (``embedded_images``, ``reused_images``, ``embedded_elsewhere``
    count series) and ``n_slices`` counts the slices kept.
    """

    n_rows: int = 0
    n_captions: int = 0
    embedded_images: int = 0
    embedded_captions: int = 0
    embedded_elsewhere: int = 0
    reused_images: int = 0
    n_slices: int = 0
    removed: int = 0
    index_type: str = "flat"
    up_to_date: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    skips: SkipReport = field(default_factory=SkipReport)
    repaired: str | None = None  # what was damaged in the previous index (rebuilt from the images)


@dataclass
class _Process:
    """This process's place in a multi-process build (``accelerate launch``); one process by default."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _process_from(accelerator) -> _Process:
    if accelerator is None:
        return _Process()
    return _Process(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _load_previous(out: Path, report: BuildReport) -> SearchIndex | None:
    """The committed index at ``out``; a damaged one is noted in ``report.repaired`` and rebuilt (None)."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        return SearchIndex(out)
    except IndexDamagedError as error:
        report.repaired = str(error).split(";")[0]
        return None


def _hash_entries(entries: Sequence[IndexEntry], previous: SearchIndex | None,
                  skipped: dict[str, str]) -> list[tuple[IndexEntry, str, int, int]]:
    """(entry, content hash, size, mtime_ns) of readable entries; a stored hash is reused when the file's
    path, size and mtime are unchanged."""
    known: dict[tuple[str, int, int], str] = {}
    if previous is not None:
        meta = previous.meta
        known = {(p, int(s), int(m)): h for p, s, m, h in zip(meta["path"], meta["size"], meta["mtime_ns"],
                                                              meta["content_hash"]) if p is not None}
    out = []
    for entry in entries:
        path, size, mtime = entry.path, -1, -1
        try:
            if path is not None:
                stat = os.stat(path)
                size, mtime = stat.st_size, stat.st_mtime_ns
            digest = known.get((path, size, mtime)) if path is not None else None
            out.append((entry, digest or content_hash(entry.image), size, mtime))
        except OSError as error:
            skipped[entry.id] = f"cannot read the file ({error.strerror or error})"
    return out


def _chunks(keys: list[str], size: int) -> list[list[str]]:
    return [keys[a:a + size] for a in range(0, len(keys), size)]


def _chunk_path(work: Path, kind: str, keys: Sequence[str]) -> Path:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
    return work / kind / f"{digest}.npz"


def _read_chunks(work: Path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors ({key: [D] float16}) and failures ({key: reason}) of every finished chunk of ``kind``."""
    vectors: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    folder = work / kind
    if not folder.is_dir():
        return vectors, failed
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            vectors.update(zip(data["keys"].tolist(), data["vectors"]))
            failed.update(zip(data["failed_keys"].tolist(), data["failed_reasons"].tolist()))
    return vectors, failed


def _embed_chunk(model, kind: str, keys: list[str], source: dict[str, Any], settings: IndexSettings,
                 path: Path) -> int:
    """Embed one chunk (images by content hash, or caption texts) and write it atomically to ``path``; returns
    how many of ``keys`` got a vector (the others are recorded as failed)."""
    from fuselip_med.inference.engine import embed_items
    from fuselip_med.inference.items import EmbedItem

    if kind == "image":
        items = [EmbedItem.of_image(source[k], key=k) for k in keys]
    else:
        items = [EmbedItem.of_text(source[k]) for k in keys]
    table = embed_items(model, items, batch_size=settings.batch_size, progress=False,
                        warn_skips=False)  # failures go to the chunk, then skipped.csv and the summary line
    done = [(k, it.key) for k, it in zip(keys, items) if it.key in table]
    vectors = table.lookup([key for _, key in done]).numpy() if done else np.zeros((0, 0), np.float32)
    failed = [(k, str(table.failed.get(it.key, "not embedded"))) for k, it in zip(keys, items) if it.key not in table]
    _write_chunk(path, [k for k, _ in done], vectors, failed)
    return len(done)


def _write_chunk(path: Path, keys: list[str], vectors: np.ndarray, failed: list[tuple[str, str]]) -> None:
    """One finished chunk, atomically: ``keys`` [n] with ``vectors`` [n, D] (stored float16) and the failed
    (key, reason) pairs; ``_read_chunks`` reads it back."""
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(keys, dtype=str), vectors=np.asarray(vectors).astype(np.float16),
             failed_keys=np.array([k for k, _ in failed], dtype=str),
             failed_reasons=np.array([r for _, r in failed], dtype=str))
    atomic_write_bytes(path, buffer.getvalue())


def _embed_missing(model, kind: str, keys_in_listing: list[str], have: set[str], source: dict[str, Any],
                   settings: IndexSettings, work: Path, process: _Process, progress,
                   embed_chunk: Callable[..., None] | None = None,
                   listing_key: Callable[[str], str] = str) -> int:
    """Embed the keys of the listing that no stored vector or finished chunk holds; chunk ``c`` belongs to
    process ``c % world``. ``embed_chunk(model, kind, keys, source, settings, path)`` embeds one chunk and
    writes it (default ``_embed_chunk``: one vector per key); ``listing_key`` maps a key stored in a chunk to
    its listing key (a series chunk stores one key per slice). Returns how many keys this process embedded."""
    embed_chunk = embed_chunk or _embed_chunk
    done_vectors, done_failed = _read_chunks(work, kind)
    finished = {listing_key(k) for k in done_vectors} | set(done_failed)
    embedded = 0
    chunks = _chunks(sorted(set(keys_in_listing)), settings.chunk_size)
    todo = []
    for number, chunk in enumerate(chunks):
        needed = [k for k in chunk if k not in have and k not in finished]
        if needed and number % process.world == process.rank:
            todo.append(needed)
    task = progress.add_task(f"embedding {kind}s", total=sum(map(len, todo))) if progress and todo else None
    for needed in todo:
        embed_chunk(model, kind, needed, source, settings, _chunk_path(work, kind, needed))
        embedded += len(needed)
        if task is not None:
            progress.advance(task, len(needed))
    return embedded


def build_index(out: str | os.PathLike, entries: Sequence[IndexEntry], model, model_id: ModelId,
                settings: IndexSettings = IndexSettings(), *, rebuild: bool = False, accelerator=None,
                progress: bool = True, salt: str | None = None,
                privacy: PrivacyOptions = PrivacyOptions()) -> BuildReport:
    """Build or update the index at ``out`` so that it holds exactly ``entries`` embedded by ``model``.

    ``model``: anything with FuseLIP's ``encode(images=[B, 3, S, S] float32 | texts=[str])`` -> [B, D];
    ``model_id`` names it in the index. Vectors of unchanged content are reused, new/changed content is
    embedded, entries that are gone are dropped. Items whose image cannot be read or decoded are left out and
    named in ``BuildReport.skipped`` (id -> reason). Raises ``SearchIndexError`` when ``out`` holds an index of
    another model (pass ``rebuild=True`` to replace it). With ``accelerator`` (Accelerate) every process
    embeds its share of the chunks and only the main process writes the index; the others' reports hold
    only their embedding counts. The main process holds the index's writer lock (``locks.writer_lock``)
    throughout: a second build into the same ``out`` raises ``FolderBusyError`` naming the running one.

    DICOM entries (``IndexEntry.dicom``, keyed by ``list_entries(pseudonyms=...)`` with ``salt``) store no path
    unless ``privacy.keep_paths`` and get the index's own thumbnail (none at burned-in risk unless
    ``privacy.allow_burned_in``); ``salt`` and ``privacy`` are kept in the manifest.
    """
    from contextlib import nullcontext

    from fuselip_med.locks import writer_lock

    out = Path(out)
    process = _process_from(accelerator)
    if process.is_main:
        check_writable(out)  # before any work: OutputError naming the folder
    with writer_lock(out, "index build") if process.is_main else nullcontext():
        return _build(out, entries, model, model_id, settings, rebuild, process, progress, salt, privacy)


def _build(out: Path, entries: Sequence[IndexEntry], model, model_id: ModelId, settings: IndexSettings,
           rebuild: bool, process: _Process, progress: bool, salt: str | None,
           privacy: PrivacyOptions) -> BuildReport:
    """``build_index``'s work, under the lock."""
    report = BuildReport()
    previous = None if rebuild else _load_previous(out, report)
    if previous is not None and not previous.model.same_model(model_id):
        raise SearchIndexError(f"{out} holds an index built with model {previous.model}, not {model_id}; "
                               "use --rebuild to replace it, or another --out.")
    work = _prepare_work(out, model_id, process)

    skipped: dict[str, str] = {}
    hashed = _hash_entries(entries, previous, skipped)
    stored: dict[str, np.ndarray] = {}
    stored_captions: dict[str, np.ndarray] = {}
    if previous is not None:
        for row, digest in enumerate(previous.meta["content_hash"]):
            stored.setdefault(digest, previous.image_vectors[row])
        for row, (caption, crow) in enumerate(zip(previous.meta["caption"], previous.meta["caption_row"])):
            if crow >= 0:
                stored_captions.setdefault(text_hash(caption), previous.caption_vectors[crow])
    images = {digest: entry.image for entry, digest, _, _ in hashed}
    texts = {text_hash(entry.caption): entry.caption for entry, _, _, _ in hashed if entry.caption}

    embedded: collections.Counter = collections.Counter()  # vectors this process made, per kind (not failures)

    def embed_and_count(model, kind, keys, source, settings, path) -> None:
        embedded[kind] += _embed_chunk(model, kind, keys, source, settings, path)

    bar = _progress(progress and process.is_main)
    with bar:
        _embed_missing(model, "image", list(images), set(stored), images, settings, work, process, bar,
                       embed_and_count)
        _embed_missing(model, "caption", list(texts), set(stored_captions), texts, settings, work, process, bar,
                       embed_and_count)
    report.embedded_images, report.embedded_captions = embedded["image"], embedded["caption"]
    process.barrier()
    if not process.is_main:
        return report

    new_images, failed_images = _read_chunks(work, "image")
    # this process's vectors are among the new ones, so the rest (other processes, an interrupted run) is >= 0
    report.embedded_elsewhere = sum(1 for k in new_images if k in images and k not in stored) - report.embedded_images
    new_captions, _ = _read_chunks(work, "caption")
    image_vectors = {**stored, **new_images}
    caption_vectors = {**stored_captions, **new_captions}
    rows, image_rows, caption_rows = [], [], []
    for entry, digest, size, mtime in hashed:
        if digest not in image_vectors:
            skipped[entry.id] = failed_images.get(digest, "not embedded")
            continue
        caption_key = text_hash(entry.caption) if entry.caption else None
        has_caption = caption_key is not None and caption_key in caption_vectors
        rows.append({"id": entry.id, "path": privacy.written_path(entry.path, entry.dicom), "caption": entry.caption,
                     "source": entry.source, "content_hash": digest, "model_id": str(model_id), "size": size,
                     "mtime_ns": mtime, "caption_row": len(caption_rows) if has_caption else -1,
                     "thumbnail": _dicom_thumbnail(out, entry, digest, privacy) if entry.dicom else None})
        image_rows.append(image_vectors[digest])
        if has_caption:
            caption_rows.append(caption_vectors[caption_key])
    dim = _dimension(image_rows, caption_rows, previous)
    if not dim:
        reasons = collections.Counter(skipped.values())
        raise SearchIndexError(f"no image of the {len(entries)} listed could be embedded ("
                               + ", ".join(f"{r}: {n}" for r, n in reasons.most_common(3)) + "); nothing was written.")
    report.n_rows, report.n_captions, report.skipped = len(rows), len(caption_rows), skipped
    listed = {entry.id: entry for entry in entries}
    for entry_id, reason in skipped.items():
        entry = listed[entry_id]
        report.skips.add(entry_id, entry.path if entry.path is not None and not entry.dicom else "input", reason)
    report.skips.kept = len(rows)
    report.reused_images = sum(1 for _, d, _, _ in hashed if d in stored)
    report.index_type = settings.resolved_type(len(rows))
    if previous is not None:
        report.removed = len(set(previous.meta["id"]) - {r["id"] for r in rows})
    extra_manifest = None
    if salt is not None:
        extra_manifest = {"salt": salt, "privacy": _privacy_record(privacy)}
    _commit(out, rows, _stack(image_rows, dim), _stack(caption_rows, dim), model_id, settings, report, previous,
            extra_manifest=extra_manifest)
    _remove_stale_thumbnails(out, {r["thumbnail"] for r in rows if r["thumbnail"]})
    return report


def _privacy_record(privacy: PrivacyOptions) -> dict[str, bool]:
    return {"keep_paths": privacy.keep_paths, "show_paths": privacy.show_paths,
            "allow_burned_in": privacy.allow_burned_in}


def _dicom_thumbnail(out: Path, entry: IndexEntry, digest: str, privacy: PrivacyOptions) -> str | None:
    """The index's own PNG of a DICOM entry under ``thumbs/`` (``<key>.<content hash[:16]>.png``, written once
    per content; windowed as ``data.images.load_image`` does), or None: burned-in risk without
    ``allow_burned_in`` (``phi.burned_in_risk``), or an image that no longer decodes."""
    import pydicom

    from fuselip_med.data.images import ImageDecodeError, load_image
    from fuselip_med.data.phi import burned_in_risk

    name = f"{entry.id}.{digest[:16]}.png"
    target = out / THUMBS / name
    if target.is_file():
        return name
    try:
        if not privacy.allow_burned_in and burned_in_risk(pydicom.dcmread(entry.image, stop_before_pixels=True)):
            return None
        atomic_write_bytes(target, _thumbnail_png(np.asarray(load_image(entry.image).convert("RGB"))))
    except (ImageDecodeError, OSError, ValueError):
        return None
    return name


def _remove_stale_thumbnails(out: Path, keep: set[str]) -> None:
    """Delete the thumbnails under ``thumbs/`` that no row of the committed index names."""
    for stale in (out / THUMBS).glob("*.png") if (out / THUMBS).is_dir() else []:
        if stale.name not in keep:
            stale.unlink()


def _prepare_work(out: Path, model_id: ModelId, process: _Process) -> Path:
    """``out/.work`` holding the finished chunks of an interrupted build of the same model (cleared when the
    model differs: its chunks are of no use)."""
    work = out / WORK
    fingerprint_file = work / "model.json"
    if process.is_main:
        work.mkdir(parents=True, exist_ok=True)
        stamp = json.dumps(asdict(model_id))
        if not fingerprint_file.is_file() or fingerprint_file.read_text() != stamp:
            salt = (work / "salt").read_text() if (work / "salt").is_file() else None
            _clear_work(work)
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_text(fingerprint_file, stamp)
            if salt:
                atomic_write_text(work / "salt", salt)  # the rows of this build are keyed by it
    process.barrier()
    return work


def _dimension(image_rows: list, caption_rows: list, previous: SearchIndex | None) -> int:
    if image_rows:
        return int(image_rows[0].shape[-1])
    if caption_rows:
        return int(caption_rows[0].shape[-1])
    return previous.dim if previous is not None else 0


def _stack(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.stack(vectors).astype(np.float16) if vectors else np.zeros((0, dim), dtype=np.float16)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from fuselip_med.progress import new_progress

    return new_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        enabled=enabled, transient=True)


def _commit(out: Path, rows: list[dict], image_vectors: np.ndarray, caption_vectors: np.ndarray,
            model_id: ModelId, settings: IndexSettings, report: BuildReport, previous: SearchIndex | None,
            extra_files: dict[str, tuple[str, bytes]] | None = None, extra_manifest: dict | None = None) -> None:
    """Write the new generation's files, then the manifest (atomic), then remove old generations and work.

    ``extra_files``: {role: (file name prefix, bytes)} written as ``<prefix>.<gen>.<suffix>`` beside the others
    (the slice table and vectors of a series/study index); ``extra_manifest``: keys added to the manifest."""
    extra_files = extra_files or {}
    import faiss
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = report.index_type
    meta = pd.DataFrame(rows, columns=["id", "path", "caption", "source", "content_hash", "model_id", "size",
                                       "mtime_ns", "caption_row", "thumbnail"])
    meta = meta.astype({"size": "int64", "mtime_ns": "int64", "caption_row": "int64"})
    table = pa.Table.from_pandas(meta, preserve_index=False)
    digest = hashlib.sha256()
    digest.update(json.dumps(rows, sort_keys=True, default=str).encode())
    digest.update(image_vectors.tobytes())
    digest.update(caption_vectors.tobytes())
    digest.update(json.dumps([kind, settings.faiss_settings(), extra_manifest], sort_keys=True).encode())
    for _, data in extra_files.values():
        digest.update(data)
    gen = digest.hexdigest()[:16]
    files = {"meta": f"meta.{gen}.parquet", "image_vectors": f"image.{gen}.npy",
             "caption_vectors": f"caption.{gen}.npy", "image_faiss": f"image.{gen}.faiss",
             "caption_faiss": f"caption.{gen}.faiss"}
    for role, (name, data) in extra_files.items():
        files[role] = f"{name.split('.')[0]}.{gen}.{name.split('.', 1)[1]}"
    if previous is not None and previous.manifest.get("generation") == gen and "checksums" in previous.manifest:
        report.up_to_date = True
        _clear_work(out / WORK)
        return
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(out / files["meta"], sink.getvalue())
    _save_npy(out / files["image_vectors"], image_vectors)
    _save_npy(out / files["caption_vectors"], caption_vectors)
    for target, vectors in (("image", image_vectors), ("caption", caption_vectors)):
        index = make_faiss_index(vectors.astype(np.float32), settings.resolved_type(len(vectors)), settings)
        atomic_write_bytes(out / files[f"{target}_faiss"], faiss.serialize_index(index).tobytes())
    for role, (_, data) in extra_files.items():
        atomic_write_bytes(out / files[role], data)
    manifest = {**(extra_manifest or {}), "format": FORMAT_VERSION, "generation": gen, "model": asdict(model_id),
                "dim": int(image_vectors.shape[1]), "count": len(rows), "captions": int(len(caption_vectors)),
                "index": {"type": kind, **settings.faiss_settings()}, "files": files, "skipped": report.skipped,
                "checksums": {name: file_record(out / name) for name in files.values()}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    keep = set(files.values()) | {MANIFEST, WORK}
    for path in out.iterdir():
        if path.name not in keep and path.is_file() and path.name.split(".")[0] in ("meta", "image", "caption",
                                                                                     "slices", "slicevec"):
            path.unlink()
    remove_temp_files(out)  # what an interrupted atomic write left
    _clear_work(out / WORK)


def _clear_work(work: Path) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ series / study
def _thumbnail_png(image: np.ndarray) -> bytes:
    """PNG bytes of a rendered slice (uint8 [H, W] or [H, W, 3]), longest side at most ``THUMBNAIL_PX``."""
    from PIL import Image

    picture = Image.fromarray(image).convert("RGB")
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def series_digest(series, unit_settings: dict) -> str:
    """sha256 hex of what a series' slice vectors depend on: its salted series/study keys, the unit settings
    (slices, rendering, plane) and the content hash of every instance in slice order (a file's bytes,
    ``data.hashing.content_hash``; an in-memory data set by its salted slice key) with its frame and axis.
    Raises ``OSError`` for an unreadable file."""
    digest = hashlib.sha256(json.dumps([series.key, series.study_key, unit_settings], sort_keys=True).encode())
    hashes: dict[str, str] = {}
    for ref in series.slices:
        if isinstance(ref.source, (str, os.PathLike)):
            path = os.fspath(ref.source)
            part = hashes.get(path) or hashes.setdefault(path, content_hash(path))
        else:
            part = ref.key
        digest.update(f"{part}#{ref.frame}#{ref.axis}\n".encode())
    return digest.hexdigest()


def _embed_series_chunk(model, kind: str, keys: list[str], source: dict[str, Any], settings: IndexSettings,
                        path: Path, *, options, out: Path, privacy: PrivacyOptions) -> int:
    """Embed the series of one chunk (``source``: {digest: Series}) through their sampled slices
    (``inference.units.embed_series``), write their thumbnails under ``thumbs/`` (``<slice key>.png``; none at burned-in
    risk unless ``privacy.allow_burned_in``) and the chunk (one key ``<digest>#<n>#<slice key>`` per slice); returns
    how many series were embedded (the failed ones are in the chunk, not counted)."""
    from fuselip_med.inference.units import embed_series

    slice_keys, vectors, failed = [], [], []
    for digest in keys:
        series = source[digest]
        skips = SkipReport()
        done = embed_series(model, [series], options, batch_size=settings.batch_size, skips=skips, keep_images=True,
                            progress=False)
        if not done:
            failed.append((digest, skips.entries[-1].reason if skips.entries else "not embedded"))
            continue
        show = privacy.allow_burned_in or not series.burned_in
        for number, (key, image) in enumerate(zip(done[0].slice_keys, done[0].images or [])):
            if show:
                atomic_write_bytes(out / THUMBS / f"{key}.png", _thumbnail_png(image))
            slice_keys.append(f"{digest}#{number:05d}#{key}")
        vectors.append(done[0].slice_vectors)
    dim = vectors[0].shape[-1] if vectors else 0
    _write_chunk(path, slice_keys, np.concatenate(vectors) if vectors else np.zeros((0, dim)), failed)
    return len(vectors)


def _stored_series(previous: SearchIndex | None, unit: str) -> dict[str, tuple[list[str], np.ndarray]]:
    """{series digest: (slice keys [k], slice vectors [k, D] float16)} of a previous index of the same unit."""
    if previous is None or previous.unit != unit or previous.slices is None or "series_hash" not in previous.slices:
        return {}
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for digest, rows in previous.slices.groupby("series_hash", sort=False).groups.items():
        rows = np.asarray(rows, dtype=np.int64)
        out[str(digest)] = ([str(k) for k in previous.slices["slice"].iloc[rows]],
                            np.asarray(previous.slice_vectors[rows], dtype=np.float16))
    return out


def build_unit_index(out: str | os.PathLike, series: Sequence, model, model_id: ModelId, unit: str, salt: str,
                     options=None, settings: IndexSettings = IndexSettings(), *,
                     privacy: PrivacyOptions = PrivacyOptions(), skips=None, rebuild: bool = False,
                     progress: bool = False) -> BuildReport:
    """Build or update a series or study index at ``out`` from ``series`` (``data.studies.Series``, keyed by
    ``salt``), each embedded through its sampled slices (``options``: ``inference.units.UnitOptions``).

    Incremental and resumable as ``build_index`` is, with the series as the item: a series is known by
    ``series_digest`` (content hashes of its instances + unit settings); an unchanged series reuses its stored
    slice vectors, a removed one is dropped, the rest are embedded in chunks of ``settings.chunk_size //
    options.slices`` series (at least one), each written atomically to ``.work/series/`` with its thumbnails,
    so a killed build resumes with the finished chunks and ends with the same index. Slice vectors are pooled
    as stored (float16), so reused, resumed and fresh series give the same vectors.

    Rows are keyed by salted series/study keys; the slice table (row, study, series, slice, thumbnail,
    series_hash) and the slice vectors ([S, D] float16) are kept for the best-slice answer; thumbnails are the
    index's own PNGs under ``thumbs/``. The first file of a row is stored only when ``privacy.keep_paths``. The
    salt is kept in the manifest (same keys on rebuild). A series that cannot be embedded is named in
    ``skips`` (``data.skips.SkipReport``) by its key. Raises ``SearchIndexError`` when ``out`` holds an index
    of another model or unit (``rebuild`` replaces it) or when no series could be embedded (the message gives
    ``skips.summary()``: reasons with example keys; the full list is written to ``out/skipped.csv``).
    """
    from fuselip_med.inference.units import UnitOptions
    from fuselip_med.locks import writer_lock

    out = Path(out)
    check_writable(out)  # before any work: OutputError naming the folder
    with writer_lock(out, "index build"):
        return _build_units(out, series, model, model_id, unit, salt, options or UnitOptions(), settings, privacy,
                            skips, rebuild, progress)


def _build_units(out: Path, series: Sequence, model, model_id: ModelId, unit: str, salt: str, options,
                 settings: IndexSettings, privacy: PrivacyOptions, skips, rebuild: bool,
                 progress: bool) -> BuildReport:
    """``build_unit_index``'s work, under the lock."""
    import dataclasses

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fuselip_med.inference.units import SeriesEmbedding, pool, unit_rows

    report = BuildReport()
    previous = None if rebuild else _load_previous(out, report)
    if previous is not None and (not previous.model.same_model(model_id) or previous.unit != unit):
        raise SearchIndexError(f"{out} holds a {previous.unit} index built with model {previous.model}, not a {unit} "
                               f"index of {model_id}; use --rebuild to replace it, or another --out.")
    work = _prepare_work(out, model_id, _Process())
    unit_settings = options.describe()
    listed: dict[str, Any] = {}
    for item in series:
        try:
            listed[series_digest(item, unit_settings)] = item
        except OSError as error:
            if skips is not None:
                skips.add(item.key, f"study {item.study_key}", f"cannot read the file ({error.strerror or error})")
    stored = _stored_series(previous, unit)
    chunking = dataclasses.replace(settings, chunk_size=max(1, settings.chunk_size // options.slices))
    embedded_here = 0

    def embed_chunk(*args) -> None:  # counts the series embedded, not the ones attempted
        nonlocal embedded_here
        embedded_here += _embed_series_chunk(*args, options=options, out=out, privacy=privacy)

    with _progress(progress) as bar:
        _embed_missing(model, "series", list(listed), set(stored), listed, chunking, work, _Process(), bar,
                       embed_chunk, lambda k: k.split("#", 1)[0])
    report.embedded_images = embedded_here
    chunk_vectors, failed = _read_chunks(work, "series")
    fresh: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    for key, vector in sorted(chunk_vectors.items()):
        digest, number, slice_key = key.split("#", 2)  # a NIfTI slice key holds its own '#': <volume>#<i>
        fresh.setdefault(digest, []).append((slice_key, number, vector))
    embedded, digests = [], {}
    for digest, item in listed.items():
        if digest in stored:
            slice_keys, vectors = stored[digest]
            report.reused_images += 1
        elif digest in fresh:
            slice_keys = [k for k, _, _ in fresh[digest]]
            vectors = np.stack([v for _, _, v in fresh[digest]])
        else:
            if skips is not None:
                skips.add(item.key, f"study {item.study_key}", failed.get(digest, "not embedded"))
            continue
        vectors = np.asarray(vectors, dtype=np.float16).astype(np.float32)
        embedded.append(SeriesEmbedding(item, list(slice_keys), [None] * len(slice_keys), vectors, pool(vectors)))
        digests[item.key] = digest
    if skips is not None:
        skips.kept = len(embedded)
    if not embedded:
        if skips is None:
            raise SearchIndexError(f"no {unit} could be embedded; no index was written.")
        listed = skips.write_csv(out / SKIPPED_CSV)
        raise SearchIndexError(f"no {unit} could be embedded ({skips.summary()}); no index was written; the series "
                               f"are named in {listed}.")
    rows = unit_rows(embedded, unit)
    first = {}
    for item in embedded:
        for key in (item.series.key, item.series.study_key):
            first.setdefault(key, item.series.slices[0].source)
    dim = int(rows[0].vector.shape[-1])
    burned = {s.series.key: s.series.burned_in for s in embedded}
    meta, slices = [], []
    for number, row in enumerate(rows):
        digest = hashlib.sha256(np.ascontiguousarray(row.slice_vectors, dtype=np.float32).tobytes()).hexdigest()
        source = first.get(row.id)
        path = privacy.written_path(os.fspath(source) if isinstance(source, (str, os.PathLike)) else None, dicom=True)
        meta.append({"id": row.id, "path": path, "caption": None, "source": unit, "content_hash": digest,
                     "model_id": str(model_id), "size": -1, "mtime_ns": -1, "caption_row": -1, "thumbnail": None})
        for slice_id, series_key in zip(row.slice_ids, row.slice_series):
            name = f"{slice_id}.png"
            shown = (privacy.allow_burned_in or not burned[series_key]) and (out / THUMBS / name).is_file()
            slices.append({"row": number, "study": row.study, "series": series_key, "slice": slice_id,
                           "thumbnail": name if shown else None, "series_hash": digests[series_key]})
    slice_table = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(slices, columns=["row", "study", "series", "slice", "thumbnail",
                                                                      "series_hash"]), preserve_index=False),
                   slice_table)
    slice_vectors = io.BytesIO()
    np.save(slice_vectors, np.concatenate([r.slice_vectors for r in rows]).astype(np.float16).reshape(-1, dim))
    report.n_rows, report.n_slices, report.index_type = len(rows), len(slices), settings.resolved_type(len(rows))
    report.embedded_elsewhere = sum(1 for d in digests.values() if d in fresh) - report.embedded_images
    if previous is not None:
        report.removed = len(set(previous.meta["id"]) - {r.id for r in rows})
    extra_manifest = {"unit": unit, "salt": salt, "units": unit_settings, "privacy": _privacy_record(privacy)}
    _commit(out, meta, _stack([r.vector for r in rows], dim), _stack([], dim), model_id, settings, report, previous,
            extra_files={"slices": ("slices.parquet", slice_table.getvalue()),
                         "slice_vectors": ("slicevec.npy", slice_vectors.getvalue())},
            extra_manifest=extra_manifest)
    _remove_stale_thumbnails(out, {s["thumbnail"] for s in slices if s["thumbnail"]})
    return report


def stored_index_salt(out: str | os.PathLike) -> str | None:
    """The pseudonym salt of the index at ``out`` (reused on rebuild so keys stay the same), or None."""
    manifest = Path(out) / MANIFEST
    return json.loads(manifest.read_text()).get("salt") if manifest.is_file() else None


def index_salt(out: str | os.PathLike, rebuild: bool = False) -> str:
    """The salt a build of ``out`` keys its rows with: the committed index's (unless ``rebuild``), else the one an
    unfinished build left in ``.work/salt`` (its chunks are keyed by it, so a killed first build resumes), else
    a fresh one (``phi.new_salt``), kept there at once. Never printed."""
    from fuselip_med.data.phi import new_salt

    stored = None if rebuild else stored_index_salt(out)
    if stored:
        return stored
    work_salt = Path(out) / WORK / "salt"
    if not rebuild and work_salt.is_file() and work_salt.read_text().strip():
        return work_salt.read_text().strip()
    salt = new_salt()
    atomic_write_text(work_salt, salt)
    return salt
