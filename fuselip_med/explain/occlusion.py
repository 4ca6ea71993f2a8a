"""Occlusion sensitivity of a FuseLIP similarity: how much the match drops when one region of the image is hidden.

FuseLIP's image tokens are TiTok's 128 one-dimensional latent tokens, not patches, so attention weights do not map
onto the image; the map comes from the pixels instead (Zeiler & Fergus, "Visualizing and Understanding
Convolutional Networks", ECCV 2014, Sec. 4.2). The model input (``[3, S, S]`` float32 in [0, 1], S = 256) is cut
into a ``grid`` x ``grid`` lattice of square cells (8 or 16: cells of 32 or 16 px); each cell in turn is hidden and
the image re-embedded. The map value of a cell is

    drop = cos(image, target) - cos(image with the cell hidden, target)      (units: cosine similarity)

where ``target`` is the text embedding (a text query: image vs text) or the fused embedding of a query image and
its instruction (an image + instruction query: fused query vs image). Positive = the match needs this region.

A hidden cell is filled (``fill``) with either

* ``blur`` (default): the same cell of a Gaussian-blurred copy of the image (sigma = a quarter of the cell side,
  reflected at the image border; MONAI ``GaussianSmooth``), which removes detail the size of a finding while
  keeping the local brightness, so a cell does not count merely for being brighter or darker than the rest; or
* ``mean``: the mean of the whole model-input image (MONAI's ``mean_img`` occlusion), a flat grey square.

MONAI's ``OcclusionSensitivity`` (``monai.visualize``) does the sliding and the batching; the network it probes is
the image half of the model: pixels -> TiTok code ids ``[B, 128]`` for FuseLIP (any model with ``image_codes``),
pixels -> image embeddings ``[B, D]`` for others. Its "class" channels therefore carry each occluded image's codes
(``OcclusionSweep``); the encoder then turns the codes into embeddings, and any number of targets (another text,
a re-initialised encoder sharing the tokenizer: ``sanity``) is scored from them without running TiTok again.
The target and the unoccluded image are embedded once per map.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fuselip_med.data.hashing import content_hash
from fuselip_med.errors import UserError

__all__ = ["FILLS", "GRIDS", "UNITS", "ExplainError", "OcclusionExplainer", "OcclusionMap", "OcclusionSweep",
           "ProgressFn", "cell_embeddings", "explain", "fill_image", "load_explain_image", "occlusion_sweep",
           "target_embedding"]

GRIDS = (8, 16)
FILLS = ("blur", "mean")
UNITS = "cosine similarity"
BLUR_SIGMA_PER_CELL = 0.25  # blur sigma as a share of the cell side (8 px for 32 px cells)

ProgressFn = Callable[[int, int], None]  # (model passes done, model passes in all)


class ExplainError(UserError, ValueError):
    """Input an explanation cannot be computed for (empty text, grid larger than the image, unknown grid/fill)."""


@dataclass(frozen=True)
class OcclusionMap:
    """One relevance map: ``drops`` ``[grid, grid]`` float32 in cosine similarity, row 0 = top of the image.

    ``similarity_before``: cos(image, target) without occlusion; ``drops[r, c]`` = ``similarity_before`` minus the
    similarity with cell (r, c) hidden. ``mode``: "image-text" (image vs text) or "query-image" (fused query image +
    instruction vs image).
    """

    drops: np.ndarray
    similarity_before: float
    grid: int
    fill: str
    image_size: int
    mode: Literal["image-text", "query-image"]

    @property
    def cell_px(self) -> int:
        """Cell side in model-input pixels (S / grid)."""
        return self.image_size // self.grid

    @property
    def max_cell(self) -> tuple[int, int]:
        """(row, column) of the largest drop."""
        row, col = np.unravel_index(int(np.argmax(self.drops)), self.drops.shape)
        return int(row), int(col)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: similarity before, per-cell drops and similarities after, geometry, fill, units."""
        return {
            "units": UNITS,
            "definition": "drop = similarity before - similarity with the cell hidden; positive: the match needs "
                          "the region",
            "mode": self.mode,
            "similarity_before": self.similarity_before,
            "grid": self.grid,
            "cell_px": self.cell_px,
            "image_size": self.image_size,
            "fill": self.fill,
            "max_cell": list(self.max_cell),
            "drops": [[round(float(v), 6) for v in row] for row in self.drops],
            "similarity_after": [[round(self.similarity_before - float(v), 6) for v in row] for row in self.drops],
        }


