"""The model registry keyed by ``model.arch``: the class of each config (``fuselip`` -> ``FuseLIP``, the
late-fusion baselines ``siglip_sf``/``siglip_mlf`` -> ``LateFusion``) and exact parameter counts by part.

The configs and the arch names live in ``core.configs``; the trainer's model build, ``core.loading.load_model``
and ``fuselip-med info`` build through :func:`build_from_config`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fuselip_med.core.configs import FuseLIPConfig, LateFusionConfig
from fuselip_med.core.fuselip import FuseLIP

if TYPE_CHECKING:
    from fuselip_med.core.late_fusion import LateFusion

__all__ = ["build_from_config", "parameter_counts"]


def build_from_config(config: FuseLIPConfig | LateFusionConfig) -> FuseLIP | LateFusion:
    """A freshly initialised model of the config's class. The baselines' module (which imports the
    ``transformers`` CLIP vision tower, seconds at start-up) is imported only when a baseline is built."""
    if isinstance(config, LateFusionConfig):
        from fuselip_med.core.late_fusion import LateFusion

        return LateFusion(config)
    return FuseLIP(config)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Exact parameter counts by part: ``image``, ``text``, ``fusion``, ``trainable``, ``total``.

    Baselines: image tower, text tower, MLF fusion module (0 for SF). FuseLIP: ``image`` is the frozen TiTok
    tokenizer, ``text`` is 0 (there is no separate text tower) and ``fusion`` is the one early-fusion encoder
    (joint embeddings, transformer, ``ln_final``, MMM head, logit scale/bias).
    """
    if isinstance(getattr(model, "config", None), LateFusionConfig):
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
