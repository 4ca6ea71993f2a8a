"""The one content hash: SHA-256 (FIPS 180-4) of an image's content or of a text, as hex.

Every place that names an input by what it holds uses these two functions: the inference engine's image keys
(``inference.items.image_key``), the search index's ``content_hash`` column and its caption rows, the training
code cache's row keys (``data.token_cache.row_key``), the leakage check and the salted file keys of
``data.phi``. Indexes and code caches store these digests on disk, so the algorithm and the byte layout hashed
below are part of their formats: change them and those stores no longer match their inputs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

__all__ = ["content_hash", "text_hash"]

_BLOCK = 1 << 20  # files are hashed in 1 MiB reads


def content_hash(image: Any, file_memo: dict[str, list] | None = None) -> str:
    """SHA-256 (64 hex digits) of an image's content.

    ``image``: a path (the file's bytes), encoded bytes (the bytes), a PIL image (``pil:<mode>:<size>`` then
    its pixel bytes), or an array/tensor (``array:<dtype>:<shape>`` then its C-ordered bytes): the same pixels
    in another dtype or shape hash differently. A path and its file's bytes hash alike. ``file_memo``
    ({absolute path: [size, mtime_ns, hash]}) skips re-reading files whose size and mtime are unchanged.
    Raises ``OSError`` for an unreadable file.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(image))
        stat = os.stat(path)
        known = None if file_memo is None else file_memo.get(path)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
        if file_memo is not None:
            file_memo[path] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        return digest.hexdigest()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest()
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().contiguous().numpy()
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL image
        head = f"pil:{image.mode}:{image.size}".encode()
        return hashlib.sha256(head + image.tobytes()).hexdigest()
    array = np.ascontiguousarray(image)
    head = f"array:{array.dtype.str}:{array.shape}".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()


def text_hash(text: str) -> str:
    """SHA-256 (64 hex digits) of a text's UTF-8 bytes (lone surrogates kept, ``surrogatepass``): the key of a
    caption's vector in a search index."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
