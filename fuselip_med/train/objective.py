"""The training forward: a batch of (query, target) rows -> sigmoid contrastive loss + MMM loss.

It is an ``nn.Module`` so that Accelerate/DDP wraps it and gradient synchronisation sees the whole step.
Masking draws come from a generator seeded by (seed, step) over the *global* batch, and each rank takes its
rows, so one process and P processes on the same global batch mask the same tokens and get the same loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.core.losses import (
    IGNORE_INDEX,
    LossOutput,
    MaskingConfig,
    sigmoid_loss,
)
from fuselip_med.data.collate import Batch


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rows(local_rows: int, device: torch.device) -> tuple[int, int, int]:
    """(offset of this rank's rows in the global batch, global rows, world size)."""
    rank, world = _world()
    if world == 1:
        return 0, local_rows, 1
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[rank] = local_rows
    dist.all_reduce(sizes)
    return int(sizes[:rank].sum()), int(sizes.sum()), world


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (non-differentiable) count over ranks."""
    if _world()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def masked_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, global_masked: torch.Tensor,
                              world: int) -> torch.Tensor:
    """Cross-entropy summed over this rank's masked tokens, normalised so the rank mean is the global token mean."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    total = nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total * world / global_masked.clamp(min=1)


class FuseLIPObjective(nn.Module):
    """Wraps a FuseLIP (or a PEFT-wrapped one) and computes the paper's loss for a ``Batch``."""

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

    def side_ids(self, batch: Batch, side: str) -> torch.Tensor:
        """Joint-vocabulary ids of one side (pixels through the frozen TiTok, or cached code ids)."""
        fuselip = self.fuselip
        has_image = getattr(batch, f"{side}_has_image")
        cached = getattr(batch, f"{side}_image_ids")
        pixels = getattr(batch, f"{side}_pixels")
        codes = cached if cached is not None else (fuselip.image_codes(pixels) if pixels is not None else None)
        text_ids = getattr(batch, f"{side}_text_ids")
        # As in the reference training, every row carries its text row ("" -> [sot, eot]): image rows are fused.
        has_text = torch.ones_like(has_image, dtype=torch.bool)
        if not bool(has_image.any()):
            codes = None
        return fuselip.build_input_ids(text_ids, codes, has_image, has_text)

    def _mask(self, ids: torch.Tensor, step: int, side: int, offset: int,
              total: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed((self.seed * 2**32 + step * 2 + side) % 2**63)
        draws = torch.rand(total, self.fuselip.config.context_length, generator=generator)
        draws = draws[offset: offset + ids.shape[0], : ids.shape[1]].to(ids.device)
        never = torch.tensor(self.masking.never_mask, device=ids.device)
        chosen = (draws < self.masking.probability) & ~torch.isin(ids, never)
        return ids.masked_fill(chosen, self.masking.mask_token_id), ids.masked_fill(~chosen, IGNORE_INDEX)

    def late_fusion_loss(self, batch: Batch) -> LossOutput:
        """Late-fusion baselines (no MMM head): each side through ``model.encode`` on pixels, sigmoid loss only.

        A text row that is only [sot, eot] (a sample without text on that side) counts as no text.
        Raises ValueError when a side's images arrive only as cached TiTok ids (the baselines read pixels).
        """
        model = self.fuselip
        features = []
        for side in ("query", "target"):
            pixels, has_image = getattr(batch, f"{side}_pixels"), getattr(batch, f"{side}_has_image")
            if pixels is None and bool(has_image.any()):
                raise ValueError(f"The {side} images of this batch are cached TiTok ids; the {model.config.arch} "
                                 "baseline needs pixels, so train it without the image token cache.")
            features.append(model.encode(images=pixels, texts=getattr(batch, f"{side}_text_ids"),
                                         image_mask=has_image))
        contrastive = sigmoid_loss(features[0], features[1], model.logit_scale, model.logit_bias)
        return LossOutput(total=contrastive, contrastive=contrastive, mmm=contrastive.detach() * 0.0)

    def forward(self, batch: Batch, step: int) -> LossOutput:
        fuselip = self.fuselip
        if not hasattr(fuselip, "mask_logits"):
            return self.late_fusion_loss(batch)
        offset, total, world = global_rows(len(batch), batch.query_text_ids.device)
        features, mmm_terms = [], []
        for side_number, side in enumerate(("query", "target")):
            ids = self.side_ids(batch, side)
            if self.masking.probability > 0:
                ids, labels = self._mask(ids, step, side_number, offset, total)
            else:
                labels = torch.full_like(ids, IGNORE_INDEX)
            encoded = fuselip.encode_ids(ids)  # PEFT injects its layers in place, so this runs the adapters too
            features.append(encoded.embeddings)
            chosen = labels != IGNORE_INDEX
            logits = fuselip.mask_logits(encoded.hidden[chosen])
            global_masked = global_sum(chosen.sum().detach())
            mmm_terms.append(masked_mean_cross_entropy(logits, labels[chosen], global_masked, world))
        contrastive = sigmoid_loss(features[0], features[1], fuselip.logit_scale, fuselip.logit_bias)
        mmm = mmm_terms[0] + mmm_terms[1]
        return LossOutput(total=contrastive + self.mmm_weight * mmm, contrastive=contrastive, mmm=mmm)
