"""Load and save model weights: FuseLIP's released hub layout, official training checkpoints, and our safetensors
layout for every arch of the model registry (``core.models``: fuselip, siglip_sf, siglip_mlf).

Every format is mapped onto our module names and loaded strictly. Only ``safetensors`` and
``torch.load(weights_only=True)`` are used, so nothing in a checkpoint is ever executed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fuselip_med.core.fuselip import TRANSFORMER_SIZES, FuseLIP, FuseLIPConfig
from fuselip_med.core.hub import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    HubModelMixin,
    config_from_file,
    first_line,
    load_state_strict,
    read_json,
    read_safetensors,
    read_torch_weights,
    resolve_pretrained,
    write_directory_atomically,
)
from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.core.models import ModelConfig, arch_of, build_from_config, config_for, config_from_dict, image_size_of
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.core.titok import TiTokConfig

REFERENCE_WEIGHTS_NAME = "pytorch_model.bin"
TRAINING_RUN_CONFIG = "fuse-clip-config.json"
TIED_DECODER_KEY = "mask_prediction_head.decoder.weight"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DROPPED_REFERENCE_PATTERNS = ("image_tokenizer.model.pixel_", "image_tokenizer.model.decoder")
_IN_PROJ = re.compile(r"^(transformer\.resblocks\.\d+\.attn\.)in_proj_(weight|bias)$")


__all__ = [
    "CheckpointError", "build_model", "export_reference", "infer_config", "load_model", "load_state_strict",
    "ours_to_reference", "read_checkpoint", "read_fuselip_files", "reference_to_ours", "save_pretrained",
]


# --------------------------------------------------------------------------------------------------------
# key mapping between the released names and ours
def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, however nested."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            key = key.replace("._orig_mod.", ".")
        cleaned[key] = value
    return cleaned


def reference_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map released FuseLIP names onto ours: split packed q/k/v, drop the tied decoder copy, un-nest TiTok."""
    state_dict = strip_wrapper_prefixes(state_dict)
    ours: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(DROPPED_REFERENCE_PATTERNS):
            continue
        if key == TIED_DECODER_KEY:
            embedding = state_dict.get("token_embedding.weight")
            if embedding is not None and not torch.equal(embedding, value):
                raise CheckpointError(
                    f"{TIED_DECODER_KEY} differs from token_embedding.weight; they must be the same tied tensor."
                )
            continue
        match = _IN_PROJ.match(key)
        if match:
            prefix, kind = match.groups()
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                ours[f"{prefix}{name}.{kind}"] = chunk.contiguous()
            continue
        if key.startswith("image_tokenizer.model."):
            key = "image_tokenizer." + key[len("image_tokenizer.model."):]
        ours[key] = value
    return ours


def ours_to_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``reference_to_ours``: the released key names, packed in-projections and tied decoder."""
    reference: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = re.match(r"^(transformer\.resblocks\.\d+\.attn\.)(q|k|v)_proj\.(weight|bias)$", key)
        if match:
            prefix, which, kind = match.groups()
            packed.setdefault(f"{prefix}in_proj_{kind}", {})[which] = value
            continue
        if key.startswith("image_tokenizer."):
            key = "image_tokenizer.model." + key[len("image_tokenizer."):]
        reference[key] = value
    for key, parts in packed.items():
        reference[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    reference[TIED_DECODER_KEY] = reference["token_embedding.weight"]
    return reference


# --------------------------------------------------------------------------------------------------------
# config inference for checkpoints without a usable config.json
def infer_config(state_dict: dict[str, torch.Tensor]) -> FuseLIPConfig:
    """Recover the architecture of a released-size model from its weight shapes (training checkpoints)."""
    try:
        width = state_dict["positional_embedding"].shape[1]
        vocab = state_dict["token_embedding.weight"].shape[0]
        codebook = state_dict["image_tokenizer.quantize.embedding.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"Cannot infer the architecture: the state dict has no {missing} entry.") from None
    size = next((name for name, dims in TRANSFORMER_SIZES.items() if dims[0] == width and name != "tiny"), None)
    titok_name = {4096: "s128", 8192: "bl128_vq8k"}.get(codebook)
    if size is None or titok_name is None:
        raise CheckpointError(
            f"No released FuseLIP size has width {width} and codebook {codebook}; save this model with "
            "save_pretrained so its config.json travels with it."
        )
    config = FuseLIPConfig.from_size(size, titok=TiTokConfig.from_name(titok_name))
    if config.vocab_size != vocab:
        raise CheckpointError(f"token_embedding has {vocab} rows but the inferred vocabulary is {config.vocab_size}.")
    return config


# --------------------------------------------------------------------------------------------------------
# reading: the three layouts
def _read_config(path: Path) -> ModelConfig:
    """The config of a config.json, of its ``arch`` in the model registry (absent: FuseLIP); a missing or invalid
    file or value is a one-line ``CheckpointError`` naming it."""
    data = read_json(path)
    try:
        return config_from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        kind = "FuseLIPConfig" if data.get("arch", "fuselip") == "fuselip" else f"{data.get('arch')} config"
        raise CheckpointError(f"{path} is not a valid {kind}: {first_line(error)}") from error


def _config_or_inferred(config_path: Path, state: dict[str, torch.Tensor]) -> ModelConfig:
    """The config.json beside the weights, or (when there is none) the released FuseLIP size their shapes imply."""
    if config_path.exists():
        return _read_config(config_path)
    try:
        return infer_config(state)
    except CheckpointError as error:
        raise CheckpointError(f"{config_path} is missing and the architecture cannot be inferred: {error}") from None


def read_fuselip_files(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str, str]:
    """(config, state dict in our names, format, source description) for a local checkpoint folder or file; the
    config is of the arch its config.json names (the released and training layouts are always FuseLIP).

    Layouts: ours (config.json + model.safetensors, or a bare .safetensors), released (config.json +
    pytorch_model.bin, or a bare state-dict .bin/.pt), official training checkpoint (a .pt with ``state_dict``;
    architecture from ``../../fuse-clip-config.json`` or the weight shapes), and a training run folder (its ``final``).
    Raises ``CheckpointError`` (one line, naming the file) for anything unreadable.
    """
    if path.is_dir() and not (path / SAFETENSORS_NAME).exists() and (path / "final" / SAFETENSORS_NAME).exists():
        path = path / "final"  # a training run directory: its final model
    if path.is_dir():
        if (path / SAFETENSORS_NAME).exists():
            state = read_safetensors(path / SAFETENSORS_NAME)
            config = _config_or_inferred(path / CONFIG_NAME, state)
            return config, state, "safetensors", f"{path / SAFETENSORS_NAME} (architecture from {CONFIG_NAME})"
        if (path / REFERENCE_WEIGHTS_NAME).exists():
            state = reference_to_ours(_state_dict_of(path / REFERENCE_WEIGHTS_NAME))
            config = _config_or_inferred(path / CONFIG_NAME, state)
            return config, state, "released", f"{path / REFERENCE_WEIGHTS_NAME} (architecture from {CONFIG_NAME})"
        raise CheckpointError(
            f"{path} holds neither {SAFETENSORS_NAME} nor {REFERENCE_WEIGHTS_NAME}; point at a FuseLIP model directory."
        )
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
        return _config_or_inferred(path.with_name(CONFIG_NAME), state), state, "safetensors", str(path)
    payload = read_torch_weights(path)
    if isinstance(payload, dict) and "state_dict" in payload:
        state = reference_to_ours(payload["state_dict"])
        run_config = path.parent.parent / TRAINING_RUN_CONFIG
        config = config_from_file(FuseLIPConfig, run_config) if run_config.exists() else infer_config(state)
        return config, state, "training", str(path)
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = reference_to_ours(payload)
        return infer_config(state), state, "released", str(path)
    raise CheckpointError(f"{path} is not a FuseLIP checkpoint (expected a state dict or a dict with 'state_dict').")


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    payload = read_torch_weights(path)
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors.")
    return payload


def read_checkpoint(
    name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(config, state dict in our names, format) for any supported checkpoint (hub id or local); nothing is built."""
    path = resolve_pretrained(name_or_path, allow_patterns=FuseLIP.hub_allow_patterns(), **hub_kwargs)
    config, state, fmt, _ = read_fuselip_files(path)
    return config, state, fmt


