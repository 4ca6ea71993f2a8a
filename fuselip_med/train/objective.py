"""The training objectives, one per kind of model, picked once by ``model.arch`` (:func:`create_objective`, as
open_clip's ``create_task``): :class:`EarlyFusionObjective` (FuseLIP: joint-vocabulary ids, sigmoid contrastive
loss + MMM loss) and :class:`LateFusionObjective` (the SigLIP-SF/MLF baselines: pixels and text ids, sigmoid loss
only). Both have the same surface: ``prepare(batch, step)`` on the host, ``forward(inputs)`` on the device,
``base_model`` (the model under a PEFT wrapper), ``image_coder`` (the frozen TiTok model or None) and
``configure_model(model, train)`` (the arch's training switches).

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
from typing import Any

import torch
from torch import nn

from fuselip_med.core.configs import check_arch
from fuselip_med.core.distributed import all_reduce_sum, rank_and_world, rows_per_rank
from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.core.late_fusion import LateFusion
from fuselip_med.core.lora import base_model_of
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
from fuselip_med.data.schema import SIDES, Side
from fuselip_med.errors import InputError


@dataclass
class SideInputs:
    """One side of a prepared step: ids ``[b, L]`` int64 ([MASK] applied), masked flat positions
    (row·L + column) ``[m]`` int64 and the original ids there ``[m]`` int64."""

    ids: torch.Tensor
    masked_at: torch.Tensor
    labels: torch.Tensor


@dataclass
class StepInputs:
    """Everything ``EarlyFusionObjective.forward`` needs for one micro-batch; tensors move with ``to``."""

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


class EarlyFusionObjective(nn.Module):
    """FuseLIP (or a PEFT-wrapped one): the paper's loss (§3: SigLIP + 0.25 × MMM) on joint-vocabulary ids.

    ``masking.probability`` 0 turns MMM off (a pure contrastive objective).
    """

    def __init__(self, model: nn.Module, masking: MaskingConfig, mmm_weight: float = 0.25, seed: int = 0):
        super().__init__()
        self.model = model
        self.masking = masking
        self.mmm_weight = mmm_weight
        self.seed = seed

    @classmethod
    def from_recipe(cls, model: nn.Module, train: Any) -> EarlyFusionObjective:
        """The objective of a recipe's ``train`` section (MMM probability and weight, seed)."""
        masking = MaskingConfig.for_model(base_model_of(model).config, probability=train.mlm_probability)
        return cls(model, masking, train.mmm_weight, train.seed)

    @staticmethod
    def configure_model(model: FuseLIP, train: Any) -> None:
        """Activation checkpointing and ``torch.compile`` of the encoder, as ``train`` asks."""
        model.transformer.grad_checkpointing = train.grad_checkpointing
        if train.compile:
            model.transformer.compile(dynamic=True)

    @property
    def base_model(self) -> FuseLIP:
        """The FuseLIP under a PEFT wrapper."""
        return base_model_of(self.model)

    @property
    def image_coder(self) -> FuseLIP:
        """The model whose frozen TiTok turns pixels into the codes this objective reads (``image_codes``)."""
        return self.base_model

    # ---- host half -------------------------------------------------------------------------------------
    def side_codes(self, batch: Batch, side: Side) -> torch.Tensor | None:
        """TiTok code ids ``[n_image_rows, 128]`` int64 (CPU) of one side: cached rows as given, pixel rows
        through the frozen tokenizer on the model's device; None when no row of the side has an image."""
        rows = batch.side(side)
        if not bool(rows.has_image.any()):
            return None
        fuselip = self.base_model
        from_cache = rows.has_codes[rows.has_image]
        codes = torch.empty(int(rows.has_image.sum()), fuselip.config.num_image_tokens, dtype=torch.long)
        if rows.image_ids is not None:
            codes[from_cache] = rows.image_ids.to(torch.long)
        if rows.pixels is not None:
            codes[~from_cache] = fuselip.image_codes(rows.pixels).cpu()
        return codes

    def side_ids(self, batch: Batch, side: Side) -> torch.Tensor:
        """Joint-vocabulary ids ``[b, L]`` int64 (CPU) of one side; every row carries its text row ("" ->
        [sot, eot]) as in the reference training, so image rows are fused. L is padded to a multiple of 8."""
        rows = batch.side(side)
        has_text = torch.ones_like(rows.has_image, dtype=torch.bool)
        ids = self.base_model.build_input_ids(rows.text_ids, self.side_codes(batch, side), rows.has_image, has_text,
                                              device="cpu")
        return pad_to_multiple(ids, PAD_MULTIPLE, self.base_model.config.context_length)

    def prepare(self, batch: Batch, step: int) -> StepInputs:
        """Host half of a step for a CPU ``batch`` at global micro-batch number ``step`` (see module doc)."""
        rank_rows = rows_per_rank(len(batch))
        rank, _ = rank_and_world()
        offset, total = sum(rank_rows[:rank]), sum(rank_rows)
        sides, counts = [], []
        for number, side in enumerate(SIDES):
            ids = self.side_ids(batch, side)
            if self.masking.probability > 0:
                generator = torch.Generator().manual_seed(mask_seed(self.seed, step, number))
                ids, labels = mask_tokens(ids, self.masking, generator, row_offset=offset, global_rows=total,
                                          context_length=self.base_model.config.context_length)
            else:
                labels = torch.full_like(ids, IGNORE_INDEX)
            labels = labels.flatten()
            masked_at = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            sides.append(SideInputs(ids, masked_at, labels[masked_at]))
            counts.append(masked_at.numel())
        return StepInputs(sides[0], sides[1], torch.tensor(counts, dtype=torch.long), rank_rows, step)

    # ---- device half -----------------------------------------------------------------------------------
    def forward(self, inputs: StepInputs) -> LossOutput:
        """Losses of prepared inputs (already on the model's device); no host synchronisation."""
        fuselip = self.base_model
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


