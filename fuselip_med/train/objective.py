"""The training objectives, one per kind of model, picked once by ``model.arch`` (:func:`create_objective`, as
open_clip's ``create_task``): :class:`EarlyFusionObjective` (FuseLIP: joint-vocabulary ids, sigmoid contrastive
loss + MMM loss) and :class:`LateFusionObjective` (the SigLIP-SF/MLF baselines: pixels and text ids, sigmoid loss
only). Both have the same surface: ``prepare(batch, step)`` on the host, ``forward(inputs)`` on the device,
``base_model`` (the model under a PEFT wrapper), ``image_coder`` (the frozen TiTok model or None) and
``configure_model(model, train)`` (the arch's training switches).

A step has two halves. ``prepare`` builds on the host everything that does not depend on code values: the
joint-vocabulary ids with a placeholder where the image codes go, the MMM draws and the candidate positions
(``mask_candidates``). The codes are then written in where they are, with no host round trip: cached codes on
the host (the whole step then travels to the device in one go), codes from the frozen TiTok for rows that came
as pixels on the device (the host ids follow them there); the candidates whose real code is never masked (image
code 0) keep their id and get the ignore label, so the result equals masking the finished ids. ``forward`` runs
on the device and needs no host round trip either: encoder, gather of the masked states, losses. The objective
is an ``nn.Module`` so that Accelerate/DDP wraps it and gradient synchronisation sees the whole forward.

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
    mask_candidates,
    mask_seed,
    masked_token_loss,
    sigmoid_loss,
)
from fuselip_med.data.collate import Batch
from fuselip_med.data.schema import SIDES, Side
from fuselip_med.errors import InputError


@dataclass
class SideInputs:
    """One side of a prepared step: ids ``[b, L]`` int64 ([MASK] applied), the flat positions (row·L + column)
    drawn for MMM ``[m]`` int64 and the original ids there ``[m]`` int64 (``IGNORE_INDEX`` where the id may not
    be masked: image code 0, known only where the codes are; those keep their id)."""

    ids: torch.Tensor
    masked_at: torch.Tensor
    labels: torch.Tensor


@dataclass
class StepInputs:
    """Everything ``EarlyFusionObjective.forward`` needs for one micro-batch; tensors move with ``to``."""

    query: SideInputs
    target: SideInputs
    masked: torch.Tensor          # [2] int64: this rank's masked tokens (query, target), where the ids are built
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
    """``tensor`` on ``device``; a host tensor is pinned first for a non-blocking copy to CUDA."""
    if tensor is None:
        return None
    if torch.device(device).type == "cuda" and non_blocking and tensor.device.type == "cpu":
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
        """TiTok code ids ``[n_image_rows, 128]`` int64 of one side, where they are: on the host when every image
        row came as cached codes, else on the tokenizer's device (pixel rows through the frozen TiTok, cached rows
        copied in); None when no row of the side has an image. Reads no code value on the host."""
        rows = batch.side(side)
        if not bool(rows.has_image.any()):
            return None
        if rows.pixels is None:
            return rows.image_ids.to(torch.long)
        computed = self.base_model.image_codes(rows.pixels).to(torch.long)
        if rows.image_ids is None:
            return computed
        from_cache = rows.has_codes[rows.has_image]
        codes = torch.empty(len(from_cache), computed.shape[1], dtype=torch.long, device=computed.device)
        place = from_cache.nonzero().squeeze(1).to(computed.device, non_blocking=True)
        codes.index_copy_(0, place, rows.image_ids.to(computed.device, torch.long, non_blocking=True))
        others = (~from_cache).nonzero().squeeze(1).to(computed.device, non_blocking=True)
        return codes.index_copy_(0, others, computed)

    def host_ids(self, batch: Batch, side: Side) -> torch.Tensor:
        """Joint-vocabulary ids ``[b, L]`` int64 (CPU) of one side with the placeholder code 1 at every image
        code position (``fill_codes`` writes the real ones); every row carries its text row ("" -> [sot, eot])
        as in the reference training, so image rows are fused. L is padded to a multiple of 8 and does not
        depend on the codes (an image row's length is 128 codes + its text)."""
        rows = batch.side(side)
        has_text = torch.ones_like(rows.has_image, dtype=torch.bool)
        placeholder = torch.ones(int(rows.has_image.sum()), self.base_model.config.num_image_tokens,
                                 dtype=torch.long)
        ids = self.base_model.build_input_ids(rows.text_ids, placeholder, rows.has_image, has_text, device="cpu")
        return pad_to_multiple(ids, PAD_MULTIPLE, self.base_model.config.context_length)

    def fill_codes(self, ids: torch.Tensor, has_image: torch.Tensor, codes: torch.Tensor | None,
                   candidates: torch.Tensor, device: torch.device) -> tuple[SideInputs, torch.Tensor]:
        """One side's ``SideInputs`` on ``device`` and its masked-token count (int64 scalar there): host ``ids``
        ``[b, L]`` with the real ``codes`` ``[n_image_rows, 128]`` written in (on their device), then [MASK]
        at the ``candidates`` (bool ``[b, L]``, host) whose real id is maskable. Only copies to ``device`` and
        device ops: nothing waits for the device."""
        config = self.base_model.config
        ids = ids.to(device, non_blocking=True).contiguous()  # a cut of the context-length rows: written flat
        if codes is not None:
            image_rows = has_image.nonzero().squeeze(1).to(device, non_blocking=True)
            ids[image_rows, :config.num_image_tokens] = codes + config.image_offset
        masked_at = candidates.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
        flat = ids.view(-1)
        originals = flat.index_select(0, masked_at)
        keep = torch.isin(originals, torch.tensor(self.masking.never_mask, device=device))
        flat.index_copy_(0, masked_at, originals.masked_fill(~keep, self.masking.mask_token_id))
        return SideInputs(ids, masked_at, originals.masked_fill(keep, IGNORE_INDEX)), (~keep).sum()

    def prepare(self, batch: Batch, step: int) -> StepInputs:
        """Host half of a step for a CPU ``batch`` at global micro-batch number ``step`` (see module doc); the
        inputs are on the host for cached codes, on TiTok's device when some image came as pixels."""
        rank_rows = rows_per_rank(len(batch))
        rank, _ = rank_and_world()
        offset, total = sum(rank_rows[:rank]), sum(rank_rows)
        codes = [self.side_codes(batch, side) for side in SIDES]
        device = next((c.device for c in codes if c is not None and c.device.type != "cpu"), torch.device("cpu"))
        sides, counts = [], []
        for number, side in enumerate(SIDES):
            ids = self.host_ids(batch, side)
            if self.masking.probability > 0:
                generator = torch.Generator().manual_seed(mask_seed(self.seed, step, number))
                candidates = mask_candidates(ids, self.masking, generator, row_offset=offset, global_rows=total,
                                             context_length=self.base_model.config.context_length)
            else:
                candidates = torch.zeros_like(ids, dtype=torch.bool)
            inputs, count = self.fill_codes(ids, batch.side(side).has_image, codes[number], candidates, device)
            sides.append(inputs)
            counts.append(count)
        return StepInputs(sides[0], sides[1], torch.stack(counts), rank_rows, step)

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
