"""The embedding pass: every unique input embedded once, in homogeneous batches, images decoded by the data
layer's ``SampleDataset`` in DataLoader workers.

Batches are homogeneous (all text-only, all image-only or all pairs), so the model is called as
``encode(texts=[...])``, ``encode(images=pixels)`` or ``encode(images=pixels, texts=[...])`` (FuseLIP, the
late-fusion baselines and the ONNX runtime share this surface); images with precomputed TiTok codes are passed
as ``image_ids``. Embeddings are L2-normalised float32 on the CPU (FuseLIP paper Sec. 3: cosine similarity).

Decoding is training's: each image becomes the query side of a one-sided ``Sample`` and ``SampleDataset``
decodes it (``data.images.decode_image`` with ``decode_options``, or the caller's ``decode``); an image that
does not decode comes back as a ``SkippedSample`` with the same reason a training or evaluation skip report
gives, and is recorded in ``EmbeddingTable.failed`` (or raised, with ``on_error="raise"``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from fuselip_med.data.workers import usable_workers
from fuselip_med.errors import InputError
from fuselip_med.inference.items import EmbedItem
from fuselip_med.inference.table import EmbeddingTable
from fuselip_med.progress import progress_bar

__all__ = ["Embedder", "NonFiniteEmbeddingError", "decoded_images", "embed_items"]

log = logging.getLogger(__name__)


class _Images:
    """Image inputs as a SampleSource: image ``i`` is the query side of sample ``str(i)``."""

    name = "inference"

    def __init__(self, images: Sequence[Any]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from fuselip_med.data.schema import Sample, SampleSide

        return Sample(id=str(index), source=self.name, query=SampleSide(image=self.images[index]))


def _collate(decoded: list) -> tuple[list[int], list[torch.Tensor | None], list]:
    """``SampleDataset`` items -> (positions, query pixels or None, ``SkippedSample`` or None)."""
    from fuselip_med.data.dataset import SkippedSample

    positions, pixels, skipped = [], [], []
    for item in decoded:
        positions.append(int(item.id))
        bad = isinstance(item, SkippedSample)
        pixels.append(None if bad else item.query.pixels)
        skipped.append(item if bad else None)
    return positions, pixels, skipped


def decoded_images(images: Sequence[Any], *, batch_size: int = 64, num_workers: int = 0, decode_options=None,
                   decode: Callable | None = None, pin_memory: bool = False) -> Iterator[tuple[int, Any, Any]]:
    """``(position, pixels, skipped)`` per image, in input order: ``pixels`` ``[3, S, S]`` float32 (None when the
    image was skipped), ``skipped`` the data layer's ``SkippedSample`` (reason, detail, ``error``) or None.

    Images are decoded by ``data.dataset.SampleDataset`` (query side only) in ``num_workers`` DataLoader workers,
    ``batch_size`` at a time: ``data.images.decode_image`` with ``decode_options`` (default ``DecodeOptions()``),
    or ``decode`` (a callable image -> pixels raising ``ImageDecodeError`` for a bad image). Other exceptions
    are bugs and propagate."""
    from fuselip_med.data.dataset import SampleDataset
    from fuselip_med.data.images import DecodeOptions

    dataset = SampleDataset(_Images(images), decode_options or DecodeOptions(), sides=("query",), decoder=decode)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=usable_workers(num_workers),
                        collate_fn=_collate, pin_memory=pin_memory)
    for positions, pixels, skipped in loader:
        yield from zip(positions, pixels, skipped)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


class NonFiniteEmbeddingError(InputError):
    """The model returned a NaN or infinite embedding (a diverged or damaged checkpoint): every metric, index and
    file built on it would be meaningless (scikit-learn's metrics refuse NaN scores), so embedding stops."""


class Embedder:
    """Embeds inputs with ``model.encode`` and remembers them: a key is never embedded twice.

    ``decode``: a callable image input -> ``[3, S, S]`` float tensor that replaces the data layer's
    ``decode_image`` with ``decode_options`` (an evaluation's own preprocessing; it signals a bad image by
    raising ``ImageDecodeError``). ``on_error``: ``"skip"`` records images that fail to decode in
    ``table.failed`` (their reason) and leaves them out; ``"raise"`` raises the ``ImageDecodeError``.
    ``warn_skips``: log each skipped image as a warning (keyed by its content hash); ``False`` when the caller
    names the failures itself from ``table.failed`` (a skip summary and skipped.csv), which logs them at debug.
    ``image_codes``: optional mapping image key -> precomputed TiTok code ids (``[128]`` int64); images found
    there skip decoding and are passed to the model as ``image_ids``. ``shard``: under several processes
    (``torch.distributed``) each embeds every world-th new item and the rows are exchanged, so every process
    holds the whole table; all processes must then embed the same items in the same order. Raises
    ``ValueError`` for an unknown ``on_error`` or a ``batch_size`` below 1; embedding raises
    :class:`NonFiniteEmbeddingError` when the model returns a NaN or infinite embedding.
    """

    def __init__(self, model, *, batch_size: int = 64, num_workers: int = 0, device=None,
                 decode: Callable | None = None, decode_options=None, on_error: str = "skip",
                 progress: bool = True, image_codes: dict[str, torch.Tensor] | None = None,
                 shard: bool = False, warn_skips: bool = True):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.num_workers = usable_workers(num_workers)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.decode = decode
        self.decode_options = decode_options
        self.on_error = on_error
        self.progress = progress
        self.image_codes = image_codes or {}
        self.shard = shard
        self.warn_skips = warn_skips
        self.table = EmbeddingTable.empty()

    def fresh(self) -> Embedder:
        """An embedder with the same model and settings and an empty table."""
        new = Embedder.__new__(Embedder)
        new.__dict__.update(self.__dict__)
        new.table = EmbeddingTable.empty()
        return new

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
        """``[len(items), D]`` float32 embeddings in item order (embedding whatever is new first)."""
        return self.embed(items, desc).lookup(it.key for it in items)

    def _call_model(self, images=None, texts=None, image_ids=None) -> torch.Tensor:
        given = {"images": images, "texts": texts, "image_ids": image_ids}
        out = self.model.encode(**{k: v for k, v in given.items() if v is not None})
        out = out.detach().to("cpu", torch.float32)
        bad = int((~torch.isfinite(out).all(dim=-1)).sum())
        if bad:
            kind = "texts" if images is None and image_ids is None else "images"
            raise NonFiniteEmbeddingError(
                f"the model gave NaN or infinite embeddings for {bad} of {len(out)} {kind} in a batch: its weights "
                "are probably diverged or damaged: evaluate an earlier checkpoint step")
        return torch.nn.functional.normalize(out, dim=-1)

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

        pending: list[tuple[EmbedItem, torch.Tensor]] = []

        def flush():
            group = [it for it, _ in pending]
            px = _to_device_batch([p for _, p in pending], self.device)
            texts = [it.text for it in group] if group[0].kind == "pair" else None
            pending.clear()
            return group, self._call_model(images=px, texts=texts)

        for i, px, skip in decoded_images([it.image for it in items], batch_size=self.batch_size,
                                          num_workers=self.num_workers, decode_options=self.decode_options,
                                          decode=self.decode, pin_memory=self.device.type == "cuda"):
            it = items[i]
            if skip is not None:
                if self.on_error == "raise":
                    raise skip.error or ImageDecodeError(skip.reason, str(it.image_key), skip.detail)
                failed[it.key] = skip.reason
                log.log(logging.WARNING if self.warn_skips else logging.DEBUG, "skipping image %s: %s",
                        it.image_key, skip.reason)
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
                progress: bool = True, image_codes: dict | None = None, warn_skips: bool = True) -> EmbeddingTable:
    """Embed each unique item once; returns the :class:`EmbeddingTable` (look rows up by ``item.key``).

    Arguments as :class:`Embedder`'s; raises ``ImageDecodeError`` with ``on_error="raise"``."""
    return Embedder(model, batch_size=batch_size, num_workers=num_workers, device=device, decode=decode,
                    decode_options=decode_options, on_error=on_error, progress=progress,
                    image_codes=image_codes, warn_skips=warn_skips).embed(items)
