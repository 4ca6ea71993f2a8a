"""Cached TiTok codes of training images: K seeded augmented views and the plain view of every image.

The image tokenizer is frozen, so the codes of an image's view are known once computed. A cache stores, per
image, the codes of ``K`` random resized crops (the training augmentation, each drawn from a generator seeded
by the image's content hash and the view number) and of the plain resized view (view ``K``). Training then
draws a view per (seed, epoch, sample) and reads its 128 ids instead of decoding pixels and running TiTok.

A cache is a directory (one per K):

    codes.u16     uint16 rows of shape [K + 1, 128], read through a memory map ([N, K + 1, 128])
    index.jsonl   a header line {"version", "views", "tokens"}, then one line per committed chunk
                  {"start": first row, "keys": [...], "crc": [crc32 of each row]}
    files.json    {absolute path: [size, mtime_ns, content hash]}: saves re-hashing unchanged files

A row's key is ``<content hash>|<preprocessing+tokenizer fingerprint>`` (``row_key``): an edited image (new
content hash), another image size, window, crop range or tokenizer gives new keys, so exactly the entries
they touch are tokenized again while the others are reused. Writes append (codes first, then the journal
line), so a build killed at any point resumes from its last committed chunk: a torn journal line and code
bytes past the last committed row are dropped on open. Every open checks each row's CRC-32; damaged rows
or an unreadable journal are reported in one line and rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch

from fuselip_med.data.images import DecodeOptions, ImagePreprocess, decode_image
from fuselip_med.data.workers import usable_workers
from fuselip_med.io import atomic_write_json

CACHE_VERSION = 1
CODES_FILE = "codes.u16"
INDEX_FILE = "index.jsonl"
FILES_FILE = "files.json"
PARTS_DIR = "parts"
VIEW_SCHEME = "sha256(content hash:view) -> torch.Generator"


@dataclass(frozen=True)
class ViewSpec:
    """How the cached views are made: decoding, number of augmented views ``views`` (K) and tokenizer.

    The crop range is the training augmentation's (``ImagePreprocess``'s RandomResizedCrop scale and ratio,
    paper App. B); ``tokenizer_id`` names the frozen TiTok and its weights (``titok_fingerprint``).
    """

    decode: DecodeOptions
    views: int
    tokenizer_id: str

    def fingerprint(self) -> str:
        """A short hash of everything but K that changes the codes of a view (12 hex digits): decode
        options, crop range, tokenizer id and the view-seeding scheme."""
        crop = ImagePreprocess(train=True)
        fields = {"decode": dataclasses.asdict(self.decode), "scale": crop.scale, "ratio": crop.ratio,
                  "tokenizer": self.tokenizer_id, "scheme": VIEW_SCHEME}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def row_key(content_hash: str, spec: ViewSpec) -> str:
    """The cache key of one image's row: content hash and preprocessing/tokenizer fingerprint."""
    return f"{content_hash}|{spec.fingerprint()}"


