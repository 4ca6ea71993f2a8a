"""Structured weights for an untrained TiTok: each latent token reads its own image region.

There are no released weights for the ``tiny`` tokenizer, and random weights give code ids that hardly depend
on the image (every latent token attends evenly to all patches, so a flip or a rotation changes almost no id).
``init_local_patches_`` sets deterministic weights instead, so that ids carry content *and* layout, as trained
TiTok ids do. It is a stand-in for CPU demos, tests and benchmarks, not a learned tokenizer:

* patch tokens carry a 2-D sinusoidal position code, a "patch" flag and low-frequency DCT features of the
  patch (brightness first, then gradients);
* latent tokens sit on a grid over the image and carry the position code of their grid cell and a "latent"
  flag; the first block's attention matches a latent to the patches around its cell (and never to other
  latents) and copies their content, and every other sub-layer is the identity;
* ``ln_post`` keeps only the content half, and ``conv_out`` (random, seeded, rows orthogonal to the all-ones
  vector so that the layer norm's mean shift drops out) projects its lowest-frequency features; with the
  random codebook an id is a quantised random projection of one region's coarse appearance (one region per id
  without the legacy reshape).
"""
from __future__ import annotations

import math

import torch
from torch import nn

SHARPNESS = 2.0  # attention logit scale on position agreement: a latent reads about two patches
LATENT_BOOST = 6.0  # extra logit for patch keys, so latents never attend to each other
CONTENT_SCALE = 0.25  # patch content stays small next to the position code, keeping attention positional
AC_GAIN = 4.0  # DCT gradients are weaker than brightness in natural images; lift them
CODE_FEATURES = 6  # ids see brightness and first/second-order gradients: coarse enough to be stable


def _position_code(rows: torch.Tensor, cols: torch.Tensor, frequencies: list[float]) -> torch.Tensor:
    """(N, 4 * len(frequencies)) cos/sin of row and column; dot products peak where positions agree."""
    parts = []
    for f in frequencies:
        parts += [torch.cos(f * rows), torch.sin(f * rows), torch.cos(f * cols), torch.sin(f * cols)]
    return torch.stack(parts, dim=-1)


def _dct_filters(count: int, size: int) -> torch.Tensor:
    """(count, size, size) 2-D DCT-II basis filters, lowest frequencies first; the first is the patch mean."""
    x = torch.arange(size, dtype=torch.float64)
    order = sorted(((u, v) for u in range(size) for v in range(size)), key=lambda uv: (uv[0] + uv[1], uv[0]))
    filters = []
    for u, v in order[:count]:
        f = torch.outer(torch.cos(math.pi * (x + 0.5) * u / size), torch.cos(math.pi * (x + 0.5) * v / size))
        filters.append(f / f.abs().sum() * (1.0 if (u, v) == (0, 0) else AC_GAIN))
    return torch.stack(filters)


