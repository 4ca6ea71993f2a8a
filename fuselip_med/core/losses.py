"""Training losses: the sigmoid (SigLIP) contrastive loss across processes, and masked multimodal modelling (MMM).

Both are distributed-correct: P processes holding the rows of one global batch get the same loss and (after
DDP's gradient averaging) the same gradients as one process holding the whole batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fuselip_med.core.distributed import gather_rows
from fuselip_med.vocab import EOT_TOKEN_ID, MASK_TOKEN_ID, PAD_TOKEN_ID, TEXT_VOCAB_SIZE

IGNORE_INDEX = -100


def sigmoid_loss(
    left: torch.Tensor,
    right: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    distributed: bool = True,
    rank_rows: list[int] | None = None,
) -> torch.Tensor:
    """SigLIP loss (Zhai et al. 2023, eq. 1) of local ``left`` rows ``[b, D]`` against every rank's ``right`` rows.

    ``logit_scale`` is the log-space parameter (exponentiated here); ``logit_bias`` is additive. The sum over
    this rank's rows is divided by the mean rows per rank (the local batch when ranks are equal, as in the
    reference), so the ranks' mean loss and DDP's averaged gradients equal the single-process loss and
    gradients on the global batch. ``rank_rows`` (every rank's row count) saves a size exchange. The logits
    are float32 even under autocast (bf16 logits of scale ~100 lose the pairs' margins). Scalar float32.
    """
    offset, mean_rows = 0, float(left.shape[0])
    if distributed:
        right, offset, mean_rows = gather_rows(right, rank_rows)
    local = left.shape[0]
    with torch.autocast(left.device.type, enabled=False):  # logits in float32 under autocast too
        left, right, logit_scale, logit_bias = (_at_least_float32(t) for t in (left, right, logit_scale, logit_bias))
        logits = logit_scale.exp() * left @ right.T + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(local, device=left.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / (mean_rows or 1.0)  # fewer rows than ranks: mean < 1


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 when it is a lower-precision float (float64 stays float64)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def clamp_logit_scale(logit_scale: torch.nn.Parameter, max_scale: float = 100.0) -> None:
    """Keep exp(logit_scale) within [1, max_scale] after each optimizer step, as the reference does."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(max_scale))


@dataclass(frozen=True)
class MaskingConfig:
    """Which ids MMM may replace by ``[MASK]`` and how often (reference-facts.md §2.9)."""

    mask_token_id: int = MASK_TOKEN_ID
    probability: float = 0.1
    # pad (and BPE "!"), eot, [MASK] and image code 0 (id TEXT_VOCAB_SIZE = 49409): reference-facts.md §7.9
    never_mask: tuple[int, ...] = (PAD_TOKEN_ID, EOT_TOKEN_ID, MASK_TOKEN_ID, TEXT_VOCAB_SIZE)

    @classmethod
    def for_model(cls, config, probability: float | None = None) -> "MaskingConfig":
        """Derive the special ids from a ``FuseLIPConfig``: pad, eot, [MASK] and max_text_token + 1."""
        return cls(
            mask_token_id=config.mask_token_id,
            probability=config.mlm_probability if probability is None else probability,
            never_mask=(PAD_TOKEN_ID, EOT_TOKEN_ID, config.mask_token_id, config.max_text_token + 1),
        )


def mask_seed(seed: int, step: int, side: int) -> int:
    """The generator seed of one side's MMM draws at one global micro-batch ``step`` (63-bit int)."""
    return (seed * 2**32 + step * 2 + side) % 2**63


def mask_tokens(
    input_ids: torch.Tensor,
    masking: MaskingConfig,
    generator: torch.Generator,
    *,
    row_offset: int = 0,
    global_rows: int | None = None,
    context_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a Bernoulli(p) subset of maskable ids by ``[MASK]``; labels hold the originals, −100 elsewhere.

    ``input_ids`` ``[b, L]`` int64 are this rank's rows ``row_offset : row_offset + b`` of a global batch of
    ``global_rows`` rows. The uniform draws are made on the CPU for the whole ``[global_rows, context_length]``
    batch and this rank takes its block, so any split of a global batch over processes masks the same tokens.
    sot can be masked; pad/eot/[MASK]/id max_text_token+1 never are; no random or kept replacement (the
    reference's ``rand_repl_probability`` is 0). Returns (masked ids, labels), both ``[b, L]`` int64.
    """
    chosen = mask_candidates(input_ids, masking, generator, row_offset=row_offset, global_rows=global_rows,
                             context_length=context_length)
    return input_ids.masked_fill(chosen, masking.mask_token_id), input_ids.masked_fill(~chosen, IGNORE_INDEX)


def mask_candidates(
    input_ids: torch.Tensor,
    masking: MaskingConfig,
    generator: torch.Generator,
    *,
    row_offset: int = 0,
    global_rows: int | None = None,
    context_length: int | None = None,
) -> torch.Tensor:
    """``mask_tokens``'s choice: bool ``[b, L]``, True where the Bernoulli(p) draw hits an id that is not in
    ``masking.never_mask`` (same arguments, same draws). The training step calls it on ids whose image codes
    are still a placeholder, then drops the positions whose real code is a never-masked id where the codes are
    (``train.objective``), so the result equals ``mask_tokens`` on the real ids."""
    rows, length = input_ids.shape
    total = rows if global_rows is None else global_rows
    width = length if context_length is None else context_length
    draws = torch.rand(total, width, generator=generator)[row_offset: row_offset + rows, :length]
    never = torch.tensor(masking.never_mask, device=input_ids.device)
    return (draws.to(input_ids.device) < masking.probability) & ~torch.isin(input_ids, never)


def masked_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, global_masked: torch.Tensor | int, world: int = 1
) -> torch.Tensor:
    """MMM cross-entropy of this rank's masked tokens, normalised so the ranks' mean is the global token mean.

    ``logits`` ``[m, V]`` at the masked positions, ``labels`` ``[m]`` int64, ``global_masked`` the number of
    masked tokens over all ranks (a tensor keeps the step free of host syncs). One process: the plain mean
    cross-entropy; nothing masked anywhere: exactly 0 with a graph. Computed in float32.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if isinstance(global_masked, torch.Tensor):
        return total * world / global_masked.clamp(min=1)
    return total * world / max(int(global_masked), 1)


@dataclass
class LossOutput:
    """The total loss and its parts (scalars), for the backward pass and for logging."""

    total: torch.Tensor
    contrastive: torch.Tensor
    mmm: torch.Tensor
