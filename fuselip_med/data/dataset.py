"""Map-style datasets that turn a SampleSource's cheap ``Sample``s into decoded, batch-ready items.

``SampleDataset.__getitem__`` runs in DataLoader workers: it decodes the image sides to (3, S, S) tensors
(or, with ``ImageViews``, serves one of K cached views as TiTok code ids) and returns a ``DecodedSample``.
Bad data never raises here: it comes back as a ``SkippedSample`` with a short reason, the collator drops
it and lists it in ``Batch.skipped``, and a ``SkipCounter`` in the main process tallies them. ``strict=True``
raises instead.

Training crops are drawn from a generator seeded by (seed, epoch, index), so a run is reproducible whatever
the number of workers and the order in which they fetch items.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fuselip_med.data.images import DecodeOptions, ImageDecodeError, decode_image
from fuselip_med.data.schema import SIDES, Sample, Side
from fuselip_med.data.token_cache import CodeCache, ViewSpec, decode_view, draw_view

if TYPE_CHECKING:
    from fuselip_med.data.adapters import SampleSource



@dataclass
class DecodedSide:
    """One decoded side: ``text`` (None = absent), ``pixels`` ``[3, S, S]`` float32 in [0, 1] or, from the code
    cache, ``image_ids`` ``[128]`` int64 TiTok codes in place of pixels (at most one of the two)."""

    text: str | None
    pixels: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None

    @property
    def has_image(self) -> bool:
        return self.pixels is not None or self.image_ids is not None


@dataclass
class DecodedSample:
    """One item ready for the collator: texts as str (None = absent), images as (3, S, S) float tensors.

    With a code cache, an image side may come as its 128 TiTok ids (``DecodedSide.image_ids``, int64) instead of pixels.
    """

    id: str
    source: str
    group: str
    query: DecodedSide
    target: DecodedSide
    meta: dict[str, Any] = field(default_factory=dict)

    def side(self, name: Side) -> DecodedSide:
        """The ``query`` or ``target`` side."""
        return self.query if name == "query" else self.target


@dataclass
class SkippedSample:
    """An item that could not be used; ``path`` is the offending file when the problem was a file; ``error`` the
    decoder's ``ImageDecodeError`` when the problem was an image (for callers that raise instead of skipping)."""

    id: str
    source: str
    reason: str
    detail: str
    path: str | None = None
    error: ImageDecodeError | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """What ``Batch.skipped`` shows for it: the file when there is one, else source/id."""
        return self.path if self.path is not None else f"{self.source}/{self.id}"


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str, path: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.path = reason, detail, path


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one item's random crop, from (seed, epoch, index)."""
    mask = (1 << 64) - 1
    state = np.random.SeedSequence([seed & mask, epoch & mask, index & mask]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _check_text(text: Any, side: str) -> str | None:
    if text is None:
        return None
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise _BadSample("non-UTF-8 text", f"{side} text: {error}") from None
    text = str(text)
    try:
        text.encode("utf-8")  # lone surrogates (e.g. from errors="surrogateescape") are not valid text
    except UnicodeEncodeError as error:
        raise _BadSample("non-UTF-8 text", f"{side} text: {error}") from None
    return text


def _as_pixels(decoded: Any) -> torch.Tensor:
    """A custom decoder's output (tensor or array-like) as a float32 tensor."""
    if not isinstance(decoded, torch.Tensor):
        decoded = torch.as_tensor(np.asarray(decoded))
    return decoded.to(torch.float32)


def _path_of(image: Any) -> str | None:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


@dataclass
class ImageViews:
    """A training dataset's image views: per index, per side, (content hash, cache row key) or None (no image,
    or an image that could not be read: it is decoded as usual and skipped with its reason).

    Without ``cache`` the views are decoded on the fly (``pixel_views``); with it, cached rows are served as
    code ids and rows the cache lacks fall back to decoding the same view.
    """

    spec: ViewSpec
    entries: list[tuple[tuple[str, str] | None, tuple[str, str] | None]]
    cache: CodeCache | None = None


class SampleDataset(Dataset):
    """A SampleSource whose items are decoded (in DataLoader workers) into ``DecodedSample``s.

    ``train=True`` applies the reference random resized crop with a per-item generator from
    (seed, epoch, index); call ``set_epoch`` before each epoch. The epoch lives in shared memory, so
    persistent DataLoader workers see the new value too. ``views`` (training only) restricts the crops to
    the K seeded views of each image and, when it holds a code cache, serves their code ids instead.

    ``sides``: the sides decoded and checked; the others come back empty (the inference engine decodes the
    query side only). ``decoder``: evaluation only, a callable image input -> ``[3, S, S]`` pixels used in place
    of ``decode_image`` with ``decode`` (an evaluation's own preprocessing); it signals a bad image by raising
    ``ImageDecodeError``, which is a named skip like any other.
    """

    def __init__(
        self,
        source: SampleSource,
        decode: DecodeOptions = DecodeOptions(),
        train: bool = False,
        strict: bool = False,
        seed: int = 0,
        views: ImageViews | None = None,
        sides: Sequence[Side] = SIDES,
        decoder: Callable[[Any], Any] | None = None,
    ):
        if views is not None and not train:
            raise ValueError("image views are training augmentations; use them with train=True")
        if decoder is not None and train:
            raise ValueError("a custom decoder replaces the evaluation preprocessing; use it with train=False")
        if not sides or any(side not in SIDES for side in sides):
            raise ValueError(f"sides must name query and/or target, got {tuple(sides)!r}")
        self.source = source
        self.decode = decode
        self.train = train
        self.strict = strict
        self.seed = seed
        self.views = views
        self.sides = tuple(sides)
        self.decoder = decoder
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def name(self) -> str:
        return getattr(self.source, "name", type(self.source).__name__)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.source)

    def groups(self) -> list[list[int]]:
        return self.source.groups()

    def __getitem__(self, index: int) -> DecodedSample | SkippedSample:
        sample: Sample | None = None
        try:
            sample = self.source[index]
            return self._decode(sample, index)
        except (_BadSample, ImageDecodeError, UnicodeDecodeError) as error:
            sample_id = str(sample.id) if sample is not None else str(index)
            source = str(sample.source) if sample is not None else self.name
            cause = None
            if isinstance(error, _BadSample):
                reason, detail, path = error.reason, error.detail, error.path
                cause = error.__cause__ if isinstance(error.__cause__, ImageDecodeError) else None
            elif isinstance(error, ImageDecodeError):
                reason, detail = error.reason, str(error)
                path = getattr(error, "source", None) or None
                cause = error
            else:
                reason, detail, path = "non-UTF-8 text", str(error), None
            if self.strict:
                where = f"file {path}" if path else f"sample {sample_id!r} of {source}"
                raise ValueError(f"{where}: {reason} ({detail}); fix or remove it, or run without strict") from error
            return SkippedSample(sample_id, source, reason, detail, path if isinstance(path, str) else None, cause)

    def _decode(self, sample: Sample, index: int) -> DecodedSample:
        texts = {side: _check_text(sample.side(side).text, side) for side in self.sides}
        for side in self.sides:
            text = texts[side]
            if sample.side(side).image is None and (text is None or not text.strip()):
                raise _BadSample("empty caption", f"{side} side has neither an image nor text")
        generator = None
        if self.train:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        out: dict[str, DecodedSide] = {side: DecodedSide(None) for side in SIDES}
        for number, side in enumerate(SIDES):
            if side not in self.sides:
                continue
            image = sample.side(side).image
            pixels = ids = None
            entry = self.views.entries[index][number] if self.views is not None else None
            try:
                if entry is not None:
                    content, key = entry
                    view = draw_view(self.seed, self.epoch, index, number, self.views.spec.views)
                    ids = self.views.cache.get(key, view) if self.views.cache is not None else None
                    if ids is None:
                        pixels = decode_view(image, self.decode, content, view, self.views.spec.views)
                elif image is not None and self.decoder is not None:
                    pixels = _as_pixels(self.decoder(image))
                elif image is not None:
                    # Images a task already rendered at the final size (TGIT) get no second random crop.
                    augment = self.train and not sample.meta.get("preprocessed", False)
                    pixels = decode_image(image, self.decode, train=augment, generator=generator)
            except ImageDecodeError as error:
                raise _BadSample(error.reason, f"{side} image: {error}", _path_of(image)) from error
            out[side] = DecodedSide(texts[side], pixels, ids)
        return DecodedSample(id=str(sample.id), source=str(sample.source), group=sample.group_key,
                             query=out["query"], target=out["target"], meta=dict(sample.meta))


