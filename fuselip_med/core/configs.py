"""The architecture configs of every model arch, and the registry functions that need no model class.

``model.arch`` picks the config: ``fuselip`` (early fusion, :class:`FuseLIPConfig`) or the late-fusion baselines
``siglip_sf``/``siglip_mlf`` (:class:`LateFusionConfig`). A config.json carries ``arch`` for the baselines; a config
without it (ours for FuseLIP, or a released one) is a FuseLIP config. Nothing here imports torch modules of the
models, so the checkpoint readers (``core.checkpoints``) and the model classes both build on this module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fuselip_med.core.titok import TiTokConfig
from fuselip_med.errors import InputError
from fuselip_med.vocab import (
    CLIP_BPE_VOCAB_SIZE,
    PAD_TOKEN_ID as PAD_ID,
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
        """Read our config.json or the released one (which recomputes the architecture from its size); one that
        names no architecture (neither ``transformer_size`` nor width/heads/layers, e.g. ``{}``) is a
        ``ValueError`` rather than a silent default size (reference-facts.md 3.1: both layouts carry it)."""
        if "transformer_size" not in data and not {"width", "heads", "layers"} <= data.keys():
            raise ValueError("it names no architecture (no transformer_size, nor width, heads and layers)")
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


LATE_FUSION_ARCHS = ("siglip_sf", "siglip_mlf")

# size: image (hidden, layers, heads, patch), text (width, heads, layers), embed_dim, fusion (width, heads, layers)
LATE_FUSION_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"image": (64, 2, 2, 32), "text": (64, 2, 2), "embed_dim": 64, "fusion": (64, 2, 2)},
    "small": {"image": (384, 12, 6, 16), "text": (384, 6, 12), "embed_dim": 384, "fusion": (384, 6, 4)},
    "base": {"image": (768, 12, 12, 16), "text": (512, 8, 12), "embed_dim": 512, "fusion": (512, 8, 4)},
}


@dataclass
class LateFusionConfig:
    """Architecture of a late-fusion baseline; ``arch`` selects the fusion (``siglip_sf`` or ``siglip_mlf``)."""

    arch: str = "siglip_sf"
    size: str = "small"
    image_size: int = 256
    patch_size: int = 16
    image_width: int = 384
    image_layers: int = 12
    image_heads: int = 6
    text_width: int = 384
    text_heads: int = 6
    text_layers: int = 12
    context_length: int = 180
    text_vocab_size: int = CLIP_BPE_VOCAB_SIZE  # CLIP BPE without [MASK]: no MMM for the baselines
    embed_dim: int = 384
    fusion_width: int = 384
    fusion_heads: int = 6
    fusion_layers: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.arch not in LATE_FUSION_ARCHS:
            raise InputError(f"Unknown late-fusion arch {self.arch!r}; choose one of {LATE_FUSION_ARCHS}.")
        if self.arch == "siglip_mlf" and self.fusion_width != self.embed_dim:
            raise ValueError(f"MLF fuses {self.embed_dim}-d embeddings, so fusion_width must be {self.embed_dim}.")

    @classmethod
    def from_size(cls, arch: str, size: str, **overrides: Any) -> "LateFusionConfig":
        """The paper's S/B baseline (ViT-S/16 or ViT-B/16, CLIP-S/B text) or ``tiny`` for tests and demos."""
        if size not in LATE_FUSION_SIZES:
            raise InputError(f"Unknown late-fusion size {size!r}; choose one of {sorted(LATE_FUSION_SIZES)}.")
        spec = LATE_FUSION_SIZES[size]
        image_width, image_layers, image_heads, patch = spec["image"]
        text_width, text_heads, text_layers = spec["text"]
        fusion_width, fusion_heads, fusion_layers = spec["fusion"]
        values = dict(
            arch=arch, size=size, patch_size=patch, image_width=image_width, image_layers=image_layers,
            image_heads=image_heads, text_width=text_width, text_heads=text_heads, text_layers=text_layers,
            embed_dim=spec["embed_dim"], fusion_width=fusion_width, fusion_heads=fusion_heads,
            fusion_layers=fusion_layers,
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """config.json content (``arch`` tells ``load_model`` which class to build)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LateFusionConfig":
        """Read a config.json written by ``to_dict``; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Late-fusion config has unknown keys {unknown}; expected a subset of {sorted(known)}.")
        return cls(**data)


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


def image_size_of(config: FuseLIPConfig | LateFusionConfig) -> int:
    """Side in pixels of the square images the model reads (256 for every released size)."""
    return config.image_size if isinstance(config, LateFusionConfig) else config.titok.image_size