def _latent_cells(num_latents: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (row, col) in patch units of a rows x cols grid of latents laid over a grid x grid image."""
    rows = max(1, int(math.sqrt(num_latents)))
    while num_latents % rows:
        rows -= 1
    cols = num_latents // rows
    index = torch.arange(num_latents, dtype=torch.float64)
    r = (torch.div(index, cols, rounding_mode="floor") + 0.5) * grid / rows - 0.5
    c = (index % cols + 0.5) * grid / cols - 0.5
    return r, c


@torch.no_grad()
def init_local_patches_(tokenizer: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite ``tokenizer``'s (a ``TiTokTokenizer``) weights in place as described in the module docstring."""
    cfg, enc = tokenizer.config, tokenizer.encoder
    width, heads, latents = cfg.width, cfg.heads, cfg.num_latent_tokens
    half, head_dim, grid = width // 2, width // heads, cfg.image_size // cfg.patch_size
    n_freq = (min(half, head_dim) - 2) // 4
    if width % 2 or half % heads or n_freq < 1:
        raise ValueError(f"local-patch TiTok init needs an even width with (width/2) divisible by heads and "
                         f"head width >= 6; got width {width}, heads {heads}")
    n_pos, patch_flag, latent_flag = 4 * n_freq, 4 * n_freq, 4 * n_freq + 1
    frequencies = [2 * math.pi * 2**k / (2 * grid) for k in range(n_freq)]
    generator = torch.Generator().manual_seed(seed)
    dtype = enc.positional_embedding.dtype

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(dtype))

    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    positions = torch.zeros(grid * grid + 1, width, dtype=torch.float64)  # row 0: the class token, left at zero
    positions[1:, :n_pos] = _position_code(rows.flatten(), cols.flatten(), frequencies)
    positions[1:, patch_flag] = 1.0
    put(enc.positional_embedding, positions)
    enc.class_embedding.zero_()

    content = CONTENT_SCALE * math.sqrt(half)
    patch_weight = torch.zeros(width, 3, cfg.patch_size, cfg.patch_size, dtype=torch.float64)
    patch_weight[half:] = _dct_filters(half, cfg.patch_size)[:, None] / 3.0 * content
    patch_bias = torch.zeros(width, dtype=torch.float64)
    patch_bias[half] = -0.5 * content  # mid-grey patches have zero brightness feature
    put(enc.patch_embed.weight, patch_weight)
    put(enc.patch_embed.bias, patch_bias)

    latent_rows, latent_cols = _latent_cells(latents, grid)
    latent_tokens = torch.zeros(latents, width, dtype=torch.float64)
    latent_tokens[:, :n_pos] = _position_code(latent_rows, latent_cols, frequencies)
    latent_tokens[:, latent_flag] = 1.0
    put(tokenizer.latent_tokens, latent_tokens)
    enc.latent_token_positional_embedding.zero_()

    enc.ln_pre.weight.fill_(1.0)
    enc.ln_pre.bias.zero_()
    enc.ln_post.weight.fill_(1.0)
    enc.ln_post.weight[:half] = 0.0  # a latent's position code is the same for every image: drop it
    enc.ln_post.bias.zero_()
    per_head = half // heads
    for number, block in enumerate(enc.transformer):
        for norm in (block.ln_1, block.ln_2):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        for layer in (block.mlp.c_fc, block.mlp.c_proj):
            layer.weight.zero_()
            layer.bias.zero_()
        in_proj = torch.zeros(3 * width, width, dtype=torch.float64)
        out_proj = torch.zeros(width, width, dtype=torch.float64)
        if number == 0:
            beta = SHARPNESS * math.sqrt(head_dim)
            for h in range(heads):
                q, k, v = h * head_dim, width + h * head_dim, 2 * width + h * head_dim
                in_proj[q:q + n_pos, :n_pos] = beta * torch.eye(n_pos)
                in_proj[q + n_pos, latent_flag] = beta * LATENT_BOOST
                in_proj[k:k + n_pos, :n_pos] = torch.eye(n_pos)
                in_proj[k + n_pos, patch_flag] = 1.0
                features = slice(half + h * per_head, half + (h + 1) * per_head)
                in_proj[v:v + per_head, features] = torch.eye(per_head)
                out_proj[features, h * head_dim:h * head_dim + per_head] = torch.eye(per_head)
        put(block.attn.in_proj_weight, in_proj)
        block.attn.in_proj_bias.zero_()
        put(block.attn.out_proj.weight, out_proj)
        block.attn.out_proj.bias.zero_()

    projection = torch.zeros(enc.conv_out.weight.shape[:2], dtype=torch.float64)
    seen = slice(half, half + min(CODE_FEATURES, half))
    projection[:, seen] = torch.randn(projection.shape[0], seen.stop - seen.start, generator=generator,
                                      dtype=torch.float64)
    projection[:, seen] -= projection[:, seen].mean(dim=1, keepdim=True)
    put(enc.conv_out.weight, projection[:, :, None, None])
    enc.conv_out.bias.zero_()
    codebook = tokenizer.quantize.embedding.weight
    put(codebook, torch.randn(codebook.shape, generator=generator, dtype=torch.float64))
    return tokenizer
