"""The training objective: a batch of (query, target) rows -> sigmoid contrastive loss + MMM loss.

A step has two halves. ``prepare`` runs on the host: it joins text ids and image codes (cached, or from
the frozen TiTok for rows that came as pixels) into joint-vocabulary ids, draws the MMM masks and lists the
masked positions, all as CPU tensors that then travel to the device in one go. ``forward`` runs on the
device and needs no host round trip: encoder, gather of the masked states, losses. The objective is an
``nn.Module`` so that Accelerate/DDP wraps it and gradient synchronisation sees the whole forward.

Masking draws come from a generator seeded by (seed, micro-batch number) over the *global* batch, and each
rank takes its rows, so one process and P processes on the same global batch mask the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from fuselip_med.core.distributed import all_reduce_sum, rank_and_world, rows_per_rank
from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.core.losses import (
    IGNORE_INDEX,
    LossOutput,
    MaskingConfig,
    mask_seed,
    mask_tokens,
    masked_token_loss,
    sigmoid_loss,
)
from fuselip_med.data.collate import Batch
from fuselip_med.data.dataset import SIDES


@dataclass
class SideInputs:
    """One side of a prepared step: ids ``[b, L]`` int64 ([MASK] applied), masked flat positions
    (row·L + column) ``[m]`` int64 and the original ids there ``[m]`` int64."""

    ids: torch.Tensor
    masked_at: torch.Tensor
    labels: torch.Tensor


@dataclass
class StepInputs:
    """Everything ``FuseLIPObjective.forward`` needs for one micro-batch; tensors move with ``to``."""

    query: SideInputs
    target: SideInputs
    masked: torch.Tensor          # [2] int64: this rank's masked tokens (query, target)
    rank_rows: list[int]          # every rank's row count, in rank order
    step: int                     # the global micro-batch number the masks were drawn for

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepInputs:
        """The same inputs on ``device`` (pinned first on CUDA, so the copy does not wait for the device)."""
        sides = [_moved(side, device, non_blocking) for side in (self.query, self.target)]
        return replace(self, query=sides[0], target=sides[1], masked=_move(self.masked, device, non_blocking))


@dataclass
class PixelSideInputs:
    """One side of a late-fusion baseline's step: ``pixels`` ``[n_image_rows, 3, H, W]`` float32 (None: no
    image on this side), ``text_ids`` ``[b, L]`` int64, ``has_image`` ``[b]`` bool."""

    pixels: torch.Tensor | None
    text_ids: torch.Tensor
    has_image: torch.Tensor


@dataclass
class PixelStepInputs:
    """A late-fusion baseline's micro-batch (its towers read pixels, no MMM); tensors move with ``to``."""

    query: PixelSideInputs
    target: PixelSideInputs
    rank_rows: list[int]
    step: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PixelStepInputs:
        """The same inputs on ``device``."""
        sides = [_moved(side, device, non_blocking) for side in (self.query, self.target)]
        return replace(self, query=sides[0], target=sides[1])


PAD_MULTIPLE = 8  # tensor-core tiles: sequence lengths that are multiples of 8 keep bf16 matmuls on fast paths


