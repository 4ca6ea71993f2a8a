"""Training losses: the sigmoid (SigLIP) contrastive loss across processes, and masked multimodal modelling."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our rows (works on gloo and nccl)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def _gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """All ranks' rows in rank order (gradients flow back to their owners), our row offset, mean rows per rank.

    Ranks may hold different numbers of rows (whole hard-negative groups): rows are padded to the largest
    rank for the collective and the padding is dropped again.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0, float(features.shape[0])
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = torch.zeros(world, dtype=torch.long, device=features.device)
    sizes[rank] = features.shape[0]
    dist.all_reduce(sizes)
    sizes_list = sizes.tolist()
    padded = F.pad(features, (0, 0, 0, max(sizes_list) - features.shape[0]))
    gathered = [part[:size] for part, size in zip(_AllGatherWithGrad.apply(padded), sizes_list)]
    return torch.cat(gathered, dim=0), sum(sizes_list[:rank]), sum(sizes_list) / world


def sigmoid_loss(
    left: torch.Tensor,
    right: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    distributed: bool = True,
) -> torch.Tensor:
    """SigLIP loss of local left rows against the right rows of every rank.

    ``logit_scale`` is the log-space parameter (exponentiated here); ``logit_bias`` is additive. The sum
    over this rank's rows is divided by the mean rows per rank (the local batch when ranks are equal, as in
    the reference), so the ranks' mean loss and DDP's averaged gradients equal the single-process loss and
    gradients on the global batch.
    """
    offset, rows_per_rank = 0, float(left.shape[0])
    if distributed:
        right, offset, rows_per_rank = _gather_with_grad(right)
    local = left.shape[0]
    logits = logit_scale.exp() * left @ right.T + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(local, device=left.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / max(rows_per_rank, 1.0)


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


def combine_losses(contrastive: torch.Tensor, mmm_left: torch.Tensor, mmm_right: torch.Tensor,
                   mmm_weight: float = 0.25) -> LossOutput:
    """Total = contrastive + weight × (CE_left + CE_right), the paper's objective."""
    mmm = mmm_left + mmm_right
    return LossOutput(total=contrastive + mmm_weight * mmm, contrastive=contrastive, mmm=mmm)
