"""The checkpoint layouts, read into (config, state dict in our names) without building a model: FuseLIP's
released hub layout, official training checkpoints, and our safetensors layout for every arch (``core.configs``:
fuselip, siglip_sf, siglip_mlf); and the released layout written back (``export_reference``).

Model classes know no file format: ``HubModelMixin.from_pretrained`` and the one loading door
(``core.loading.load_model``, which adds LoRA adapters) read through :func:`read_model_files`. Only ``safetensors``
and ``torch.load(weights_only=True)`` are used, so nothing in a checkpoint is ever executed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fuselip_med.core.configs import TRANSFORMER_SIZES, FuseLIPConfig, ModelConfig, config_from_dict
from fuselip_med.core.hub import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    config_from_file,
    first_line,
    read_json,
    read_safetensors,
    read_torch_weights,
    resolve_pretrained,
    write_directory_atomically,
)
from fuselip_med.core.titok import TiTokConfig

REFERENCE_WEIGHTS_NAME = "pytorch_model.bin"
TRAINING_RUN_CONFIG = "fuse-clip-config.json"
TIED_DECODER_KEY = "mask_prediction_head.decoder.weight"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DROPPED_REFERENCE_PATTERNS = ("image_tokenizer.model.pixel_", "image_tokenizer.model.decoder")
_IN_PROJ = re.compile(r"^(transformer\.resblocks\.\d+\.attn\.)in_proj_(weight|bias)$")


MODEL_FILES = [CONFIG_NAME, SAFETENSORS_NAME, REFERENCE_WEIGHTS_NAME]
"""Files fetched from a hub repo holding a model: ours and the released ``pytorch_model.bin``."""

__all__ = [
    "MODEL_FILES", "export_reference", "infer_config", "ours_to_reference", "read_checkpoint", "read_model_files",
    "reference_to_ours",
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
def _read_config(path: Path, config_class: type | None = None) -> ModelConfig:
    """The config of a config.json, of its ``arch`` in the model registry (absent: FuseLIP), or of
    ``config_class`` when that is another class; a missing or invalid file or value is a one-line
    ``CheckpointError`` naming it."""
    if config_class is not None and config_class not in ModelConfig.__args__:
        return config_from_file(config_class, path)
    data = read_json(path)
    try:
        return config_from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        kind = "FuseLIPConfig" if data.get("arch", "fuselip") == "fuselip" else f"{data.get('arch')} config"
        raise CheckpointError(f"{path} is not a valid {kind}: {first_line(error)}") from error


def _config_or_inferred(config_path: Path, state: dict[str, torch.Tensor],
                        config_class: type | None = None) -> ModelConfig:
    """The config.json beside the weights, or (when there is none) the released FuseLIP size their shapes imply."""
    if config_path.exists():
        return _read_config(config_path, config_class)
    try:
        return infer_config(state)
    except CheckpointError as error:
        raise CheckpointError(f"{config_path} is missing and the architecture cannot be inferred: {error}") from None


def read_model_files(path: Path, config_class: type | None = None
                     ) -> tuple[ModelConfig, dict[str, torch.Tensor], str, str]:
    """(config, state dict in our names, format, source description) for a local checkpoint folder or file; the
    config is of the arch its config.json names (the released and training layouts are always FuseLIP).

    Layouts: ours (config.json + model.safetensors, or a bare .safetensors), released (config.json +
    pytorch_model.bin, or a bare state-dict .bin/.pt), official training checkpoint (a .pt with ``state_dict``;
    architecture from ``../../fuse-clip-config.json`` or the weight shapes), and a training run folder (its ``final``).
    ``config_class``: read our layout's config.json with this class instead of the registry (a model class
    outside it, e.g. a user's own on ``HubModelMixin``). Raises ``CheckpointError`` (one line, naming the file) for
    anything unreadable.
    """
    if path.is_dir() and not (path / SAFETENSORS_NAME).exists() and (path / "final" / SAFETENSORS_NAME).exists():
        path = path / "final"  # a training run directory: its final model
    if path.is_dir():
        if (path / SAFETENSORS_NAME).exists():
            state = read_safetensors(path / SAFETENSORS_NAME)
            config = _config_or_inferred(path / CONFIG_NAME, state, config_class)
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
        return _config_or_inferred(path.with_name(CONFIG_NAME), state, config_class), state, "safetensors", str(path)
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
    """(config, state dict in our names, format) for any supported model checkpoint (hub id or local); nothing is
    built. LoRA adapters: ``core.loading.load_model``."""
    path = resolve_pretrained(name_or_path, allow_patterns=MODEL_FILES, **hub_kwargs)
    config, state, fmt, _ = read_model_files(path)
    return config, state, fmt


# --------------------------------------------------------------------------------------------------------
# writing
def export_reference(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write the released hub layout (config.json + pytorch_model.bin, released key names) of a ``FuseLIP`` for
    interop."""

    def fill(tmp: Path) -> None:
        state = ours_to_reference({k: v.detach().cpu() for k, v in model.state_dict().items()})
        torch.save(state, tmp / REFERENCE_WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_reference_dict(), indent=2))

    return write_directory_atomically(directory, fill)
