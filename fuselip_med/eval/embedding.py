"""The shared embedding pass: every unique input embedded once, in batches, images decoded in a DataLoader.

An input is an :class:`EmbedItem`: an image only, a text only, or an (image, text) pair embedded as one
fused sequence. Its ``key`` identifies it: two items with the same key are the same input and are embedded
once. Image keys come from the path (``str``/``PathLike``), or from a content hash for bytes, PIL images,
arrays and tensors; pass ``image_key=`` (e.g. the dataset's image id) to name an image yourself.

Batches are homogeneous (all image-only, all text-only or all pairs), so the model is called as
``encode(images=pixels)``, ``encode(texts=[...])`` or ``encode(images=pixels, texts=[...])``; a pair whose
text is ``""`` is still a fused sequence (the TGIT candidates, the reference's ``force_fused``). Embeddings
are L2-normalised float32 on the CPU.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fuselip_med.data.workers import usable_workers
from fuselip_med.progress import progress_bar

__all__ = ["EmbedItem", "EmbeddingTable", "Embedder", "embed_items", "image_key"]

log = logging.getLogger(__name__)


def image_key(source: Any) -> str:
    """A stable identity for an image input: its path, or a hash of its content."""
    if isinstance(source, (str, os.PathLike)):
        return "path:" + os.fspath(source)
    h = hashlib.sha1()
    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(bytes(source))
        return "bytes:" + h.hexdigest()
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().contiguous().numpy()
    if isinstance(source, np.ndarray):
        arr = np.ascontiguousarray(source)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
        return "array:" + h.hexdigest()
    if hasattr(source, "tobytes") and hasattr(source, "mode") and hasattr(source, "size"):  # PIL image
        h.update(f"{source.mode}{source.size}".encode())
        h.update(source.tobytes())
        return "pil:" + h.hexdigest()
    raise TypeError(f"cannot use a {type(source).__name__} as an image input; "
                    "give a path, encoded bytes, a PIL image, an array or a tensor")


def sample_image_key(sample, image) -> str:
    """The embedding key of one of a ``Sample``'s images: its path's key, else ``source:image_id`` (bytes,
    arrays and decoded images are keyed by the dataset's id)."""
    if isinstance(image, (str, os.PathLike)):
        return image_key(image)
    return f"{sample.source}:{sample.meta.get('image_id', sample.id)}"


@dataclass(frozen=True, eq=False)
class EmbedItem:
    """One model input: image only, text only, or an (image, text) pair (fused)."""

    image: Any = None
    text: str | None = None
    image_key: str | None = None   # computed from ``image`` when not given

    def __post_init__(self):
        if self.image is None and self.text is None:
            raise ValueError("an EmbedItem needs an image, a text or both")
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        if self.image is not None and self.image_key is None:
            object.__setattr__(self, "image_key", image_key(self.image))

    @property
    def kind(self) -> str:
        if self.image is None:
            return "text"
        return "image" if self.text is None else "pair"

    @property
    def key(self) -> tuple:
        kind = self.kind
        if kind == "text":
            return ("text", self.text)
        if kind == "image":
            return ("image", self.image_key)
        return ("pair", self.image_key, self.text)

    @classmethod
    def of_image(cls, image, key: str | None = None) -> EmbedItem:
        return cls(image=image, image_key=key)

    @classmethod
    def of_text(cls, text: str) -> EmbedItem:
        return cls(text=text)

    @classmethod
    def of_pair(cls, image, text: str, key: str | None = None) -> EmbedItem:
        return cls(image=image, text=text, image_key=key)


@dataclass
class EmbeddingTable:
    """Embeddings of unique inputs: row i of ``embeddings`` belongs to ``keys[i]``.

    ``failed`` maps the keys of inputs that could not be embedded (an image that did not decode) to the
    reason; they have no row.
    """

    keys: list[Hashable]
    embeddings: torch.Tensor  # (N, D) float32
    failed: dict[Hashable, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but embeddings of shape {tuple(self.embeddings.shape)}")
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise ValueError("EmbeddingTable keys must be unique")

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def index_of(self, keys: Iterable[Hashable]) -> torch.Tensor:
        """Row numbers of ``keys`` (KeyError naming the first missing key)."""
        try:
            return torch.tensor([self._index[k] for k in keys], dtype=torch.int64)
        except KeyError as e:
            raise KeyError(f"no embedding for {e.args[0]!r}") from None

    def lookup(self, keys: Iterable[Hashable]) -> torch.Tensor:
        """(len(keys), D) embeddings in the order of ``keys``; repeated keys give repeated rows."""
        return self.embeddings[self.index_of(keys)]

    def __getitem__(self, key: Hashable) -> torch.Tensor:
        return self.embeddings[self._index[key]]

    def extended(self, other: EmbeddingTable) -> EmbeddingTable:
        """A table with this table's rows followed by ``other``'s rows for keys not already here."""
        new = [i for i, k in enumerate(other.keys) if k not in self._index]
        if not new:
            failed = {**self.failed, **{k: v for k, v in other.failed.items() if k not in self._index}}
            return EmbeddingTable(list(self.keys), self.embeddings, failed)
        if len(self) and self.dim != other.dim:
            raise ValueError(f"cannot merge embeddings of dimension {self.dim} and {other.dim}")
        emb = other.embeddings[new] if not len(self) else torch.cat([self.embeddings, other.embeddings[new]])
        keys = list(self.keys) + [other.keys[i] for i in new]
        have = set(keys)
        failed = {k: v for k, v in {**self.failed, **other.failed}.items() if k not in have}
        return EmbeddingTable(keys, emb, failed)

    @classmethod
    def empty(cls, dim: int = 0) -> EmbeddingTable:
        return cls([], torch.empty((0, dim), dtype=torch.float32))


class _ImageDataset(Dataset):
    """Decodes the images of the given items; a decode failure yields its reason instead of pixels."""

    def __init__(self, sources: Sequence[Any], decode: Callable, skip_errors: tuple):
        self.sources, self.decode, self.skip_errors = sources, decode, skip_errors

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            px = self.decode(self.sources[i])
        except self.skip_errors as e:  # only decode errors: anything else is a bug and propagates
            return i, None, getattr(e, "reason", None) or str(e)
        if not isinstance(px, torch.Tensor):
            px = torch.as_tensor(np.asarray(px))
        return i, px.to(torch.float32), None


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


class Embedder:
    """Embeds inputs with ``model.encode`` and remembers them: a key is never embedded twice.

    ``decode``: callable image input -> (3, S, S) float tensor; default
    ``fuselip_med.data.images.decode_image`` with ``decode_options``. ``on_error``: "skip" records images
    that fail to decode in ``table.failed`` (reason) and leaves them out; "raise" re-raises.
    ``image_codes``: optional mapping image key -> precomputed TiTok code ids (LongTensor (128,)); images
    found there skip decoding and are passed to the model as ``image_ids``. ``shard``: under several processes
    (``torch.distributed``) each embeds every world-th new item and the rows are exchanged, so every process
    holds the whole table; all processes must then embed the same items in the same order.
    """

    def __init__(self, model, *, batch_size: int = 64, num_workers: int = 0, device=None,
                 decode: Callable | None = None, decode_options=None, on_error: str = "skip",
                 progress: bool = True, image_codes: dict[str, torch.Tensor] | None = None,
                 shard: bool = False):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.num_workers = usable_workers(num_workers)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self._decode = decode
        self._decode_options = decode_options
        self.on_error = on_error
        self.progress = progress
        self.image_codes = image_codes or {}
        self.shard = shard
        self.table = EmbeddingTable.empty()

    def fresh(self) -> Embedder:
        """An embedder with the same model and settings and an empty table."""
        new = Embedder.__new__(Embedder)
        new.__dict__.update(self.__dict__)
        new.table = EmbeddingTable.empty()
        return new

    @property
    def decode(self) -> Callable:
        if self._decode is None:
            from fuselip_med.data.images import DecodeOptions, decode_image

            self._decode = functools.partial(decode_image, options=self._decode_options or DecodeOptions())
        return self._decode

    def embed(self, items: Sequence[EmbedItem], desc: str = "embedding") -> EmbeddingTable:
        """Embed the items whose keys are new; returns the whole table (old and new rows)."""
        unique: dict[Hashable, EmbedItem] = {}
        for it in items:
            k = it.key
            if k not in self.table and k not in self.table.failed and k not in unique:
                unique[k] = it
        if not unique:
            return self.table
        new = _embed_unique(self, list(unique.values()), desc)
        self.table = self.table.extended(new)
        return self.table

    def embeddings(self, items: Sequence[EmbedItem], desc: str = "embedding") -> torch.Tensor:
        """(len(items), D) embeddings in item order (embedding whatever is new first)."""
        return self.embed(items, desc).lookup(it.key for it in items)

    def _call_model(self, images=None, texts=None, image_ids=None) -> torch.Tensor:
        given = {"images": images, "texts": texts, "image_ids": image_ids}
        out = self.model.encode(**{k: v for k, v in given.items() if v is not None})
        return torch.nn.functional.normalize(out.detach().to("cpu", torch.float32), dim=-1)

    def _batches(self, items: list[EmbedItem], failed: dict) -> Iterator[tuple[list[EmbedItem], torch.Tensor]]:
        """(items, embeddings) per homogeneous batch: texts, then cached codes, then decoded images."""
        b = self.batch_size
        texts = [it for it in items if it.kind == "text"]
        for a in range(0, len(texts), b):
            yield texts[a:a + b], self._call_model(texts=[it.text for it in texts[a:a + b]])
        with_image = [it for it in items if it.kind != "text"]
        for kind in ("image", "pair"):
            coded = [it for it in with_image if it.kind == kind and it.image_key in self.image_codes]
            for a in range(0, len(coded), b):
                batch = coded[a:a + b]
                ids = torch.stack([torch.as_tensor(self.image_codes[it.image_key]) for it in batch])
                yield batch, self._call_model(texts=[it.text for it in batch] if kind == "pair" else None,
                                              image_ids=ids.to(self.device))
        # image-only items first, then pairs, so that every batch is homogeneous
        to_decode = sorted((it for it in with_image if it.image_key not in self.image_codes),
                           key=lambda it: it.kind != "image")
        if to_decode:
            yield from self._decoded_batches(to_decode, failed)

    def _decoded_batches(self, items: list[EmbedItem], failed: dict) -> Iterator[tuple[list[EmbedItem], torch.Tensor]]:
        from fuselip_med.data.images import ImageDecodeError

        skip = (ImageDecodeError,) if self.on_error == "skip" else ()
        loader = DataLoader(_ImageDataset([it.image for it in items], self.decode, skip),
                            batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda")
        pending: list[tuple[EmbedItem, torch.Tensor]] = []

        def flush():
            group = [it for it, _ in pending]
            px = _to_device_batch([p for _, p in pending], self.device)
            texts = [it.text for it in group] if group[0].kind == "pair" else None
            pending.clear()
            return group, self._call_model(images=px, texts=texts)

        for positions, pixels, reasons in loader:
            for i, px, why in zip(positions, pixels, reasons):
                it = items[i]
                if px is None:
                    failed[it.key] = why
                    log.warning("skipping image %s: %s", it.image_key, why)
                    continue
                if pending and pending[0][0].kind != it.kind:
                    yield flush()
                pending.append((it, px))
                if len(pending) == self.batch_size:
                    yield flush()
        if pending:
            yield flush()


def _to_device_batch(pixels: list[torch.Tensor], device: torch.device):
    if all(p.shape == pixels[0].shape for p in pixels):
        return torch.stack(pixels).to(device, non_blocking=True)
    return [p.to(device) for p in pixels]


def _embed_unique(emb: Embedder, items: list[EmbedItem], desc: str) -> EmbeddingTable:
    if not emb.shard:
        return _embed_here(emb, items, desc)
    from fuselip_med.core.distributed import gather_objects, rank_and_world

    rank, world = rank_and_world()
    mine = _embed_here(emb, items[rank::world], desc)
    parts = gather_objects((mine.keys, mine.embeddings, mine.failed))
    keys = [key for part_keys, _, _ in parts for key in part_keys]
    failed = {key: why for _, _, part_failed in parts for key, why in part_failed.items()}
    embeddings = [part for _, part, _ in parts if part.numel()]
    return EmbeddingTable(keys, torch.cat(embeddings) if embeddings else mine.embeddings, failed)


def _embed_here(emb: Embedder, items: list[EmbedItem], desc: str) -> EmbeddingTable:
    keys: list[Hashable] = []
    chunks: list[torch.Tensor] = []
    failed: dict[Hashable, str] = {}
    model = emb.model
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad(), progress_bar(len(items), desc, enabled=emb.progress, transient=True) as bar:
            for batch, out in emb._batches(items, failed):
                keys.extend(it.key for it in batch)
                chunks.append(out)
                bar.set(len(keys) + len(failed))
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    emb_all = torch.cat(chunks) if chunks else torch.empty((0, emb.table.dim), dtype=torch.float32)
    return EmbeddingTable(keys, emb_all, failed)


def embed_items(model, items: Sequence[EmbedItem], *, batch_size: int = 64, num_workers: int = 0,
                device=None, decode: Callable | None = None, decode_options=None, on_error: str = "skip",
                progress: bool = True, image_codes: dict | None = None) -> EmbeddingTable:
    """Embed each unique item once; returns the :class:`EmbeddingTable` (look rows up by ``item.key``)."""
    return Embedder(model, batch_size=batch_size, num_workers=num_workers, device=device, decode=decode,
                    decode_options=decode_options, on_error=on_error, progress=progress,
                    image_codes=image_codes).embed(items)