class LateFusionObjective(nn.Module):
    """A late-fusion baseline (or a PEFT-wrapped one): each side through ``model.encode`` (pixels + text ids),
    SigLIP sigmoid loss only (FuseLIP paper §4 "Baselines"); the reported MMM term is a zero."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_recipe(cls, model: nn.Module, train: Any) -> LateFusionObjective:
        """The objective of a recipe's ``train`` section (the baselines have no MMM settings)."""
        return cls(model)

    @staticmethod
    def configure_model(model: LateFusion, train: Any) -> None:
        """The baselines train as they are: ``InputError`` when ``train`` asks for FuseLIP's encoder switches."""
        if train.grad_checkpointing or train.compile:
            raise InputError(f"train.grad_checkpointing and train.compile apply to FuseLIP's encoder; set them to "
                             f"false for model.arch {model.config.arch}.")

    @property
    def base_model(self) -> LateFusion:
        """The late-fusion model under a PEFT wrapper."""
        return base_model_of(self.model)

    @property
    def image_coder(self) -> None:
        """None: the towers read pixels, there are no image codes."""
        return None

    def prepare(self, batch: Batch, step: int) -> PixelStepInputs:
        """Host half: each side's pixels and text ids as they are; ``ValueError`` when its images arrive only as
        cached TiTok codes."""
        sides = []
        for side in SIDES:
            rows = batch.side(side)
            if rows.has_codes is not None and bool(rows.has_codes.any()):
                raise ValueError(f"The {side} images of this batch are cached TiTok codes; the "
                                 f"{self.base_model.config.arch} baseline reads pixels, so train it with "
                                 "train.image_codes: pixels.")
            sides.append(PixelSideInputs(rows.pixels, rows.text_ids, rows.has_image))
        return PixelStepInputs(sides[0], sides[1], rows_per_rank(len(batch)), step)

    def forward(self, inputs: PixelStepInputs) -> LossOutput:
        """Sigmoid loss of prepared inputs; a text row that is only [sot, eot] counts as no text
        (``LateFusion.encode``)."""
        model = self.base_model
        features = [model.encode(images=side.pixels, texts=side.text_ids, image_mask=side.has_image)
                    for side in (inputs.query, inputs.target)]
        contrastive = sigmoid_loss(features[0], features[1], model.logit_scale, model.logit_bias,
                                   rank_rows=inputs.rank_rows)
        return LossOutput(total=contrastive, contrastive=contrastive, mmm=contrastive.detach() * 0.0)


Objective = EarlyFusionObjective | LateFusionObjective
OBJECTIVES: dict[str, type[EarlyFusionObjective] | type[LateFusionObjective]] = {
    "fuselip": EarlyFusionObjective,
    "siglip_sf": LateFusionObjective,
    "siglip_mlf": LateFusionObjective,
}
"""The objective class of each ``model.arch`` of the registry (``core.configs.ARCHS``)."""


def objective_class(arch: str) -> type[EarlyFusionObjective] | type[LateFusionObjective]:
    """The objective class of ``model.arch`` (``check_arch`` has validated the name)."""
    return OBJECTIVES[check_arch(arch)]


def create_objective(arch: str, model: nn.Module, train: Any) -> Objective:
    """The objective of ``model.arch`` around ``model`` (possibly PEFT-wrapped), from the recipe's ``train``."""
    return objective_class(arch).from_recipe(model, train)
