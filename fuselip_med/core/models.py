"""One model registry keyed by ``model.arch``: ``fuselip`` (early fusion) and the late-fusion baselines
``siglip_sf`` and ``siglip_mlf``.

The trainer's model build, ``load_model``/``save_pretrained`` and ``fuselip-med info`` all go through it. A
config.json carries ``arch`` for the baselines; a config without it (ours for FuseLIP, or a released one) is
a FuseLIP config.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.late_fusion import LATE_FUSION_ARCHS, LateFusion, LateFusionConfig
from fuselip_med.errors import InputError

ModelConfig = FuseLIPConfig | LateFusionConfig
"""The config of any registry arch."""

ARCHS = ("fuselip", *LATE_FUSION_ARCHS)
ARCH_HELP = "fuselip (early fusion), siglip_sf (score fusion baseline) or siglip_mlf (MagicLens fusion baseline)"


def check_arch(arch: str) -> str:
    """``arch`` itself, or ValueError naming the choices."""
    if arch not in ARCHS:
        raise InputError(f"Unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    return arch


def config_for(arch: str, size: str, **overrides: Any) -> FuseLIPConfig | LateFusionConfig:
    """The architecture preset of ``arch`` at ``size``; ValueError for an unknown arch or size."""
    if check_arch(arch) == "fuselip":
        return FuseLIPConfig.from_size(size, **overrides)
    return LateFusionConfig.from_size(arch, size, **overrides)


def config_from_dict(data: dict[str, Any]) -> FuseLIPConfig | LateFusionConfig:
    """A config.json's content -> the config of its ``arch`` (absent: FuseLIP, as in released checkpoints)."""
    arch = check_arch(str(data.get("arch", "fuselip")))
    return FuseLIPConfig.from_dict(data) if arch == "fuselip" else LateFusionConfig.from_dict(data)


def arch_of(config: FuseLIPConfig | LateFusionConfig) -> str:
    """``fuselip``, ``siglip_sf`` or ``siglip_mlf`` for a config built by this registry."""
    return config.arch if isinstance(config, LateFusionConfig) else "fuselip"


def build_from_config(config: FuseLIPConfig | LateFusionConfig) -> FuseLIP | LateFusion:
    """A freshly initialised model of the config's class."""
    return LateFusion(config) if isinstance(config, LateFusionConfig) else FuseLIP(config)


def image_size_of(config: FuseLIPConfig | LateFusionConfig) -> int:
    """Side in pixels of the square images the model reads (256 for every released size)."""
    return config.image_size if isinstance(config, LateFusionConfig) else config.titok.image_size


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Exact parameter counts by part: ``image``, ``text``, ``fusion``, ``trainable``, ``total``.

    Baselines: image tower, text tower, MLF fusion module (0 for SF). FuseLIP: ``image`` is the frozen TiTok
    tokenizer, ``text`` is 0 (there is no separate text tower) and ``fusion`` is the one early-fusion encoder
    (joint embeddings, transformer, ``ln_final``, MMM head, logit scale/bias).
    """
    if isinstance(model, LateFusion):
        return model.parameter_counts()
    image = sum(p.numel() for p in model.image_tokenizer.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {
        "image": image,
        "text": 0,
        "fusion": total - image,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": total,
    }
