"""The pre-norm transformer shared by FuseLIP's encoder and the late-fusion baselines' text tower and MLF fusion
module (open_clip's ``Transformer`` with separate q/k/v/out projections so LoRA can target them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out ``nn.Linear`` layers (LoRA-targetable) and SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    """Transformer feed-forward: c_fc -> exact GELU -> c_proj (the released names)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-norm transformer block without causal mask, LayerScale or dropout."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks (``transformer.resblocks.{i}`` in the released state dict).

    ``grad_checkpointing = True`` recomputes each block's activations in the backward pass instead of
    keeping them (``torch.utils.checkpoint``, non-reentrant): less memory, about one more forward of compute.
    """

    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attend, use_reentrant=False)
            else:
                x = block(x, attend)
        return x


def init_transformer(transformer: Transformer, width: int, layers: int) -> None:
    """open_clip's depth-scaled initialisation of a ``Transformer``'s attention and MLP weights."""
    proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
    for block in transformer.resblocks:
        for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            nn.init.normal_(proj.weight, std=width**-0.5)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