@dataclass(frozen=True)
class OcclusionSweep:
    """The image half of one map, shared by every target scored on it.

    ``original``: the unoccluded image as codes ``[T]`` int64 (``kind="codes"``) or an embedding ``[D]`` float32
    (``kind="embeddings"``); ``cells``: the same for each occluded copy, ``[grid*grid, T|D]``, row-major cells.
    ``encoder``: the module that produced them (the TiTok tokenizer, or the model itself for embeddings); maps
    reuse a sweep only for a model with that very module.
    """

    original: torch.Tensor
    cells: torch.Tensor
    kind: Literal["codes", "embeddings"]
    grid: int
    fill: str
    image_size: int
    encoder: torch.nn.Module


def _check_choice(grid: int, fill: str) -> None:
    if grid not in GRIDS:
        raise ExplainError(f"--grid {grid}: choose one of {', '.join(map(str, GRIDS))}.")
    if fill not in FILLS:
        raise ExplainError(f"--fill {fill!r}: choose one of {', '.join(FILLS)}.")


def _check(grid: int, fill: str, image_size: int) -> None:
    _check_choice(grid, fill)
    if image_size % grid:
        raise ExplainError(f"--grid {grid} does not divide the model's {image_size} px input: choose another grid.")


def _image_encoder(model) -> torch.nn.Module:
    """The module whose output a sweep records: FuseLIP's TiTok tokenizer, or the model itself."""
    tokenizer = getattr(model, "image_tokenizer", None)
    return tokenizer if callable(getattr(model, "image_codes", None)) and tokenizer is not None else model


def _device(model) -> torch.device:
    return next(model.parameters()).device


def fill_image(pixels: torch.Tensor, grid: int, fill: str) -> torch.Tensor:
    """What a hidden cell shows, ``[3, S, S]`` float32 in [0, 1]: the image blurred with sigma = cell/4 px (reflect
    padding; MONAI ``GaussianSmooth``) for ``blur``, the image mean everywhere for ``mean``."""
    if fill == "mean":
        return torch.full_like(pixels, float(pixels.mean()))
    from monai.transforms import GaussianSmooth

    sigma = BLUR_SIGMA_PER_CELL * pixels.shape[-1] / grid
    pad = min(int(3 * sigma + 0.5), pixels.shape[-1] - 1)
    padded = torch.nn.functional.pad(pixels[None], (pad, pad, pad, pad), mode="reflect")[0]
    blurred = torch.as_tensor(GaussianSmooth(sigma=sigma)(padded))
    return blurred[:, pad:-pad, pad:-pad].clamp(0.0, 1.0).contiguous() if pad else blurred.clamp(0.0, 1.0)


class _Counter:
    def __init__(self, total: int, on_progress: ProgressFn | None):
        self.done, self.total, self.on_progress = 0, total, on_progress

    def advance(self, n: int) -> None:
        self.done += n
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)


class _ImageHalf(torch.nn.Module):
    """What MONAI's OcclusionSensitivity probes: occluded copies ``[n, 3, S, S]`` (hidden cell = NaN) -> codes
    ``[n, T]`` (as float32, exact below 2**24) or image embeddings ``[n, D]``."""

    def __init__(self, model, filler: torch.Tensor, codes: bool, counter: _Counter):
        super().__init__()
        self.model, self.codes, self.counter = model, codes, counter
        self.register_buffer("filler", filler)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.where(torch.isnan(images), self.filler, images)
        out = self.model.image_codes(images).float() if self.codes else self.model.encode(images=images).float()
        self.counter.advance(images.shape[0])
        return out


