"""Training losses: the sigmoid (SigLIP) contrastive loss across processes, and masked multimodal modelling."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def _gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' features concatenated in rank order (gradients flow back to their owners), and our rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0), dist.get_rank()


def sigmoid_loss(
    left: torch.Tensor,
    right: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    distributed: bool = True,
) -> torch.Tensor:
    """SigLIP loss of local left items against the right items of every rank, divided by the local batch.

    ``logit_scale`` is the log-space parameter (exponentiated here); ``logit_bias`` is additive. Under data
    parallel training, every rank's loss covers its N left rows against all P·N right rows; averaging the
    ranks' gradients (as DDP does) then equals the gradient of the single-process loss on the global batch.
    """
    rank = 0
    if distributed:
        right, rank = _gather_with_grad(right)
    local = left.shape[0]
    logits = logit_scale.exp() * left @ right.T + logit_bias
    labels = -torch.ones_like(logits)
    positives = torch.arange(local, device=left.device) + rank * local
    labels[torch.arange(local, device=left.device), positives] = 1.0
    return -F.logsigmoid(labels * logits).sum() / local


def clamp_logit_scale(logit_scale: torch.nn.Parameter, max_scale: float = 100.0) -> None:
    """Keep exp(logit_scale) within [1, max_scale] after each optimizer step, as the reference does."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, float(torch.log(torch.tensor(max_scale))))


@dataclass(frozen=True)
class MaskingConfig:
    """Which ids MMM may replace by ``[MASK]`` and how often (reference-facts.md §2.9)."""

    mask_token_id: int = 49408
    probability: float = 0.1
    never_mask: tuple[int, ...] = (0, 49407, 49408, 49409)

    @classmethod
    def for_model(cls, config, probability: float | None = None) -> "MaskingConfig":
        """Derive the special ids from a ``FuseLIPConfig``: pad, eot, [MASK] and max_text_token + 1."""
        return cls(
            mask_token_id=config.mask_token_id,
            probability=config.mlm_probability if probability is None else probability,
            never_mask=(0, 49407, config.mask_token_id, config.max_text_token + 1),
        )


def mask_tokens(
    input_ids: torch.Tensor, masking: MaskingConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a Bernoulli(p) subset of maskable ids by ``[MASK]``; labels hold the originals, −100 elsewhere.

    sot can be masked; pad/eot/[MASK]/id max_text_token+1 never are; no random or kept replacement.
    """
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    maskable = ~torch.isin(input_ids, torch.tensor(masking.never_mask, device=input_ids.device))
    chosen = (draw < masking.probability) & maskable
    masked = input_ids.masked_fill(chosen, masking.mask_token_id)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked, labels


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions; exactly 0 (with a graph) when nothing was masked."""
    if labels.numel() == 0 or not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


@dataclass
class LossOutput:
    """The total loss and its parts, for logging."""

    total: torch.Tensor
    contrastive: torch.Tensor
    mmm: torch.Tensor


def combine_losses(contrastive: torch.Tensor, mmm_left: torch.Tensor, mmm_right: torch.Tensor, mmm_weight: float = 0.25) -> LossOutput:
    """Total = contrastive + weight × (CE_left + CE_right), the paper's objective."""
    mmm = mmm_left + mmm_right
    return LossOutput(total=contrastive + mmm_weight * mmm, contrastive=contrastive, mmm=mmm)