def _build_loaded(name_or_path: str | os.PathLike, **hub_kwargs: Any):
    """(model of the checkpoint's arch with its weights loaded strictly, its config)."""
    path = resolve_pretrained(name_or_path, allow_patterns=FuseLIP.hub_allow_patterns(), **hub_kwargs)
    config, state, _, source = read_fuselip_files(path)
    model = build_from_config(config)
    load_state_strict(model, state, source)
    return model, config


def load_model(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[FuseLIP, ImagePreprocess, TextTokenizer]:
    """Load a checkpoint of any registry arch (hub id or local path, any supported layout) for inference.

    Returns ``(model, image_preprocess, text_tokenizer)``: the model as its class's ``from_pretrained`` builds it
    (``FuseLIP`` or ``LateFusion``), in eval mode on ``device``; the reference eval preprocessing (PIL ->
    (3, 256, 256) float32 in [0, 1]) and the CLIP-BPE tokenizer. Raises ``CheckpointError`` (one line naming the
    file) for unreadable checkpoints.
    """
    model, config = _build_loaded(name_or_path)
    model.to(device).eval()
    return model, ImagePreprocess(image_size=image_size_of(config)), model.tokenizer


def build_model(size: str = "small", init: str | os.PathLike | None = None, arch: str | None = None,
                **overrides: Any) -> FuseLIP:
    """A model of the registry's ``arch`` (default fuselip) in train mode, initialised from ``init`` (a checkpoint)
    or freshly at ``size``. Raises ``CheckpointError`` when ``arch`` is given and the checkpoint is of another
    arch."""
    if init is not None:
        model, config = _build_loaded(init)
        if arch is not None and arch_of(config) != arch:
            raise CheckpointError(
                f"model.init {init} is a {arch_of(config)} checkpoint but model.arch is {arch}; point model.init "
                f"at a {arch} checkpoint or train from scratch with --set model.init=null."
            )
        return model.train()
    return build_from_config(config_for(arch or "fuselip", size, **overrides))


# --------------------------------------------------------------------------------------------------------
# writing
def save_pretrained(model: HubModelMixin, directory: str | os.PathLike) -> Path:
    """The function form of ``HubModelMixin.save_pretrained`` (config.json + model.safetensors + README.md,
    atomic) for any fuselip_med model class; returns the path. Called on the mixin itself, so a model class that
    overrides ``save_pretrained`` with a call to this function does not recurse."""
    HubModelMixin.save_pretrained(model, directory)
    return Path(directory)


def export_reference(model: FuseLIP, directory: str | os.PathLike) -> Path:
    """Write the released hub layout (config.json + pytorch_model.bin, released key names) for interop."""

    def fill(tmp: Path) -> None:
        state = ours_to_reference({k: v.detach().cpu() for k, v in model.state_dict().items()})
        torch.save(state, tmp / REFERENCE_WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_reference_dict(), indent=2))

    return write_directory_atomically(directory, fill)
