"""Decoded items -> ``Batch``: text ids, stacked pixels and cached image ids, has-image/has-codes masks.

Rows are the kept items in order. Image tensors hold only the rows that have an image on that side (in
row order): ``*_image_ids`` the rows whose codes came from the code cache (``*_has_codes``), ``*_pixels``
the other image rows; one batch may mix both. ``SkippedSample`` items are dropped and listed in
``Batch.skipped``; ``SkipCounter`` (a ``SkipReport``) names them in the main process.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Sequence

import torch

from fuselip_med.data.dataset import SIDES, DecodedSample, SkippedSample
from fuselip_med.data.skips import SkipReport

DEFAULT_CONTEXT_LENGTH = 180


@dataclass
class Batch:
    query_text_ids: torch.Tensor                 # (B, L) long
    target_text_ids: torch.Tensor                # (B, L) long
    query_pixels: torch.Tensor | None            # (Np, 3, S, S) float: rows with a query image and no cached ids
    query_has_image: torch.Tensor                # (B,) bool
    target_pixels: torch.Tensor | None           # (Nt, 3, S, S) float
    target_has_image: torch.Tensor               # (B,) bool
    ids: list[str]
    groups: list[str]
    sources: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path or source/id, reason)
    query_image_ids: torch.Tensor | None = None  # (Nc, 128) long: rows whose image came as cached code ids
    target_image_ids: torch.Tensor | None = None
    query_has_codes: torch.Tensor | None = None  # (B,) bool: the rows behind query_image_ids (a subset of has_image)
    target_has_codes: torch.Tensor | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        changes = {f.name: fn(value) for f in fields(self)
                   if isinstance(value := getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
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

    def texts(side: str) -> torch.Tensor:
        if not rows:
            return torch.zeros((0, length), dtype=torch.long)
        return tokenizer([getattr(row, f"{side}_text") or "" for row in rows])

    images: dict[str, Any] = {}
    for side in SIDES:
        cached = [getattr(row, f"{side}_image_ids") for row in rows]
        pixels = [getattr(row, f"{side}_pixels") for row in rows]
        has_codes = [ids is not None for ids in cached]
        images[f"{side}_has_image"] = torch.tensor([row.has_image(side) for row in rows], dtype=torch.bool)
        images[f"{side}_has_codes"] = torch.tensor(has_codes, dtype=torch.bool)
        with_codes = [ids for ids in cached if ids is not None]
        with_pixels = [p for p, coded in zip(pixels, has_codes) if p is not None and not coded]
        images[f"{side}_image_ids"] = _stack(with_codes, f"{side} image ids").long() if with_codes else None
        images[f"{side}_pixels"] = _stack(with_pixels, f"{side} images") if with_pixels else None

    return Batch(
        query_text_ids=texts("query"),
        target_text_ids=texts("target"),
        ids=[row.id for row in rows],
        groups=[row.group for row in rows],
        sources=[row.source for row in rows],
        skipped=skipped,
        meta=[row.meta for row in rows],
        **images,
    )


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