def occlusion_sweep(model, pixels: torch.Tensor, *, grid: int = 8, fill: str = "blur", batch_size: int = 16,
                    counter: _Counter | None = None) -> OcclusionSweep:
    """Hide each of ``grid`` x ``grid`` cells of ``pixels`` (``[3, S, S]`` float32 in [0, 1]) in turn and record the
    image half of ``model`` for every occluded copy, ``batch_size`` copies per pass (MONAI OcclusionSensitivity,
    no overlap, mask = one cell). Raises ``ExplainError`` for a grid/fill this module does not offer."""
    from monai.visualize import OcclusionSensitivity

    size = pixels.shape[-1]
    _check(grid, fill, size)
    codes = callable(getattr(model, "image_codes", None))
    device = _device(model)
    pixels = pixels.to(device, torch.float32)
    counter = counter or _Counter(grid * grid, None)
    probe = _ImageHalf(model, fill_image(pixels, grid, fill), codes, counter)
    cell = size // grid
    # mode=NaN: MONAI writes NaN into the hidden cell (its constant occlusion), _ImageHalf puts the fill there
    occlusion = OcclusionSensitivity(probe, mask_size=cell, n_batch=batch_size, verbose=False, mode=float("nan"),
                                     overlap=0.0, activate=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)  # inside MONAI 1.x
        if codes:
            original = model.image_codes(pixels[None])[0]
        else:
            original = model.encode(images=pixels[None])[0].float()
        swept, _ = occlusion(pixels[None])
    centres = torch.arange(grid, device=device) * cell + cell // 2
    per_cell = torch.as_tensor(swept)[0][:, centres][:, :, centres]  # [C, grid, grid]
    cells = per_cell.permute(1, 2, 0).reshape(grid * grid, -1)
    if codes:
        cells = cells.round().long()
    return OcclusionSweep(original=original, cells=cells, kind="codes" if codes else "embeddings", grid=grid,
                          fill=fill, image_size=size, encoder=_image_encoder(model))


def cell_embeddings(model, sweep: OcclusionSweep, *, batch_size: int = 16,
                    counter: _Counter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unoccluded image embedding ``[D]``, occluded ones ``[grid*grid, D]``), unit float32, for ``model``: from the
    sweep's TiTok codes (``encode(image_ids=)``; TiTok is not run again, and code rows that repeat, such as a cell
    whose hiding changes no code, are encoded once), or the sweep's own embeddings."""
    if sweep.encoder is not _image_encoder(model):
        raise ValueError("this sweep was recorded with another image encoder; sweep the image with this model")
    if sweep.kind == "embeddings":
        return sweep.original, sweep.cells
    rows = torch.cat([sweep.original[None], sweep.cells])
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    embedded, reported, cells = [], 0, sweep.cells.shape[0]
    with torch.no_grad():
        for start in range(0, unique.shape[0], batch_size):
            chunk = unique[start:start + batch_size]
            embedded.append(model.encode(image_ids=chunk).float())
            step = min(chunk.shape[0], cells - reported)
            reported += step
            if counter is not None:
                counter.advance(step)
    if counter is not None and reported < cells:
        counter.advance(cells - reported)  # the repeats, counted as done
    table = torch.cat(embedded)[inverse]
    return table[0], table[1:]


def target_embedding(model, text: str, query_image: torch.Tensor | None = None) -> torch.Tensor:
    """What the image is compared with, ``[D]`` unit float32: the text alone, or the query image (``[3, S, S]``) and
    the text (its instruction) fused into one sequence. Raises ``ExplainError`` for an empty text."""
    if not text or not text.strip():
        raise ExplainError("the text is empty: give the finding or instruction to explain, e.g. "
                           "--text \"left pleural effusion\".")
    with torch.no_grad():
        if query_image is None:
            return model.encode(texts=[text])[0].float()
        return model.encode(images=query_image[None].to(_device(model), torch.float32), texts=[text])[0].float()


def _map(before: torch.Tensor, cells: torch.Tensor, target: torch.Tensor, sweep: OcclusionSweep,
         mode: Literal["image-text", "query-image"]) -> OcclusionMap:
    similarity = float(before @ target)
    drops = (similarity - cells @ target).reshape(sweep.grid, sweep.grid)
    return OcclusionMap(drops=drops.cpu().numpy().astype(np.float32), similarity_before=similarity, grid=sweep.grid,
                        fill=sweep.fill, image_size=sweep.image_size, mode=mode)


