"""Precomputed TiTok code ids for untransformed (eval) images.

The image tokenizer is frozen, so an eval image always maps to the same 128 ids: compute them once and
serve them from disk instead of decoding and encoding the image every evaluation. A cache is a directory:

    codes.npy    (N, T) int16 (or int32) array, read through a memory map
    index.json   {"version": 1, "num_tokens": T, "rows": {key: row}, "meta": {...}}

A key names the image *and* how it was decoded (``image_key``): the absolute path for files, a SHA-1 of
the bytes for encoded bytes, else a caller-given fallback (source/id#side), plus a hash of the
DecodeOptions. Absolute paths make a cache specific to one machine's data location; rebuild it elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from fuselip_med.data.dataset import SampleDataset
    from fuselip_med.data.images import DecodeOptions

CODES_FILE = "codes.npy"
INDEX_FILE = "index.json"


@functools.lru_cache(maxsize=64)
def options_hash(options: DecodeOptions) -> str:
    """A short stable hash of decode options (image size, resize mode, window, frame)."""
    fields = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {"repr": repr(options)}
    text = json.dumps(fields, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def image_key(image: Any, options: DecodeOptions, fallback: str) -> str:
    """The cache key of one image decoded with ``options``; ``fallback`` names in-memory images."""
    if isinstance(image, (str, os.PathLike)):
        ident = "path:" + os.path.abspath(os.fspath(image))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        ident = "sha1:" + hashlib.sha1(image).hexdigest()
    else:
        ident = "item:" + fallback
    return f"{ident}|{options_hash(options)}"


class TokenCache:
    """Read side of a cache directory; picklable (each process opens its own memory map)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"no token cache at {self.path} (missing {INDEX_FILE}); build it with "
                                    f"TokenCache.build or build_token_cache")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        self.rows: dict[str, int] = index["rows"]
        self.num_tokens: int = int(index["num_tokens"])
        self.meta: dict[str, Any] = index.get("meta", {})
        self._codes: np.ndarray | None = None

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:
            self._codes = np.load(self.path / CODES_FILE, mmap_mode="r")
        return self._codes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_codes": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def get(self, keys: Sequence[str]) -> torch.Tensor | None:
        """(len(keys), T) LongTensor, or None when any key is missing."""
        rows = [self.rows.get(key) for key in keys]
        if any(row is None for row in rows):
            return None
        if not rows:
            return torch.zeros((0, self.num_tokens), dtype=torch.long)
        return torch.from_numpy(np.asarray(self.codes[rows], dtype=np.int64))

    def get_one(self, key: str | None) -> torch.Tensor | None:
        """(T,) LongTensor of one image, or None when it is not cached."""
        row = self.rows.get(key) if key is not None else None
        if row is None:
            return None
        return torch.from_numpy(np.asarray(self.codes[row], dtype=np.int64))

    @classmethod
    def build(
        cls,
        path: str | os.PathLike[str],
        keys: Sequence[str],
        pixel_batches: Iterable[torch.Tensor],
        tokenizer_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        dtype: Any = np.int16,
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> TokenCache:
        """Encode ``pixel_batches`` ((b, 3, S, S) tensors whose rows follow ``keys`` in order) with
        ``tokenizer_fn`` (pixels -> (b, T) ids) and write the cache atomically (temp dir, then rename).
        A key seen twice keeps its first row; its later images are not encoded."""
        keys = list(keys)

        def batches() -> Iterator[tuple[list[str], torch.Tensor]]:
            position = 0
            for pixels in pixel_batches:
                count = len(pixels)
                if position + count > len(keys):
                    raise ValueError(f"pixel batches hold more images than the {len(keys)} keys given")
                yield keys[position:position + count], pixels
                position += count
            if position != len(keys):
                raise ValueError(f"pixel batches hold {position} images but {len(keys)} keys were given")

        return cls._write(path, batches(), tokenizer_fn, dtype=dtype, meta=meta, overwrite=overwrite)

    @classmethod
    def _write(
        cls,
        path: str | os.PathLike[str],
        batches: Iterable[tuple[list[str], torch.Tensor]],
        tokenizer_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        dtype: Any,
        meta: dict[str, Any] | None,
        overwrite: bool,
    ) -> TokenCache:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"token cache {path} already exists; pass overwrite=True to replace it")
        limit = np.iinfo(dtype).max
        rows: dict[str, int] = {}
        chunks: list[np.ndarray] = []
        num_tokens: int | None = None
        for batch_keys, pixels in batches:
            fresh, seen = [], set()
            for i, key in enumerate(batch_keys):
                if key not in rows and key not in seen:
                    seen.add(key)
                    fresh.append(i)
            if not fresh:
                continue
            if len(fresh) < len(batch_keys):
                pixels = pixels[fresh]
            with torch.inference_mode():
                ids = torch.as_tensor(tokenizer_fn(pixels)).detach().cpu()
            if ids.ndim != 2 or ids.shape[0] != len(fresh):
                raise ValueError(f"tokenizer_fn returned shape {tuple(ids.shape)} for {len(fresh)} images; "
                                 f"expected ({len(fresh)}, T)")
            if num_tokens is None:
                num_tokens = int(ids.shape[1])
            elif ids.shape[1] != num_tokens:
                raise ValueError(f"tokenizer_fn returned {ids.shape[1]} ids per image, earlier {num_tokens}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > limit):
                raise ValueError(f"code ids in [{int(ids.min())}, {int(ids.max())}] do not fit "
                                 f"{np.dtype(dtype).name}; pass dtype=np.int32")
            for i in fresh:
                rows[batch_keys[i]] = len(rows)
            chunks.append(ids.numpy().astype(dtype))
        num_tokens = 128 if num_tokens is None else num_tokens
        codes = np.concatenate(chunks) if chunks else np.zeros((0, num_tokens), dtype=dtype)

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            np.save(tmp / CODES_FILE, codes)
            index = {"version": 1, "num_tokens": num_tokens, "rows": rows, "meta": meta or {}}
            (tmp / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "cache")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)


def build_token_cache(
    dataset: SampleDataset,
    path: str | os.PathLike[str],
    tokenizer_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: Any = np.int16,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> TokenCache:
    """Cache every image of an eval-mode SampleDataset (both sides; bad images are left out) under the
    keys the dataset looks up, so ``SampleDataset(..., token_cache=TokenCache(path))`` finds them."""
    if dataset.train or dataset.token_cache is not None:
        raise ValueError("build_token_cache needs an eval-mode dataset (train=False) without a token cache")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=list, num_workers=num_workers)

    def batches() -> Iterator[tuple[list[str], torch.Tensor]]:
        keys: list[str] = []
        pixels: list[torch.Tensor] = []
        for items in loader:
            for item in items:
                for side in ("query", "target"):
                    key, image = getattr(item, f"{side}_image_key", None), getattr(item, f"{side}_pixels", None)
                    if key is not None and image is not None:
                        keys.append(key)
                        pixels.append(image)
                if len(keys) >= batch_size:
                    yield keys, torch.stack(pixels)
                    keys, pixels = [], []
        if keys:
            yield keys, torch.stack(pixels)

    return TokenCache._write(path, batches(), tokenizer_fn, dtype=dtype, meta=meta, overwrite=overwrite)
