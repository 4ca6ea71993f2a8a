"""Decoded items -> ``Batch``: text ids, stacked pixels and cached image ids, has-image/has-codes masks.

Rows are the kept items in order; each side is a ``BatchSide``. Its image tensors hold only the rows that have
an image on that side (in row order): ``image_ids`` the rows whose codes came from the code cache
(``has_codes``), ``pixels`` the other image rows; one batch may mix both. ``SkippedSample`` items are dropped
and listed in ``Batch.skipped``; ``SkipCounter`` (a ``SkipReport``) names them in the main process.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Sequence

import torch

from fuselip_med.data.dataset import DecodedSample, SkippedSample
from fuselip_med.data.schema import Side
from fuselip_med.data.skips import SkipReport

DEFAULT_CONTEXT_LENGTH = 180


@dataclass
class BatchSide:
    """One side of a ``Batch``. Image tensors hold only the rows that have an image on this side, in row order."""

    text_ids: torch.Tensor                 # [B, L] int64
    has_image: torch.Tensor                # [B] bool
    pixels: torch.Tensor | None = None     # [Np, 3, S, S] float32: image rows without cached ids
    image_ids: torch.Tensor | None = None  # [Nc, 128] int64: image rows that came as cached code ids
    has_codes: torch.Tensor | None = None  # [B] bool: the rows behind image_ids (a subset of has_image)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BatchSide:
        """The same side with ``fn`` applied to every tensor."""
        return replace(self, **{f.name: fn(value) for f in fields(self)
                                if isinstance(value := getattr(self, f.name), torch.Tensor)})


@dataclass
class Batch:
    """A collated batch: both sides' tensors (``BatchSide``), and per row its sample id, hard-negative group key
    and source name (lists of length B); ``skipped`` names the rows dropped while decoding (id, reason)."""

    query: BatchSide
    target: BatchSide
    ids: list[str]
    groups: list[str]
    sources: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path or source/id, reason)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def side(self, name: Side) -> BatchSide:
        """The ``query`` or ``target`` side."""
        return self.query if name == "query" else self.target

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return replace(self, query=self.query.map_tensors(fn), target=self.target.map_tensors(fn))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())


def _stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"{what} in one batch have different shapes {sorted(shapes)}; use one image size "
                         f"(DecodeOptions.image_size) for every dataset of a mixture")
    return torch.stack(tensors)


def _flatten(items: Iterable[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def collate_samples(
    items: Sequence[DecodedSample | SkippedSample], tokenizer: Callable[[list[str]], torch.Tensor]
) -> Batch:
    """Build a Batch from dataset items (nested lists are flattened); a missing text becomes ""."""
    items = _flatten(items)
    rows = [item for item in items if isinstance(item, DecodedSample)]
    skipped = [(item.label, item.reason) for item in items if isinstance(item, SkippedSample)]
    length = getattr(tokenizer, "context_length", DEFAULT_CONTEXT_LENGTH)

    def side(name: Side) -> BatchSide:
        decoded = [row.side(name) for row in rows]
        if decoded:
            text_ids = tokenizer([item.text or "" for item in decoded])
        else:
            text_ids = torch.zeros((0, length), dtype=torch.long)
        has_codes = [item.image_ids is not None for item in decoded]
        with_codes = [item.image_ids for item in decoded if item.image_ids is not None]
        with_pixels = [item.pixels for item, coded in zip(decoded, has_codes) if item.pixels is not None and not coded]
        return BatchSide(
            text_ids=text_ids,
            has_image=torch.tensor([item.has_image for item in decoded], dtype=torch.bool),
            pixels=_stack(with_pixels, f"{name} images") if with_pixels else None,
            image_ids=_stack(with_codes, f"{name} image ids").long() if with_codes else None,
            has_codes=torch.tensor(has_codes, dtype=torch.bool),
        )

    return Batch(query=side("query"), target=side("target"), ids=[row.id for row in rows],
                 groups=[row.group for row in rows], sources=[row.source for row in rows], skipped=skipped,
                 meta=[row.meta for row in rows])


class Collator:
    """Picklable ``collate_fn`` for DataLoader workers: ``Collator(TextTokenizer())``."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[DecodedSample | SkippedSample]) -> Batch:
        return collate_samples(items, self.tokenizer)


class SkipCounter(SkipReport):
    """The trainer's ``SkipReport``: ``update(batch)`` names the batch's skipped items (``Batch.skipped``: file or
    source/id, reason) and counts its kept rows."""

    unit = "samples"

    def update(self, batch: Batch | Iterable[tuple[str, str]] | None = None, /, **_: int) -> None:
        if batch is None:  # Counter.__init__ calls update() with nothing
            return
        if isinstance(batch, Batch):
            self.kept += len(batch)
            skipped: Iterable[tuple[str, str]] = batch.skipped
        else:
            skipped = batch
        for label, reason in skipped:
            self.add(label, "batch", reason)
