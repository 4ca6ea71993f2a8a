"""``fuselip-med info``: a model's architecture and exact parameter counts by part, from a checkpoint or a preset."""
from __future__ import annotations

import torch

from fuselip_med.core.checkpoints import read_checkpoint
from fuselip_med.core.configs import TRANSFORMER_SIZES, FuseLIPConfig, LateFusionConfig, arch_of, config_for
from fuselip_med.core.models import build_from_config, parameter_counts
from fuselip_med.errors import InputError

COUNT_PARTS = ("image", "text", "fusion", "trainable", "total")


def info_rows(model: str | None, arch: str | None = None, size: str | None = None,
              base: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    """(title, rows) describing a checkpoint (``model``) or the preset ``arch`` x ``size`` (no weights needed).

    ``model`` may also be a bare size (``tiny``/``small``/``base``: a FuseLIP preset, or of ``arch``). Counts
    are exact integers (``core.models.parameter_counts``). Raises CheckpointError for unreadable checkpoints
    and ValueError for an unknown arch or size, or for neither a model nor a size. A LoRA adapter folder is shown
    with its base model (the recorded one, or ``base``).
    """
    from fuselip_med.core.lora import is_adapter_dir, load_adapter_base, recorded_base

    adapter_rows: list[tuple[str, str]] = []
    if model is not None and is_adapter_dir(model):
        config, source = load_adapter_base(model, base).config, "LoRA adapter (PEFT)"
        adapter_rows = [("base model", str(base or recorded_base(model)[0]))]
        title = model
    elif model is not None and model not in TRANSFORMER_SIZES:
        config, _, source = read_checkpoint(model)
        title = model
    else:
        size = model or size
        if size is None:
            raise InputError("give a checkpoint, or a size with --size (and --arch for a baseline).")
        config, source = config_for(arch or "fuselip", size), "architecture preset (no weights)"
        title = f"{arch_of(config)} {size}"
    with torch.device("meta"):
        built = build_from_config(config)
    counts = parameter_counts(built)
    rows = [("arch", arch_of(config)), ("format", source), *adapter_rows, *_architecture_rows(config)]
    rows += [(f"parameters: {part}", f"{counts[part]:,}") for part in COUNT_PARTS]
    return f"Model: {title}", rows


def _architecture_rows(config: FuseLIPConfig | LateFusionConfig) -> list[tuple[str, str]]:
    if isinstance(config, LateFusionConfig):
        fusion = ("score fusion (normalised image + text, renormalised)" if config.arch == "siglip_sf" else
                  f"MagicLens: width {config.fusion_width}, heads {config.fusion_heads}, layers "
                  f"{config.fusion_layers}, attention pooling")
        return [
            ("image tower", f"ViT {config.image_size}px patch {config.patch_size}: width {config.image_width}, "
                            f"heads {config.image_heads}, layers {config.image_layers}"),
            ("text tower", f"width {config.text_width}, heads {config.text_heads}, layers {config.text_layers}, "
                           f"context {config.context_length}, vocabulary {config.text_vocab_size}"),
            ("fusion", fusion),
            ("embedding dim", str(config.embed_dim)),
        ]
    titok = config.titok
    return [
        ("transformer", f"{config.transformer_size}: width {config.width}, heads {config.heads}, "
                        f"layers {config.layers}"),
        ("embedding dim", str(config.width)),
        ("context length", str(config.context_length)),
        ("image tokenizer", f"{config.image_tokenizer} (codebook {titok.codebook_size}, {titok.num_latent_tokens} "
                            f"tokens, width {titok.width}, layers {titok.layers}, legacy reshape {titok.is_legacy})"),
        ("vocabulary", f"{config.vocab_size} = text {config.text_vocab_size} (incl. [MASK] {config.mask_token_id}) "
                       f"+ image codes {config.image_offset}..{config.vocab_size - 1}"),
        ("MMM mask probability", str(config.mlm_probability)),
    ]