def pad_to_multiple(ids: torch.Tensor, multiple: int, limit: int) -> torch.Tensor:
    """``ids`` ``[b, L]`` right-padded with the pad id 0 to a multiple of ``multiple`` columns (at most
    ``limit``, the context length). Exact: the encoder masks pad out of attention and pools at eot, and MMM
    never masks pad."""
    length = ids.shape[1]
    target = min(-(-length // multiple) * multiple, max(limit, length))
    return torch.nn.functional.pad(ids, (0, target - length)) if target > length else ids


def _move(tensor: torch.Tensor | None, device: torch.device | str, non_blocking: bool) -> torch.Tensor | None:
    """``tensor`` on ``device``; pinned first for a non-blocking copy to CUDA."""
    if tensor is None:
        return None
    if torch.device(device).type == "cuda" and non_blocking:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=non_blocking)


def _moved(side, device: torch.device | str, non_blocking: bool):
    """A side dataclass with every tensor field on ``device``."""
    return replace(side, **{f.name: _move(getattr(side, f.name), device, non_blocking) for f in fields(side)})


class FuseLIPObjective(nn.Module):
    """Wraps a FuseLIP (or a PEFT-wrapped one) and computes the paper's loss (§3: SigLIP + 0.25 × MMM).

    ``masking.probability`` 0 turns MMM off (a pure contrastive objective).
    """

    def __init__(self, model: nn.Module, masking: MaskingConfig, mmm_weight: float = 0.25, seed: int = 0):
        super().__init__()
        self.model = model
        self.masking = masking
        self.mmm_weight = mmm_weight
        self.seed = seed

    @property
    def fuselip(self) -> FuseLIP:
        """The underlying FuseLIP, looking through a PEFT wrapper."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # ---- host half -------------------------------------------------------------------------------------
    def side_codes(self, batch: Batch, side: str) -> torch.Tensor | None:
        """TiTok code ids ``[n_image_rows, 128]`` int64 (CPU) of one side: cached rows as given, pixel rows
        through the frozen tokenizer on the model's device; None when no row of the side has an image."""
        has_image = getattr(batch, f"{side}_has_image")
        if not bool(has_image.any()):
            return None
        from_cache = getattr(batch, f"{side}_has_codes")[has_image]
        codes = torch.empty(int(has_image.sum()), self.fuselip.config.num_image_tokens, dtype=torch.long)
        cached, pixels = getattr(batch, f"{side}_image_ids"), getattr(batch, f"{side}_pixels")
        if cached is not None:
            codes[from_cache] = cached.to(torch.long)
        if pixels is not None:
            codes[~from_cache] = self.fuselip.image_codes(pixels).cpu()
        return codes

    def side_ids(self, batch: Batch, side: str) -> torch.Tensor:
        """Joint-vocabulary ids ``[b, L]`` int64 (CPU) of one side; every row carries its text row ("" ->
        [sot, eot]) as in the reference training, so image rows are fused. L is padded to a multiple of 8."""
        has_image = getattr(batch, f"{side}_has_image")
        text_ids = getattr(batch, f"{side}_text_ids")
        has_text = torch.ones_like(has_image, dtype=torch.bool)
        ids = self.fuselip.build_input_ids(text_ids, self.side_codes(batch, side), has_image, has_text, device="cpu")
        return pad_to_multiple(ids, PAD_MULTIPLE, self.fuselip.config.context_length)

    def prepare(self, batch: Batch, step: int) -> StepInputs | PixelStepInputs:
        """Host half of a step for a CPU ``batch`` at global micro-batch number ``step`` (see module doc).
        A late-fusion baseline (no MMM head) gets its pixels and text ids as they are (``PixelStepInputs``);
        ``ValueError`` when its images arrive only as cached TiTok codes."""
        fuselip = self.fuselip
        rank_rows = rows_per_rank(len(batch))
        if not hasattr(fuselip, "mask_logits"):
            return self._prepare_pixels(batch, step, rank_rows)
        rank, _ = rank_and_world()
        offset, total = sum(rank_rows[:rank]), sum(rank_rows)
        sides, counts = [], []
        for number, side in enumerate(SIDES):
            ids = self.side_ids(batch, side)
            if self.masking.probability > 0:
                generator = torch.Generator().manual_seed(mask_seed(self.seed, step, number))
                ids, labels = mask_tokens(ids, self.masking, generator, row_offset=offset, global_rows=total,
                                          context_length=fuselip.config.context_length)
            else:
                labels = torch.full_like(ids, IGNORE_INDEX)
            labels = labels.flatten()
            masked_at = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            sides.append(SideInputs(ids, masked_at, labels[masked_at]))
            counts.append(masked_at.numel())
        return StepInputs(sides[0], sides[1], torch.tensor(counts, dtype=torch.long), rank_rows, step)

    def _prepare_pixels(self, batch: Batch, step: int, rank_rows: list[int]) -> PixelStepInputs:
        sides = []
        for side in SIDES:
            has_image = getattr(batch, f"{side}_has_image")
            has_codes = getattr(batch, f"{side}_has_codes")
            if has_codes is not None and bool(has_codes.any()):
                raise ValueError(f"The {side} images of this batch are cached TiTok codes; the "
                                 f"{self.fuselip.config.arch} baseline reads pixels, so train it with "
                                 "train.image_codes: pixels.")
            sides.append(PixelSideInputs(getattr(batch, f"{side}_pixels"), getattr(batch, f"{side}_text_ids"),
                                         has_image))
        return PixelStepInputs(sides[0], sides[1], rank_rows, step)

    # ---- device half -----------------------------------------------------------------------------------
    def forward(self, inputs: StepInputs | PixelStepInputs) -> LossOutput:
        """Losses of prepared inputs (already on the model's device); no host synchronisation."""
        fuselip = self.fuselip
        if isinstance(inputs, PixelStepInputs):
            return self.late_fusion_loss(inputs)
        world = rank_and_world()[1]
        global_masked = all_reduce_sum(inputs.masked)
        features, mmm_terms = [], []
        for number, side in enumerate((inputs.query, inputs.target)):
            encoded = fuselip.encode_ids(side.ids)  # PEFT injects its layers in place, so this runs the adapters
            features.append(encoded.embeddings)
            hidden = encoded.hidden.flatten(0, 1).index_select(0, side.masked_at)
            mmm_terms.append(masked_token_loss(fuselip.mask_logits(hidden), side.labels, global_masked[number], world))
        contrastive = sigmoid_loss(features[0], features[1], fuselip.logit_scale, fuselip.logit_bias,
                                   rank_rows=inputs.rank_rows)
        mmm = mmm_terms[0] + mmm_terms[1]
        return LossOutput(total=contrastive + self.mmm_weight * mmm, contrastive=contrastive, mmm=mmm)

    def late_fusion_loss(self, inputs: PixelStepInputs) -> LossOutput:
        """Late-fusion baselines: each side through ``model.encode`` (pixels + text ids), sigmoid loss only (the
        MMM term is a zero). A text row that is only [sot, eot] counts as no text (``LateFusion.encode``)."""
        model = self.fuselip
        features = [model.encode(images=side.pixels, texts=side.text_ids, image_mask=side.has_image)
                    for side in (inputs.query, inputs.target)]
        contrastive = sigmoid_loss(features[0], features[1], model.logit_scale, model.logit_bias,
                                   rank_rows=inputs.rank_rows)
        return LossOutput(total=contrastive, contrastive=contrastive, mmm=contrastive.detach() * 0.0)
