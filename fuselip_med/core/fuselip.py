"""The FuseLIP early-fusion encoder: TiTok image codes and CLIP-BPE text ids in one bidirectional transformer.

Sequence layout, pooling and vocabulary follow the released FuseLIP models exactly (reference-facts.md §2):
image codes are offset past the text vocabulary (which includes ``[MASK]``), the image-only sequence is
``codes + [sot, eot]``, the fused sequence is ``codes + text row`` cut to the context length, padding (id 0)
is masked out of attention, and the embedding is the L2-normalised ``ln_final`` state at the first eot.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fuselip_med.core.hub import CONFIG_NAME, SAFETENSORS_NAME, HubModelMixin
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer
from fuselip_med.errors import InputError
from fuselip_med.vocab import (
    CLIP_BPE_VOCAB_SIZE,
    EOT_TOKEN_ID as EOT_ID,
    PAD_TOKEN_ID as PAD_ID,
    SOT_TOKEN_ID as SOT_ID,
    TEXT_VOCAB_SIZE,
)

TRANSFORMER_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (width, heads, layers)
    "tiny": (64, 2, 2),
    "small": (384, 6, 12),
    "base": (512, 8, 12),
    "large": (768, 12, 12),
}
IMAGE_TOKENIZER_FOR_SIZE = {
    "tiny": "tiny",
    "small": "yucornetto/tokenizer_titok_s128_imagenet",
    "base": "yucornetto/tokenizer_titok_bl128_vq8k_imagenet",
    "large": "yucornetto/tokenizer_titok_bl128_vq8k_imagenet",
}


@dataclass
class FuseLIPConfig:
    """Architecture of a FuseLIP model; the vocabulary layout is derived, never stored separately."""

    transformer_size: str = "small"
    width: int = 384
    heads: int = 6
    layers: int = 12
    mlp_ratio: float = 4.0
    context_length: int = 180
    text_vocab_size: int = TEXT_VOCAB_SIZE  # CLIP BPE 49,408 + [MASK]
    use_eoi: bool = False
    mlm_probability: float = 0.1
    image_tokenizer: str = "yucornetto/tokenizer_titok_s128_imagenet"
    titok: TiTokConfig = field(default_factory=TiTokConfig.s128)

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> "FuseLIPConfig":
        """The released architecture for ``small``/``base`` (or ``tiny`` for tests and the CPU demo)."""
        if size not in TRANSFORMER_SIZES:
            raise InputError(f"Unknown transformer size {size!r}; choose one of {sorted(TRANSFORMER_SIZES)}.")
        width, heads, layers = TRANSFORMER_SIZES[size]
        tokenizer_name = overrides.pop("image_tokenizer", IMAGE_TOKENIZER_FOR_SIZE[size])
        titok = overrides.pop("titok", None) or TiTokConfig.from_name(tokenizer_name)
        return cls(
            transformer_size=size, width=width, heads=heads, layers=layers,
            image_tokenizer=tokenizer_name, titok=titok, **overrides,
        )

    @property
    def codebook_size(self) -> int:
        return self.titok.codebook_size

    @property
    def num_image_tokens(self) -> int:
        return self.titok.num_latent_tokens

    @property
    def max_text_token(self) -> int:
        return self.text_vocab_size - 1

    @property
    def image_offset(self) -> int:
        """Id of image code 0: past ``[MASK]`` (49409 for the released models), and past eoi when used."""
        return self.max_text_token + 1 + int(self.use_eoi)

    @property
    def eoi_id(self) -> int:
        return self.max_text_token + 1

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.codebook_size + int(self.use_eoi)

    @property
    def mask_token_id(self) -> int:
        return self.text_vocab_size - 1

    def to_dict(self) -> dict[str, Any]:
        """Our config.json content: the reference's keys plus the TiTok architecture (needed for tiny models)."""
        data = asdict(self)
        data["model_name"] = "fuse-clip-titok"
        data["vocab_size"] = self.vocab_size
        data["mask_pad"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FuseLIPConfig":
        """Read our config.json or the released one (which recomputes the architecture from its size)."""
        size = data.get("transformer_size", "small")
        titok_data = data.get("titok")
        titok = (
            TiTokConfig(**titok_data)
            if isinstance(titok_data, dict)
            else TiTokConfig.from_name(data.get("image_tokenizer", IMAGE_TOKENIZER_FOR_SIZE.get(size, "s128")))
        )
        width, heads, layers = TRANSFORMER_SIZES.get(size, (data.get("width"), data.get("heads"), data.get("layers")))
        return cls(
            transformer_size=size,
            width=int(data.get("width", width)),
            heads=int(data.get("heads", heads)),
            layers=int(data.get("layers", layers)),
            mlp_ratio=float(data.get("mlp_ratio", 4.0)),
            context_length=int(data.get("context_length", 180)),
            text_vocab_size=int(data.get("text_vocab_size", TEXT_VOCAB_SIZE if data.get("mlm_probability", 0.1) > 0
                                                             else CLIP_BPE_VOCAB_SIZE)),
            use_eoi=bool(data.get("use_eoi", False)),
            mlm_probability=float(data.get("mlm_probability", 0.1)),
            image_tokenizer=str(data.get("image_tokenizer", IMAGE_TOKENIZER_FOR_SIZE.get(size, "s128"))),
            titok=titok,
        )

    def to_reference_dict(self) -> dict[str, Any]:
        """config.json in the released FuseLIP layout (reference-facts.md §3.1)."""
        return {
            "model_name": "fuse-clip-titok",
            "text_config": {
                "context_length": self.context_length, "vocab_size": self.vocab_size, "width": self.width,
                "heads": self.heads, "layers": self.layers, "mlp_ratio": self.mlp_ratio, "ls_init_value": None,
                "no_causal_mask": True, "pad_id": PAD_ID, "proj_bias": False, "output_tokens": False,
                "pool_type": "eot",
            },
            "mask_pad": True,
            "image_tokenizer": self.image_tokenizer,
            "use_eoi": self.use_eoi,
            "context_length": self.context_length,
            "transformer_size": self.transformer_size,
            "mlm_probability": self.mlm_probability,
            "rand_repl_probability": 0.0,
        }


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


class MaskPredictionHead(nn.Module):
    """MMM head: dense -> GELU -> LayerNorm -> tied token-embedding decoder + bias, over the joint vocabulary."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.layer_norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        hidden = self.layer_norm(F.gelu(self.dense(hidden)))
        return F.linear(hidden, embedding_weight, self.bias)


@dataclass
class EncoderOutput:
    """What one pass of the encoder gives: pooled embeddings and, for MMM, the pre-``ln_final`` states."""

    embeddings: torch.Tensor
    hidden: torch.Tensor
    input_ids: torch.Tensor


class FuseLIP(nn.Module, HubModelMixin, tags=["fuselip"]):
    """Early-fusion multimodal encoder embedding images, texts or image+text pairs into one space.

    Hub-native (``HubModelMixin``): ``FuseLIP.from_pretrained(hub_id_or_path)`` reads every layout
    ``load_model`` reads (released ``config.json + pytorch_model.bin`` with ``weights_only=True``, our
    ``config.json + model.safetensors``, official training ``.pt`` files); ``save_pretrained`` writes ours
    atomically; ``push_to_hub`` uploads it.
    """

    config_class = FuseLIPConfig

    def __init__(self, config: FuseLIPConfig, image_tokenizer: TiTokTokenizer | None = None):
        super().__init__()
        if config.use_eoi:
            raise ValueError("use_eoi=True FuseLIP variants were never released and are not supported.")
        self.config = config
        self.image_tokenizer = image_tokenizer if image_tokenizer is not None else TiTokTokenizer(config.titok)
        self.tokenizer = TextTokenizer(context_length=config.context_length, add_mask_token=True)
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(width, config.heads, config.layers, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.mask_prediction_head = MaskPredictionHead(width, config.vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """open_clip's text-tower initialisation (std 0.02 embeddings, depth-scaled projections)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_transformer(self.transformer, self.config.width, self.config.layers)

    # ----------------------------------------------------------------------------------------------------
    # properties
    @property
    def embed_dim(self) -> int:
        return self.config.width

    @property
    def device(self) -> torch.device:
        return self.positional_embedding.device

    def train(self, mode: bool = True) -> "FuseLIP":
        """Train mode for the encoder; the frozen image tokenizer always stays in eval mode."""
        super().train(mode)
        self.image_tokenizer.eval()
        return self

    # ----------------------------------------------------------------------------------------------------
    # sequence building
    def tokenize_text(self, texts: Sequence[str | None] | torch.Tensor) -> torch.Tensor:
        """Text rows (N, context_length): strings are tokenized, None becomes "", id tensors pass through."""
        if isinstance(texts, torch.Tensor):
            return texts.to(self.device, torch.long)
        return self.tokenizer([t if t is not None else "" for t in texts]).to(self.device)

    @torch.no_grad()
    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen TiTok code ids (B, 128) for pixels (B, 3, 256, 256) in [0, 1]."""
        return self.image_tokenizer.encode(pixels.to(self.device, torch.float32))

    def build_input_ids(
        self,
        text_ids: torch.Tensor | None,
        image_codes: torch.Tensor | None,
        has_image: torch.Tensor | None = None,
        has_text: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Joint-vocabulary ids for a batch of rows, each text-only, image-only or fused (§2.3).

        ``image_codes`` holds codebook ids (before the offset) for the rows where ``has_image`` is True, in
        order. Rows with an image and without text get the 130-token image-only sequence; the batch is
        right-padded with 0 and cut to the longest row (first eot + 1), which masking makes exact. The ids
        are built on ``device`` (default: the model's; the trainer builds them on the CPU, off the device queue).
        """
        ctx = self.config.context_length
        device = self.device if device is None else torch.device(device)
        if text_ids is None and image_codes is None:
            raise ValueError("encode needs images, texts or both.")
        batch = text_ids.shape[0] if text_ids is not None else image_codes.shape[0]
        if has_image is None:
            has_image = torch.full((batch,), image_codes is not None, dtype=torch.bool, device=device)
        if has_text is None:
            has_text = torch.full((batch,), text_ids is not None, dtype=torch.bool, device=device)
        has_image = has_image.to(device)
        has_text = has_text.to(device)
        if image_codes is not None and image_codes.shape[0] != int(has_image.sum()):
            raise ValueError(
                f"Got {image_codes.shape[0]} images for {int(has_image.sum())} rows marked as having one."
            )
        if text_ids is None:
            text_ids = torch.zeros(batch, ctx, dtype=torch.long, device=device)
        text_ids = text_ids.to(device, torch.long)
        n_img = self.config.num_image_tokens
        image_only_tail = torch.tensor([SOT_ID, EOT_ID], device=device)

        ids = torch.zeros(batch, ctx, dtype=torch.long, device=device)
        # text-only rows: the tokenizer row itself (cut to the context length)
        text_len = min(text_ids.shape[1], ctx)
        text_only = ~has_image
        ids[text_only, :text_len] = text_ids[text_only, :text_len]
        if has_image.any():
            codes = image_codes.to(device, torch.long) + self.config.image_offset
            image_rows = has_image.nonzero(as_tuple=True)[0]
            ids[image_rows, :n_img] = codes
            fused = has_text[image_rows]
            fused_rows = image_rows[fused]
            only_rows = image_rows[~fused]
            keep = ctx - n_img
            if fused_rows.numel():
                ids[fused_rows, n_img:] = F.pad(text_ids[fused_rows], (0, max(0, keep - text_ids.shape[1])))[:, :keep]
            if only_rows.numel():
                ids[only_rows, n_img : n_img + 2] = image_only_tail
        missing_eot = ~(ids == EOT_ID).any(dim=1)
        ids[missing_eot, ctx - 1] = EOT_ID
        longest = int((ids == EOT_ID).int().argmax(dim=1).max()) + 1
        return ids[:, :longest]

    def prepare_inputs(
        self,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        texts: Sequence[str | None] | torch.Tensor | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Turn user-facing inputs (pixels or cached code ids, strings or id rows) into joint-vocabulary ids."""
        codes, has_image = self._collect_codes(images, image_ids, image_mask)
        text_ids = self.tokenize_text(texts) if texts is not None else None
        has_text = None
        if texts is not None and not isinstance(texts, torch.Tensor):
            has_text = torch.tensor([t is not None for t in texts], dtype=torch.bool)
        if text_ids is not None and has_image is not None and has_image.shape[0] != text_ids.shape[0]:
            raise ValueError(f"Got {has_image.shape[0]} image rows but {text_ids.shape[0]} text rows.")
        return self.build_input_ids(text_ids, codes, has_image, has_text)

    def _collect_codes(self, images, image_ids, image_mask):
        if images is not None and image_ids is not None:
            raise ValueError("Pass either images (pixels) or image_ids (cached codes), not both.")
        given = images if images is not None else image_ids
        if given is None:
            return None, None
        to_codes = self.image_codes if images is not None else (lambda c: c.to(self.device, torch.long))
        if isinstance(given, torch.Tensor):
            has_image = (
                image_mask.to(torch.bool) if image_mask is not None
                else torch.ones(given.shape[0], dtype=torch.bool)
            )
            return (to_codes(given) if given.shape[0] else None), has_image
        has_image = torch.tensor([item is not None for item in given], dtype=torch.bool)
        present = [item for item in given if item is not None]
        if not present:
            return None, has_image
        return to_codes(torch.stack([p.to(self.device) for p in present])), has_image

    # ----------------------------------------------------------------------------------------------------
    # encoder
    def encode_ids(self, input_ids: torch.Tensor, normalize: bool = True) -> EncoderOutput:
        """Run the transformer on joint-vocabulary ids (B, L); pool at the first eot after ``ln_final``."""
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"Sequence of {length} ids exceeds the context length {self.config.context_length}.")
        x = self.token_embedding(input_ids) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        attend = (input_ids != PAD_ID)[:, None, None, :]
        hidden = self.transformer(x, attend)
        pooled_at = (input_ids == EOT_ID).int().argmax(dim=1)
        final = self.ln_final(hidden)
        embeddings = final[torch.arange(final.shape[0], device=final.device), pooled_at]
        if normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return EncoderOutput(embeddings=embeddings, hidden=hidden, input_ids=input_ids)

    def encode(
        self,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        texts: Sequence[str | None] | torch.Tensor | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Embed a batch (B, D): image-only, text-only or image+text rows, mixed freely.

        ``images``: (B, 3, 256, 256) pixels in [0, 1] or a list with None for rows without an image; with
        ``image_mask`` (B,) the tensor holds only the masked rows. ``image_ids``: cached TiTok code ids in
        place of pixels. ``texts``: strings (None = no text) or tokenizer rows (B, L).
        """
        input_ids = self.prepare_inputs(images, texts, image_mask=image_mask, image_ids=image_ids)
        return self.encode_ids(input_ids, normalize=normalize).embeddings

    def mask_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MMM logits over the joint vocabulary for hidden states (M, W) taken before ``ln_final``."""
        return self.mask_prediction_head(hidden, self.token_embedding.weight)

    # ----------------------------------------------------------------------------------------------------
    # reference-compatible entry points (chs20/fuselip API)
    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image-only embeddings: 128 codes + [sot, eot]."""
        return self.encode(images=image, normalize=normalize)

    def encode_text(self, text: torch.Tensor | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Text-only embeddings from tokenizer rows or strings."""
        return self.encode(texts=text, normalize=normalize)

    def encode_multimodal(
        self,
        image: torch.Tensor | Sequence[torch.Tensor | None] | None,
        text: torch.Tensor | Sequence[str],
        normalize: bool = True,
    ) -> torch.Tensor:
        """Fused embeddings: image codes followed by the whole text row (rows without image: text alone)."""
        text_ids = self.tokenize_text(text)
        codes, has_image = self._collect_codes(image, None, None)
        has_text = torch.ones(text_ids.shape[0], dtype=torch.bool)
        return self.encode_ids(self.build_input_ids(text_ids, codes, has_image, has_text), normalize).embeddings

    def forward(self, image=None, text=None, force_fused: bool = False):
        """Reference semantics: tensors -> image-only left vs text right; tuples -> fused left/right pairs."""
        if isinstance(image, tuple) or isinstance(text, tuple):
            images = image if isinstance(image, tuple) else (None, None)
            texts = text if isinstance(text, tuple) else (None, None)
            left = self.encode_multimodal(images[0], texts[0]) if texts[0] is not None else self.encode_image(images[0])
            right = (self.encode_multimodal(images[1], texts[1]) if texts[1] is not None
                     else self.encode_image(images[1]))
        elif force_fused:
            return self.encode_multimodal(image, text)
        else:
            left = self.encode_image(image) if image is not None else None
            right = self.encode_text(text) if text is not None else None
        return {
            "image_features": left,
            "text_features": right,
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }

    # ----------------------------------------------------------------------------------------------------
    def trainable_parameter_count(self) -> int:
        """Parameters that training updates (tied weights once; the frozen TiTok excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----------------------------------------------------------------------------------------------------
    # Hub I/O (save_pretrained / push_to_hub / from_pretrained come from HubModelMixin)
    @classmethod
    def read_pretrained(cls, path: Path) -> tuple[FuseLIPConfig, dict[str, torch.Tensor], str, str]:
        """(config, state dict, format, source) for all three layouts: see ``core.checkpoints.read_fuselip_files``."""
        from fuselip_med.core.checkpoints import read_fuselip_files  # the readers build on this module
        from fuselip_med.core.hub import CheckpointError

        config, state, fmt, source = read_fuselip_files(path)
        if not isinstance(config, FuseLIPConfig):
            raise CheckpointError(f"{source} is a {getattr(config, 'arch', type(config).__name__)} checkpoint, not "
                                  "FuseLIP; load it with fuselip_med.load_model or its own class.")
        return config, state, fmt, source

    @classmethod
    def hub_allow_patterns(cls) -> list[str]:
        """Files fetched from a hub repo: ours and the released ``pytorch_model.bin``."""
        return [CONFIG_NAME, SAFETENSORS_NAME, "pytorch_model.bin"]
