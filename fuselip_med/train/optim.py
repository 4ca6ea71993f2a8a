"""AdamW with the reference's parameter groups, and linear warmup + cosine decay set every step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_scale", "logit_bias", "layer_norm")


def exclude_from_decay(name: str, param: nn.Parameter, decay_embeddings: bool = False) -> bool:
    """No weight decay on biases, norms and the loss's scale/bias (any 0/1-d tensor), nor on embeddings
    unless ``decay_embeddings`` (the reference's pretraining decays token and positional embeddings)."""
    if param.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS):
        return True
    return not decay_embeddings and is_embedding(name)


def is_embedding(name: str) -> bool:
    """Token/positional embeddings and the ViT class embedding; not the ViT's patch-embedding convolution (a weight
    matrix like any other, decayed as open_clip decays ``conv1``)."""
    return "embedding" in name.rsplit(".", 1)[-1] or name.endswith(("token_embedding.weight",
                                                                     "position_embedding.weight"))


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups over the trainable parameters (tied weights appear once)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exclude_from_decay(name, param, decay_embeddings) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-8,
    decay_embeddings: bool = False,
) -> torch.optim.AdamW:
    """Fused AdamW (decoupled decay; one kernel for all parameters, on CUDA and CPU) over ``parameter_groups``.

    Fused AdamW honours ``optimizer.found_inf`` (a 0-d float tensor on the parameters' device): when it is 1
    the step leaves parameters, moments and step counts untouched, which lets the trainer skip a non-finite
    step without reading the loss on the host (``skip_step_if``).
    """
    groups = parameter_groups(model, weight_decay, decay_embeddings)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


def skip_step_if(optimizer: torch.optim.Optimizer, non_finite: torch.Tensor, scaler=None) -> None:
    """Make the next ``step()`` of a fused AdamW (or one wrapped by Accelerate) a no-op where ``non_finite``
    (0-d float tensor, 1.0 = skip) is set; stays on the device (no host synchronisation).

    With an fp16 ``scaler`` (``torch.amp.GradScaler``, gradients already unscaled) the scaler hands the fused
    optimizer its own found-inf at ``step()``, replacing ``optimizer.found_inf``: the flag is then merged into
    the scaler's per-device found-inf record (``torch/amp/grad_scaler.py``: ``_per_optimizer_states[id(opt)]
    ["found_inf_per_device"]``, filled by ``unscale_``), so the step is skipped and the scale lowered once.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        group["fused"] = True  # a state dict from a non-fused run (older checkpoints) must not turn it off
    inner.found_inf = non_finite
    if scaler is not None:
        for found in scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values():
            torch.maximum(found, non_finite.to(found.device, found.dtype), out=found)


def skip_non_finite_step(accelerator, optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor],
                         loss_terms: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """One skip decision for the coming optimizer step, covering the loss and the gradients.

    ``loss_terms`` ``[k]`` float: this process's loss values of the step. Under fp16 the gradients are
    unscaled first (Accelerate's GradScaler). The step is skipped on every process when any process saw a
    non-finite loss or the (already all-reduced) gradients have a non-finite norm; otherwise they are clipped
    to ``grad_clip`` (total L2 norm) when it is set. Nothing is read on the host. Returns the decision, a 0-d
    float tensor (1.0 = skipped), which ``skip_step_if`` hands to the fused AdamW (and the GradScaler).
    """
    accelerator.unscale_gradients()
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss_terms.device)
    local = (~torch.isfinite(loss_terms).all() | ~torch.isfinite(norm.to(loss_terms.device))).float()
    bad = accelerator.reduce(local, reduction="sum").clamp(max=1.0)
    if grad_clip is not None and grads:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)
    skip_step_if(optimizer, bad, accelerator.scaler)
    return bad


@dataclass(frozen=True)
class WarmupCosine:
    """lr(step) = peak·(step+1)/warmup during warmup, then cosine from peak to ``min_lr`` at ``total`` steps."""

    peak: float
    warmup: int
    total: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.peak - self.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (the schedule is applied explicitly at each step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