class MixtureDataset(Dataset):
    """Several SampleDatasets end to end, with a sampling weight each (see ``sampling.mixture_group_weights``).

    Global index = local index + the dataset's offset; ``groups()`` are the datasets' groups so shifted.
    """

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float] | None = None):
        if not datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        weights = [1.0] * len(datasets) if weights is None else [float(w) for w in weights]
        if len(weights) != len(datasets):
            raise ValueError(f"MixtureDataset got {len(datasets)} datasets but {len(weights)} weights")
        if any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"dataset weights must be positive numbers, got {weights}")
        self.datasets = list(datasets)
        self.weights = weights
        self.offsets = [0]
        for dataset in self.datasets:
            self.offsets.append(self.offsets[-1] + len(dataset))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, local index) of a global index."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} items")
        d = bisect.bisect_right(self.offsets, index) - 1
        return d, index - self.offsets[d]

    def dataset_of(self, index: int) -> int:
        return self.locate(index)[0]

    def __getitem__(self, index: int) -> DecodedSample | SkippedSample:
        d, local = self.locate(index)
        return self.datasets[d][local]

    def groups(self) -> list[list[int]]:
        return [group for groups in self.dataset_groups() for group in groups]

    def dataset_groups(self) -> list[list[list[int]]]:
        """Global-index groups, one list per dataset (what ``mixture_group_weights`` needs)."""
        return [[[i + offset for i in group] for group in dataset.groups()]
                for dataset, offset in zip(self.datasets, self.offsets)]

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)
