"""The paper's late-fusion baselines: a CLIP-style dual encoder with score fusion (SigLIP-SF) or MagicLens
fusion (SigLIP-MLF), trained with the SigLIP sigmoid loss only (FuseLIP paper, Schlarmann et al. 2025, §4
"Baselines" and Table 2).

Towers:
- image: the CLIP-style ViT of the official code (open_clip ``VisionTransformer``: patch convolution without bias,
  class and positional embeddings, ``ln_pre`` before the transformer, ``ln_post`` on the class token, a bias-free
  projection ``proj``), built as ``transformers``' ``CLIPVisionModel`` (configured from scratch; its
  ``pre_layrnorm``/``post_layernorm`` are ``ln_pre``/``ln_post``) on 256 × 256 pixels in [0, 1] (normalised with
  mean 0.5 / std 0.5 as in SigLIP);
- text: a CLIP text transformer (token embedding 49,408 × width, positional embedding 180 × width, pre-norm
  blocks, ``ln_final``, bias-free ``text_projection``) with bidirectional attention, padding (id 0) masked out,
  pooled at the first eot token, on the project's CLIP BPE ids (``core.text_tokenizer``).

Fusion of one row (image embedding u, text embedding v, both un-normalised, dimension D):
- SF: ``normalize(normalize(u) + normalize(v))`` for image+text rows, ``normalize(u)`` for image-only rows
  and ``normalize(v)`` for text-only rows;
- MLF: a 4-layer transformer (width D = 384 / 6 heads for S, 512 / 8 heads for B) over the two tokens
  ``[u, v]``, then the official MagicLens attention pooling (``AttentionalPoolerMagicLens`` of the FuseLIP code's
  ``feature_fuse_clip.py``): one learned query, multi-head attention over the tokens, a LayerNorm on its output;
  ``u = 0`` when the row has no image, ``v`` is the text tower's embedding of the empty text when it has none.

With these shapes the parameter counts are the official code's (its ``ViT-{S,B}-16-256-180-mask`` configurations
and MagicLens fusion; exact integers in ``tests/test_late_fusion.py``): image 21,836,544 / 86,238,720, text
40,483,584 / 63,480,832, fusion 7,690,368 / 13,661,696 for S / B, which the paper's Table 2 rounds to 0.1 M.
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fuselip_med.core.blocks import Transformer, init_transformer
from fuselip_med.core.configs import LateFusionConfig
from fuselip_med.core.pretrained import HubModelMixin
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.vocab import EOT_TOKEN_ID as EOT_ID, PAD_TOKEN_ID as PAD_ID, SOT_TOKEN_ID as SOT_ID

# LoRA target names (the recipe's model.lora.targets, FuseLIP's module names) -> CLIPVisionModel's module names
# (encoder.layers.N.self_attn.q_proj, encoder.layers.N.mlp.fc1)
VIT_LORA_NAMES: dict[str, str] = {
    "q_proj": r"self_attn\.q_proj",
    "k_proj": r"self_attn\.k_proj",
    "v_proj": r"self_attn\.v_proj",
    "out_proj": r"self_attn\.out_proj",
    "c_fc": r"mlp\.fc1",
    "c_proj": r"mlp\.fc2",
}
POOL_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")
PIXEL_MEAN = 0.5  # SigLIP image normalisation (open_clip OPENAI/INCEPTION-style mean = std = 0.5)
PIXEL_STD = 0.5


def vision_config(config: LateFusionConfig) -> CLIPVisionConfig:
    """The ``transformers`` configuration of the CLIP-style image tower: exact GELU and LayerNorm eps 1e-5 as
    open_clip's ``VisionTransformer`` (``nn.GELU``, ``nn.LayerNorm``), no dropout."""
    return CLIPVisionConfig(
        hidden_size=config.image_width, num_hidden_layers=config.image_layers, num_attention_heads=config.image_heads,
        intermediate_size=int(config.image_width * config.mlp_ratio), hidden_act="gelu", attention_dropout=0.0,
        layer_norm_eps=1e-5, image_size=config.image_size, patch_size=config.patch_size, num_channels=3,
        attn_implementation="sdpa",
    )


