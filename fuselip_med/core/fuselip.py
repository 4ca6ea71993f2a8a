"""The FuseLIP early-fusion encoder: TiTok image codes and CLIP-BPE text ids in one bidirectional transformer.

Sequence layout, pooling and vocabulary follow the released FuseLIP models exactly (reference-facts.md §2):
image codes are offset past the text vocabulary (which includes ``[MASK]``), the image-only sequence is
``codes + [sot, eot]``, the fused sequence is ``codes + text row`` cut to the context length, padding (id 0)
is masked out of attention, and the embedding is the L2-normalised ``ln_final`` state at the first eot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fuselip_med.core.blocks import Transformer, init_transformer
from fuselip_med.core.configs import FuseLIPConfig
from fuselip_med.core.pretrained import HubModelMixin
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.core.titok import TiTokTokenizer
from fuselip_med.vocab import EOT_TOKEN_ID as EOT_ID, PAD_TOKEN_ID as PAD_ID, SOT_TOKEN_ID as SOT_ID


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


class JointInputs:
    """Building joint-vocabulary ids from user-facing inputs, shared by every runtime of the FuseLIP encoder.

    The host class provides ``config`` (``FuseLIPConfig``), ``device``, ``tokenizer`` (``TextTokenizer``) and
    ``image_codes(pixels [B, 3, S, S] float32) -> [B, 128] int64``: ``FuseLIP`` (PyTorch) and
    ``export.runtime.OnnxFuseLIP`` (ONNX Runtime) build the same sequences (reference-facts.md 2.3).
    """

    def tokenize_text(self, texts: Sequence[str | None] | torch.Tensor) -> torch.Tensor:
        """Text rows (N, context_length): strings are tokenized, None becomes "", id tensors pass through."""
        if isinstance(texts, torch.Tensor):
            return texts.to(self.device, torch.long)
        return self.tokenizer([t if t is not None else "" for t in texts]).to(self.device)

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
        No rows give ``[0, 1]`` (a process whose share of a global batch is empty still runs the step).
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
        if batch == 0:  # an empty share of a global batch (more processes than rows): [0, 1]
            return ids[:, :1]
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


class FuseLIP(nn.Module, JointInputs, HubModelMixin, tags=["fuselip"]):
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
    # image codes
    @torch.no_grad()
    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen TiTok code ids (B, 128) for pixels (B, 3, 256, 256) in [0, 1]."""
        return self.image_tokenizer.encode(pixels.to(self.device, torch.float32))

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