def titok_fingerprint(name: str, tokenizer: torch.nn.Module) -> str:
    """``name@<sha256 of the weights, 12 hex digits>``: two tokenizers with equal ids give equal codes."""
    digest = hashlib.sha256()
    for key, value in sorted(tokenizer.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return f"{name}@{digest.hexdigest()[:12]}"


def view_generator(content: str, view: int) -> torch.Generator:
    """The crop generator of augmented view ``view`` of the image whose content hash is ``content``."""
    seed = int(hashlib.sha256(f"{content}:{view}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(seed)


def decode_view(image: Any, decode: DecodeOptions, content: str, view: int, views: int) -> torch.Tensor:
    """float32 ``[3, S, S]`` pixels of view ``view``: a seeded random resized crop for ``view < views``, the
    plain resize for ``view == views``. The cache build and the on-the-fly ``pixel_views`` mode both call
    this, so their codes agree. Raises ``ImageDecodeError`` for bad images."""
    if view == views:
        return decode_image(image, decode, train=False)
    return decode_image(image, decode, train=True, generator=view_generator(content, view))


def draw_view(seed: int, epoch: int, index: int, side: int, views: int) -> int:
    """The augmented view (in ``[0, views)``) a training sample uses in an epoch: a function of (seed, epoch,
    sample index, side) only, so workers, processes and resumed runs agree."""
    mask = (1 << 64) - 1
    rng = np.random.default_rng([seed & mask, epoch & mask, index & mask, side])
    return int(rng.integers(views))


class CacheDamaged(Exception):
    """Internal: a journal or codes file that cannot be read; the cache is rebuilt from scratch."""


class CodeCache:
    """One cache directory (module docstring). Picklable: DataLoader workers reopen the memory map.

    ``writable`` caches repair themselves on open (truncate torn tails, rewrite a damaged cache) and accept
    ``append``; read-only ones (other processes) only ignore what is damaged. ``say`` gets one-line reports.
    """

    def __init__(self, directory: str | os.PathLike[str], views: int, tokens: int = 128, *, writable: bool = True,
                 say: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.views = views
        self.tokens = tokens
        self.writable = writable
        self.rows: dict[str, int] = {}
        self.count = 0  # rows in the codes file (including superseded or damaged ones)
        self._codes: np.ndarray | None = None
        try:
            self._open(say)
        except CacheDamaged as damage:
            say(f"code cache {self.directory}: {damage}; rebuilding it.")
            if not writable:
                self.rows, self.count = {}, 0
                return
            for name in (CODES_FILE, INDEX_FILE):
                (self.directory / name).unlink(missing_ok=True)
            self.rows, self.count = {}, 0
            self._open(say)

    @property
    def row_bytes(self) -> int:
        return (self.views + 1) * self.tokens * 2

    def _open(self, say: Callable[[str], None]) -> None:
        index, codes = self.directory / INDEX_FILE, self.directory / CODES_FILE
        if not index.exists():
            if self.writable:
                self.directory.mkdir(parents=True, exist_ok=True)
                header = {"version": CACHE_VERSION, "views": self.views, "tokens": self.tokens}
                index.write_text(json.dumps(header) + "\n", encoding="utf-8")
                codes.write_bytes(b"")
            return
        raw = index.read_bytes()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
        except (ValueError, UnicodeDecodeError):
            raise CacheDamaged(f"{INDEX_FILE} has no readable header") from None
        if header != {"version": CACHE_VERSION, "views": self.views, "tokens": self.tokens}:
            raise CacheDamaged(f"it holds {header.get('views')} views of {header.get('tokens')} codes "
                               f"(version {header.get('version')}), not {self.views} of {self.tokens}")
        if not codes.exists():
            raise CacheDamaged(f"{CODES_FILE} is missing")
        available = codes.stat().st_size // self.row_bytes
        chunks, committed = [], len(lines[0]) + 1
        for line in lines[1:]:
            try:
                chunk = json.loads(line)
                if chunk["start"] != self.count or len(chunk["keys"]) != len(chunk["crc"]):
                    raise CacheDamaged(f"{INDEX_FILE} chunks are out of order")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                break  # a torn last line: the chunk was never committed
            if chunk["start"] + len(chunk["keys"]) > available:
                say(f"code cache {self.directory}: {CODES_FILE} is shorter than its index; re-tokenizing the rest.")
                break
            chunks.append(chunk)
            self.count += len(chunk["keys"])
            committed += len(line) + 1
        if self.writable:
            if committed < len(raw):
                with open(index, "r+b") as handle:
                    handle.truncate(committed)
            if codes.stat().st_size != self.count * self.row_bytes:
                with open(codes, "r+b") as handle:
                    handle.truncate(self.count * self.row_bytes)
        expected: dict[str, tuple[int, int]] = {}
        for chunk in chunks:
            for offset, (key, crc) in enumerate(zip(chunk["keys"], chunk["crc"])):
                expected[key] = (chunk["start"] + offset, crc)
        data = self.codes
        damaged = 0
        for key, (row, crc) in expected.items():
            if zlib.crc32(data[row].tobytes()) == crc:
                self.rows[key] = row
            else:
                damaged += 1
        if damaged:
            say(f"code cache {self.directory}: {damaged} row(s) failed their checksum; they will be re-tokenized.")

    @property
    def codes(self) -> np.ndarray:
        """uint16 ``[count, K + 1, 128]`` memory map of every row in the file."""
        if self._codes is None or self._codes.shape[0] != self.count:
            if self.count == 0:
                self._codes = np.zeros((0, self.views + 1, self.tokens), dtype=np.uint16)
            else:
                self._codes = np.memmap(self.directory / CODES_FILE, dtype=np.uint16, mode="r",
                                        shape=(self.count, self.views + 1, self.tokens))
        return self._codes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_codes": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def append(self, keys: list[str], codes: np.ndarray) -> None:
        """Commit rows ``codes`` (``[n, K + 1, 128]``, ids < 65536) under ``keys``: code bytes first (fsynced),
        then the journal line, so a kill in between leaves only bytes that the next open drops."""
        if not self.writable:
            raise RuntimeError(f"code cache {self.directory} was opened read-only")
        if codes.shape != (len(keys), self.views + 1, self.tokens):
            raise ValueError(f"codes of shape {codes.shape} for {len(keys)} keys; expected "
                             f"({len(keys)}, {self.views + 1}, {self.tokens})")
        if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
            raise ValueError("code ids do not fit uint16 (a TiTok codebook of more than 65,536 entries)")
        rows = np.ascontiguousarray(codes, dtype=np.uint16)
        with open(self.directory / CODES_FILE, "ab") as handle:
            handle.write(rows.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        chunk = {"start": self.count, "keys": list(keys), "crc": [zlib.crc32(row.tobytes()) for row in rows]}
        with open(self.directory / INDEX_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(chunk) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for offset, key in enumerate(keys):
            self.rows[key] = self.count + offset
        self.count += len(keys)

    def get(self, key: str, view: int) -> torch.Tensor | None:
        """The 128 code ids (int64 ``[128]``) of one view of a cached image, or None when it is not cached."""
        row = self.rows.get(key)
        if row is None:
            return None
        return torch.from_numpy(self.codes[row, view].astype(np.int64))

    def merge(self, other: CodeCache, chunk: int = 1024) -> int:
        """Append the rows of ``other`` (same K) that this cache lacks; returns how many were added."""
        keys = [key for key, _ in sorted(other.rows.items(), key=lambda item: item[1]) if key not in self.rows]
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            self.append(part, np.asarray(other.codes[[other.rows[key] for key in part]]))
        return len(keys)


def load_file_memo(directory: Path) -> dict[str, list]:
    """The cache's {path: [size, mtime_ns, hash]} memo ({} when absent or unreadable)."""
    try:
        memo = json.loads((directory / FILES_FILE).read_text(encoding="utf-8"))
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def save_file_memo(directory: Path, memo: dict[str, list]) -> None:
    """Write the memo atomically (temp file + rename), keeping the entries another writer added meanwhile."""
    atomic_write_json(directory / FILES_FILE, {**load_file_memo(directory), **memo}, indent=None)


class SampleImage(NamedTuple):
    """A reference to one side's image of a source's sample, loaded where it is decoded (a worker)."""

    source: Any
    index: int
    side: str

    def load(self) -> Any:
        return self.source[self.index].side(self.side).image


class _ViewImages(torch.utils.data.Dataset):
    """Decodes the K + 1 views of each image to tokenize (in DataLoader workers)."""

    def __init__(self, items: list[tuple[str, str, Any]], spec: ViewSpec):
        self.items, self.spec = items, spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        key, content, image = self.items[index]
        try:
            image = image.load() if isinstance(image, SampleImage) else image
            spec = self.spec
            views = [decode_view(image, spec.decode, content, v, spec.views) for v in range(spec.views + 1)]
        except Exception as error:  # noqa: BLE001 - a bad image is reported and left uncached, never fatal
            return key, None, f"{type(error).__name__}: {error}"
        return key, torch.stack(views), ""


def tokenize_views(
    cache: CodeCache,
    items: Iterable[tuple[str, str, Any]],
    spec: ViewSpec,
    tokenize: Callable[[torch.Tensor], torch.Tensor],
    *,
    images_per_batch: int = 16,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[str, str]]:
    """Tokenize the views of ``items`` ((key, content hash, image or ``SampleImage``)) missing from ``cache``
    and append them, one committed chunk per batch. ``tokenize`` maps pixels ``[n, 3, S, S]`` to code ids ``[n, 128]``.
    Returns (key, reason) of images that could not be decoded (not cached)."""
    todo = [item for item in items if item[0] not in cache]
    loader = torch.utils.data.DataLoader(_ViewImages(todo, spec), batch_size=images_per_batch, collate_fn=list,
                                         num_workers=usable_workers(num_workers, "data.num_workers"))
    failed: list[tuple[str, str]] = []
    for batch in loader:
        good = [(key, views) for key, views, _ in batch if views is not None]
        failed += [(key, reason) for key, views, reason in batch if views is None]
        if good:
            with torch.inference_mode():
                ids = tokenize(torch.cat([views for _, views in good])).cpu().numpy()
            cache.append([key for key, _ in good], ids.reshape(len(good), spec.views + 1, -1))
        if on_batch is not None:
            on_batch(len(batch))
    return failed


def merge_parts(cache: CodeCache, say: Callable[[str], None] = print) -> int:
    """Fold every process's part cache (``parts/rank*``) into ``cache`` and delete the parts."""
    parts_dir = cache.directory / PARTS_DIR
    added = 0
    if parts_dir.is_dir():
        for part_dir in sorted(parts_dir.iterdir()):
            part = CodeCache(part_dir, cache.views, cache.tokens, say=say)
            added += cache.merge(part)
            shutil.rmtree(part_dir)
        shutil.rmtree(parts_dir, ignore_errors=True)
    return added
