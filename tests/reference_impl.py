"""An independent FuseLIP forward written from reference-facts.md, on released-format state dicts.

It uses ``torch.nn.MultiheadAttention`` with the packed in-projection (as the reference code does) and
plain tensor ops elsewhere, so agreement with ``fuselip_med.core.fuselip`` checks our key mapping, sequence
layout, masking and pooling against a second reading of the spec rather than against itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SOT, EOT, IMAGE_OFFSET = 49406, 49407, 49409

# Released key table (reference-facts.md §3.2), per transformer block.
BLOCK_KEYS = {
    "ln_1.weight": lambda w: (w,), "ln_1.bias": lambda w: (w,),
    "attn.in_proj_weight": lambda w: (3 * w, w), "attn.in_proj_bias": lambda w: (3 * w,),
    "attn.out_proj.weight": lambda w: (w, w), "attn.out_proj.bias": lambda w: (w,),
    "ln_2.weight": lambda w: (w,), "ln_2.bias": lambda w: (w,),
    "mlp.c_fc.weight": lambda w: (4 * w, w), "mlp.c_fc.bias": lambda w: (4 * w,),
    "mlp.c_proj.weight": lambda w: (w, 4 * w), "mlp.c_proj.bias": lambda w: (w,),
}


def released_text_tower_shapes(width: int, layers: int, vocab: int, context: int = 180) -> dict[str, tuple]:
    """Names and shapes of every non-TiTok key of a released FuseLIP state dict."""
    shapes: dict[str, tuple] = {"positional_embedding": (context, width), "logit_scale": (), "logit_bias": ()}
    for i in range(layers):
        for name, shape in BLOCK_KEYS.items():
            shapes[f"transformer.resblocks.{i}.{name}"] = shape(width)
    shapes.update({
        "token_embedding.weight": (vocab, width),
        "ln_final.weight": (width,), "ln_final.bias": (width,),
        "mask_prediction_head.bias": (vocab,),
        "mask_prediction_head.dense.weight": (width, width), "mask_prediction_head.dense.bias": (width,),
        "mask_prediction_head.layer_norm.weight": (width,), "mask_prediction_head.layer_norm.bias": (width,),
        "mask_prediction_head.decoder.weight": (vocab, width),
    })
    return shapes


def titok_shapes(width: int, layers: int, token_size: int, codebook: int, patches: int = 256,
                 latents: int = 128) -> dict[str, tuple]:
    """Names and shapes of the TiTok encoder + quantizer keys (reference-facts.md §1.6), without prefix."""
    shapes: dict[str, tuple] = {
        "latent_tokens": (latents, width),
        "encoder.class_embedding": (1, width),
        "encoder.positional_embedding": (patches + 1, width),
        "encoder.latent_token_positional_embedding": (latents, width),
        "encoder.patch_embed.weight": (width, 3, 16, 16), "encoder.patch_embed.bias": (width,),
        "encoder.ln_pre.weight": (width,), "encoder.ln_pre.bias": (width,),
    }
    for i in range(layers):
        for name, shape in BLOCK_KEYS.items():
            shapes[f"encoder.transformer.{i}.{name}"] = shape(width)
    shapes.update({
        "encoder.ln_post.weight": (width,), "encoder.ln_post.bias": (width,),
        "encoder.conv_out.weight": (token_size, width, 1, 1), "encoder.conv_out.bias": (token_size,),
        "quantize.embedding.weight": (codebook, token_size),
    })
    return shapes


def random_released_state_dict(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the given key table, with LayerNorm-ish values and the decoder tied."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight", "ln_pre.weight", "ln_post.weight",
                         "layer_norm.weight")):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key == "logit_scale":
            state[key] = torch.tensor(2.302585)
        elif key == "logit_bias":
            state[key] = torch.tensor(-10.0)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=generator)
    if "mask_prediction_head.decoder.weight" in state:
        state["mask_prediction_head.decoder.weight"] = state["token_embedding.weight"]
    return state


def reference_sequences(text_rows: torch.Tensor | None, codes: torch.Tensor | None, context: int = 180) -> torch.Tensor:
    """Input ids as the reference builds them: text-only rows, image-only (codes+[sot,eot]) or fused."""
    if codes is None:
        ids = text_rows.clone()
    elif text_rows is None:
        tail = torch.tensor([SOT, EOT]).expand(codes.shape[0], 2)
        ids = torch.cat([codes + IMAGE_OFFSET, tail], dim=1)
    else:
        ids = torch.cat([codes + IMAGE_OFFSET, text_rows], dim=1)[:, :context]
        no_eot = ~(ids == EOT).any(dim=1)
        ids[no_eot, context - 1] = EOT
    return ids


def reference_embed(state: dict[str, torch.Tensor], ids: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference text tower on ids: length cut, pad mask, MHA blocks, ln_final, first-eot pooling, L2."""
    longest = int((ids == EOT).int().argmax(dim=1).max()) + 1
    ids = ids[:, :longest]
    width = state["positional_embedding"].shape[1]
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    pad = ids == 0
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        attention.load_state_dict({
            "in_proj_weight": state[p + "attn.in_proj_weight"], "in_proj_bias": state[p + "attn.in_proj_bias"],
            "out_proj.weight": state[p + "attn.out_proj.weight"], "out_proj.bias": state[p + "attn.out_proj.bias"],
        })
        attention.eval()
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        with torch.no_grad():
            x = x + attention(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"])
    pooled = x[torch.arange(x.shape[0]), (ids == EOT).int().argmax(dim=1)]
    return F.normalize(pooled, dim=-1)