class ImageTower(nn.Module):
    """CLIP-style ViT (``CLIPVisionModel``: ``ln_pre``, ``ln_post`` on the class token) + the bias-free projection
    ``proj`` to ``embed_dim`` (open_clip ``VisionTransformer``)."""

    def __init__(self, config: LateFusionConfig):
        super().__init__()
        self.vit = CLIPVisionModel(vision_config(config))
        self.proj = nn.Linear(config.image_width, config.embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=config.image_width**-0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float pixels in [0, 1] -> (N, embed_dim) un-normalised embeddings."""
        pixel_values = (pixels - PIXEL_MEAN) / PIXEL_STD
        pooled = self.vit(pixel_values=pixel_values.to(self.proj.weight.dtype)).pooler_output  # ln_post(class)
        return self.proj(pooled)


class TextTower(nn.Module):
    """CLIP text transformer with bidirectional attention and padding mask, pooled at the first eot."""

    def __init__(self, config: LateFusionConfig):
        super().__init__()
        width, layers = config.text_width, config.text_layers
        self.context_length = config.context_length
        self.token_embedding = nn.Embedding(config.text_vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(width, config.text_heads, layers, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, config.embed_dim, bias=False)
        # open_clip's text-tower initialisation, as FuseLIP.reset_parameters
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_transformer(self.transformer, width, layers)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) int64 CLIP BPE rows (L <= 180, 0-padded, with an eot) -> (N, embed_dim) embeddings."""
        positions = self.positional_embedding[: text_ids.shape[1]].to(self.token_embedding.weight.dtype)
        x = self.token_embedding(text_ids) + positions
        hidden = self.transformer(x, (text_ids != PAD_ID)[:, None, None, :])
        pooled_at = (text_ids == EOT_ID).int().argmax(dim=1)
        final = self.ln_final(hidden)
        return self.text_projection(final[torch.arange(final.shape[0], device=final.device), pooled_at])


class AttentionPool(nn.Module):
    """MagicLens attention pooling with one learned query (the official ``AttentionalPoolerMagicLens``: multi-head
    attention of the query over the tokens, then ``pool_attn_ln``, a LayerNorm on its output), written with
    separate q/k/v/out linears (the same parameters as ``nn.MultiheadAttention``'s packed in-projection) so LoRA
    can target them."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, width) * width**-0.5)
        self.ln = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, W) tokens -> (N, W) pooled."""
        batch, length, width = tokens.shape
        head_dim = width // self.heads
        q = self.q_proj(self.query).view(1, self.heads, 1, head_dim).expand(batch, -1, -1, -1)
        k = self.k_proj(tokens).view(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(tokens).view(batch, length, self.heads, head_dim).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (N, heads, 1, head_dim)
        return self.ln(self.out_proj(pooled.reshape(batch, width)))


class MagicLensFusion(nn.Module):
    """MLF: a transformer over the tokens ``[image embedding, text embedding]`` followed by attention pooling."""

    def __init__(self, config: LateFusionConfig):
        super().__init__()
        self.transformer = Transformer(config.fusion_width, config.fusion_heads, config.fusion_layers, config.mlp_ratio)
        self.pool = AttentionPool(config.fusion_width, config.fusion_heads)
        init_transformer(self.transformer, config.fusion_width, config.fusion_layers)

    def forward(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) image and (N, D) text embeddings (un-normalised) -> (N, D) fused, un-normalised."""
        tokens = torch.stack([image_embeddings, text_embeddings], dim=1)
        return self.pool(self.transformer(tokens, None))


def score_fusion(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, has_image: torch.Tensor,
                 has_text: torch.Tensor) -> torch.Tensor:
    """SF of un-normalised (N, D) tower outputs -> (N, D) L2-normalised rows.

    Image+text rows: ``normalize(normalize(u) + normalize(v))``; image-only rows: ``normalize(u)``; rows
    without an image: ``normalize(v)``. ``has_image``/``has_text``: (N,) bool.
    """
    image_n = F.normalize(image_embeddings, dim=-1)
    text_n = F.normalize(text_embeddings, dim=-1)
    fused = F.normalize(image_n + text_n, dim=-1)
    with_image = torch.where(has_text[:, None], fused, image_n)
    return torch.where(has_image[:, None], with_image, text_n)


class LateFusion(nn.Module, HubModelMixin, tags=["siglip"]):
    """SigLIP-SF / SigLIP-MLF dual encoder embedding images, texts or image+text pairs into one space.

    The same surface as ``FuseLIP``: ``encode(images=, texts=)`` over mixed batches, ``logit_scale`` /
    ``logit_bias`` for the sigmoid loss, Hub I/O from ``HubModelMixin`` (``save_pretrained`` writes config.json +
    model.safetensors atomically; ``from_pretrained``; ``push_to_hub``). No MMM head.
    """

    config_class = LateFusionConfig

    def __init__(self, config: LateFusionConfig):
        super().__init__()
        self.config = config
        self.tokenizer = TextTokenizer(context_length=config.context_length, add_mask_token=False)
        self.image_tower = ImageTower(config)
        self.text_tower = TextTower(config)
        self.fusion = MagicLensFusion(config) if config.arch == "siglip_mlf" else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP init: t = 10, b = -10
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ----------------------------------------------------------------------------------------------------
    def tokenize_text(self, texts: Sequence[str | None] | torch.Tensor) -> torch.Tensor:
        """Text rows (N, L) int64: strings are tokenized (None -> ""), id tensors pass through."""
        if isinstance(texts, torch.Tensor):
            return texts.to(self.device, torch.long)
        return self.tokenizer([t if t is not None else "" for t in texts]).to(self.device)

    def _pixels(self, images, image_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixels of the rows with an image, has_image (N,) bool) from a tensor or a list with None rows."""
        if images is None:
            return None, None
        if isinstance(images, torch.Tensor):
            has_image = (image_mask.to(torch.bool) if image_mask is not None
                         else torch.ones(images.shape[0], dtype=torch.bool))
            return (images if images.shape[0] else None), has_image.to(self.device)
        has_image = torch.tensor([item is not None for item in images], dtype=torch.bool, device=self.device)
        present = [item.to(self.device) for item in images if item is not None]
        return (torch.stack(present) if present else None), has_image

    def encode(
        self,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        texts: Sequence[str | None] | torch.Tensor | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Embed a batch (B, D) float: image-only, text-only or image+text rows, mixed freely.

        ``images``: (B, 3, 256, 256) float pixels in [0, 1], or a list with None for rows without an image; with
        ``image_mask`` (B,) bool the tensor holds only the masked rows. ``texts``: strings (None = no text) or
        tokenizer rows (B, L) int64, where a row with nothing between sot and eot counts as no text.
        ``normalize=False`` returns the un-normalised MLF output (SF is normalised by construction).
        Raises ValueError for ``image_ids`` (these models read pixels, not TiTok codes), for neither input, and
        for row counts that disagree.
        """
        if image_ids is not None:
            raise ValueError("Late-fusion models embed pixels; pass images=, not cached TiTok image_ids.")
        if images is None and texts is None:
            raise ValueError("encode needs images, texts or both.")
        pixels, has_image = self._pixels(images, image_mask)
        if texts is not None:
            text_ids = self.tokenize_text(texts)
            if isinstance(texts, torch.Tensor):
                has_text = text_ids[:, 1] != EOT_ID  # [sot, eot, pad...] is the empty text
            else:
                has_text = torch.tensor([t is not None and t != "" for t in texts], dtype=torch.bool,
                                        device=self.device)
        else:
            rows = has_image.shape[0]
            text_ids = torch.zeros(rows, 2, dtype=torch.long, device=self.device)
            text_ids[:, 0], text_ids[:, 1] = SOT_ID, EOT_ID
            has_text = torch.zeros(rows, dtype=torch.bool, device=self.device)
        if has_image is None:
            has_image = torch.zeros(text_ids.shape[0], dtype=torch.bool, device=self.device)
        if has_image.shape[0] != text_ids.shape[0]:
            raise ValueError(f"Got {has_image.shape[0]} image rows but {text_ids.shape[0]} text rows.")
        if pixels is not None and pixels.shape[0] != int(has_image.sum()):
            raise ValueError(f"Got {pixels.shape[0]} images for {int(has_image.sum())} rows marked as having one.")
        return self.fuse(self.embed_images(pixels, has_image), self.embed_texts(text_ids), has_image, has_text,
                         normalize)

    def embed_images(self, pixels: torch.Tensor | None, has_image: torch.Tensor) -> torch.Tensor:
        """(B, D) image-tower outputs, zero rows where ``has_image`` is False; ``pixels`` holds the True rows."""
        out = torch.zeros(has_image.shape[0], self.config.embed_dim, device=self.device,
                          dtype=self.logit_scale.dtype)
        if pixels is None:
            return out
        embedded = self.image_tower(pixels.to(self.device))
        return out.to(embedded.dtype).index_put((has_image.nonzero(as_tuple=True)[0],), embedded)

    def embed_texts(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) text-tower outputs for (B, L) rows, cut to the longest row (first eot + 1)."""
        text_ids = text_ids.to(self.device, torch.long)
        missing_eot = ~(text_ids == EOT_ID).any(dim=1)
        if bool(missing_eot.any()):
            text_ids = text_ids.clone()
            text_ids[missing_eot, min(text_ids.shape[1], self.config.context_length) - 1] = EOT_ID
        longest = int((text_ids == EOT_ID).int().argmax(dim=1).max()) + 1
        if longest > self.config.context_length:
            raise ValueError(f"Text rows of {longest} ids exceed the context length {self.config.context_length}.")
        return self.text_tower(text_ids[:, :longest])

    def fuse(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, has_image: torch.Tensor,
             has_text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Tower outputs (B, D) -> (B, D) row embeddings by SF or MLF (see the module docstring)."""
        if self.fusion is None:
            return score_fusion(image_embeddings, text_embeddings, has_image, has_text)
        image_embeddings = image_embeddings * has_image[:, None].to(image_embeddings.dtype)  # zero image rule
        fused = self.fusion(image_embeddings, text_embeddings.to(image_embeddings.dtype))
        return F.normalize(fused, dim=-1) if normalize else fused

    # ----------------------------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image-only embeddings (B, D) for (B, 3, 256, 256) pixels in [0, 1]."""
        return self.encode(images=image, normalize=normalize)

    def encode_text(self, text: torch.Tensor | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Text-only embeddings (B, D) from strings or tokenizer rows."""
        return self.encode(texts=text, normalize=normalize)

    @staticmethod
    def lora_target_pattern(targets: Sequence[str]) -> str:
        """A PEFT ``target_modules`` regex selecting the attention/MLP linears named in ``targets`` (FuseLIP's
        names: q_proj, k_proj, v_proj, out_proj, c_fc, c_proj) in the ViT blocks, the text transformer, the
        MLF fusion transformer and the MLF pooling attention. Raises ValueError for unknown or no targets."""
        unknown = sorted(set(targets) - set(VIT_LORA_NAMES))
        if unknown or not targets:
            raise ValueError(f"LoRA targets {unknown or list(targets)} not understood; "
                             f"choose from {sorted(VIT_LORA_NAMES)}.")
        vit = "|".join(VIT_LORA_NAMES[target] for target in targets)
        attn = [t for t in targets if t in POOL_LORA_NAMES]
        mlp = [t for t in targets if t not in POOL_LORA_NAMES]
        blocks = ([rf"attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
        alternatives = [
            rf"image_tower\.vit\.(vision_model\.)?encoder\.layers\.\d+\.({vit})",
            rf"(text_tower|fusion)\.transformer\.resblocks\.\d+\.({'|'.join(blocks)})",
        ] + ([rf"fusion\.pool\.({'|'.join(attn)})"] if attn else [])
        return rf"^(.*\.)?({'|'.join(alternatives)})$"

    def parameter_counts(self) -> dict[str, int]:
        """Exact parameter counts by part: image tower, text tower, fusion (MLF only), trainable and total."""
        def count(module: nn.Module | None) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        return {
            "image": count(self.image_tower),
            "text": count(self.text_tower),
            "fusion": count(self.fusion),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "total": count(self),
        }