def explain(model, image: torch.Tensor, text: str, *, query_image: torch.Tensor | None = None, grid: int = 8,
            fill: str = "blur", batch_size: int = 16, on_progress: ProgressFn | None = None) -> OcclusionMap:
    """The occlusion map of ``image`` (``[3, S, S]`` float32 in [0, 1], the model input) against ``text``, or
    against ``query_image`` + ``text`` fused (see the module docstring). ``on_progress(done, total)`` is called after
    every batch of model passes. Raises ``ExplainError`` (empty text, grid/fill not offered); Ctrl-C stops it."""
    return OcclusionExplainer(grid=grid, fill=fill, batch_size=batch_size)(model, image, text,
                                                                            query_image=query_image,
                                                                            on_progress=on_progress)


class OcclusionExplainer:
    """``explainer(model, image, text, query_image=None) -> OcclusionMap`` that keeps the sweeps and cell embeddings
    of the last ``keep`` images, so another text, another query, or a model sharing the image tokenizer (a
    re-initialised encoder) reuses the occluded copies' TiTok codes: the sanity checks score three maps from one
    sweep. Raises ``ExplainError`` for a grid or fill this module does not offer."""

    def __init__(self, grid: int = 8, fill: str = "blur", batch_size: int = 16, keep: int = 4):
        _check_choice(grid, fill)
        self.grid, self.fill, self.batch_size, self.keep = grid, fill, batch_size, keep
        self._sweeps: OrderedDict[str, OcclusionSweep] = OrderedDict()
        self._embeddings: OrderedDict[tuple[str, int], tuple[Any, torch.Tensor, torch.Tensor]] = OrderedDict()

    def _remember(self, cache: OrderedDict, key, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.keep:
            cache.popitem(last=False)

    def __call__(self, model, image: torch.Tensor, text: str, *, query_image: torch.Tensor | None = None,
                 on_progress: ProgressFn | None = None) -> OcclusionMap:
        target = target_embedding(model, text, query_image)
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        encoder = _image_encoder(model)
        key = content_hash(pixels)  # dtype and shape included
        sweep = self._sweeps.get(key)
        if sweep is not None and sweep.encoder is not encoder:
            sweep = None
        known = self._embeddings.get((key, id(model)))
        if known is not None and (sweep is None or known[0] is not model):
            known = None
        cells = self.grid * self.grid
        from_codes = callable(getattr(model, "image_codes", None))
        counter = _Counter((cells if sweep is None else 0) + (cells if known is None and from_codes else 0),
                           on_progress)
        if sweep is None:
            sweep = occlusion_sweep(model, pixels, grid=self.grid, fill=self.fill, batch_size=self.batch_size,
                                    counter=counter)
            self._remember(self._sweeps, key, sweep)
        if known is None:
            before, embedded = cell_embeddings(model, sweep, batch_size=self.batch_size, counter=counter)
            known = (model, before, embedded)
            self._remember(self._embeddings, (key, id(model)), known)
        _, before, embedded = known
        return _map(before, embedded, target.to(before.device), sweep,
                    "image-text" if query_image is None else "query-image")


def load_explain_image(source: Any, grid: int, options=None):
    """(display image, model input) for an image file/bytes (PNG, JPEG, DICOM through its own window; ``options``:
    ``data.images.DecodeOptions``, e.g. a frame of a multi-frame series): the 8-bit PIL image as the user sees it at
    native size, and ``[3, S, S]`` float32 in [0, 1]. Raises ``ImageDecodeError`` naming the image, and
    ``ExplainError`` when the image has fewer pixels across than the grid has cells."""
    from fuselip_med.data.images import DecodeOptions, decode_image, load_image

    options = options or DecodeOptions()
    display = load_image(source, options)
    width, height = display.size
    if min(width, height) < grid:
        raise ExplainError(f"{source}: the image is {width}x{height} px, smaller than the {grid}x{grid} grid; "
                           "use a smaller --grid or a larger image.")
    return display, decode_image(source, options)
