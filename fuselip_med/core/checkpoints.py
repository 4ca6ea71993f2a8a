"""Load and save FuseLIP weights: released hub layout, official training checkpoints and our safetensors layout.

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
from safetensors.torch import load_file, save_file

import fuselip_med.io as atomic_io
from fuselip_med.core.fuselip import TRANSFORMER_SIZES, FuseLIP, FuseLIPConfig
from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.core.models import arch_of, build_from_config, config_for, config_from_dict, image_size_of
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.core.titok import TiTokConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
REFERENCE_WEIGHTS_NAME = "pytorch_model.bin"
TIED_DECODER_KEY = "mask_prediction_head.decoder.weight"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DROPPED_REFERENCE_PATTERNS = ("image_tokenizer.model.pixel_", "image_tokenizer.model.decoder")
_IN_PROJ = re.compile(r"^(transformer\.resblocks\.\d+\.attn\.)in_proj_(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a FuseLIP model (missing/unexpected keys, wrong shapes, bad files)."""


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
# reading files
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an unsafe or broken file
        raise CheckpointError(
            f"Could not read {path} with torch.load(weights_only=True): {error}. Only plain tensor checkpoints "
            "are accepted."
        ) from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Could not read the model config {path}: {error}") from error


def _read_config(path: Path):
    """The config of our config.json (any ``arch`` of the model registry)."""
    try:
        return config_from_dict(_read_json(path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def _resolve_local(name_or_path: str | os.PathLike) -> Path:
    """A local file/directory, or a hub repo id downloaded to the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"No checkpoint at {name!r}: give a local directory/file or a hub id like "
                              "chs20/FuseLIP-S-CC3M-MM.")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(name, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, REFERENCE_WEIGHTS_NAME, "adapter_*"])
        )
    except Exception as error:  # noqa: BLE001 - network/auth errors become one clear message
        raise CheckpointError(f"Could not download {name!r} from the Hugging Face Hub: {error}") from error


def read_checkpoint(name_or_path: str | os.PathLike) -> tuple[FuseLIPConfig, dict[str, torch.Tensor], str]:
    """(config, state dict in our names, format) for any supported checkpoint; nothing is built yet."""
    path = _resolve_local(name_or_path)
    if path.is_dir() and not (path / SAFETENSORS_NAME).exists() and (path / "final" / SAFETENSORS_NAME).exists():
        path = path / "final"  # a training run directory: its final model
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if (path / SAFETENSORS_NAME).exists():
            config = _read_config(config_path) if config_path.exists() else None
            state = load_file(str(path / SAFETENSORS_NAME))
            return config or infer_config(state), state, "safetensors"
        if (path / REFERENCE_WEIGHTS_NAME).exists():
            state = reference_to_ours(_torch_load(path / REFERENCE_WEIGHTS_NAME))
            config = FuseLIPConfig.from_dict(_read_json(config_path)) if config_path.exists() else infer_config(state)
            return config, state, "released"
        raise CheckpointError(
            f"{path} holds neither {SAFETENSORS_NAME} nor {REFERENCE_WEIGHTS_NAME}; point at a FuseLIP model directory."
        )
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        sidecar = path.with_name(CONFIG_NAME)
        config = _read_config(sidecar) if sidecar.exists() else infer_config(state)
        return config, state, "safetensors"
    payload = _torch_load(path)
    if isinstance(payload, dict) and "state_dict" in payload:
        state = reference_to_ours(payload["state_dict"])
        run_config = path.parent.parent / "fuse-clip-config.json"
        config = FuseLIPConfig.from_dict(_read_json(run_config)) if run_config.exists() else infer_config(state)
        return config, state, "training"
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = reference_to_ours(payload)
        return infer_config(state), state, "released"
    raise CheckpointError(f"{path} is not a FuseLIP checkpoint (expected a state dict or a dict with 'state_dict').")


def load_state_strict(model: FuseLIP, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, failing with the full list of missing/unexpected/mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
        raise CheckpointError(f"Checkpoint {source} does not match the model: " + " | ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_model(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[FuseLIP, ImagePreprocess, TextTokenizer]:
    """Load a FuseLIP checkpoint (hub id or local path, any supported layout) for inference.

    Returns ``(model, image_preprocess, text_tokenizer)``: the model in eval mode on ``device``, the
    reference eval preprocessing (PIL -> (3, 256, 256) in [0, 1]) and the CLIP-BPE tokenizer with ``[MASK]``.
    """
    config, state_dict, _ = read_checkpoint(name_or_path)
    model = build_from_config(config)
    load_state_strict(model, state_dict, str(name_or_path))
    model.to(device).eval()
    return model, ImagePreprocess(image_size=image_size_of(config)), model.tokenizer


def build_model(size: str = "small", init: str | os.PathLike | None = None, arch: str | None = None,
                **overrides: Any) -> FuseLIP:
    """A model of the registry's ``arch`` (default fuselip) initialised from ``init`` (a checkpoint) or freshly
    at ``size``. Raises CheckpointError when ``arch`` is given and the checkpoint is of another arch."""
    if init is not None:
        config, state_dict, _ = read_checkpoint(init)
        if arch is not None and arch_of(config) != arch:
            raise CheckpointError(
                f"model.init {init} is a {arch_of(config)} checkpoint but model.arch is {arch}; point model.init "
                f"at a {arch} checkpoint or train from scratch with --set model.init=null."
            )
        model = build_from_config(config)
        load_state_strict(model, state_dict, str(init))
        return model
    return build_from_config(config_for(arch or "fuselip", size, **overrides))


# --------------------------------------------------------------------------------------------------------
# writing
# The two-step names train/lora.py imports; new code uses ``fuselip_med.io.atomic_directory``.
atomic_directory = atomic_io.temp_directory
commit_directory = atomic_io.publish_directory


def save_pretrained(model: FuseLIP, directory: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (tied weight stored once) into ``directory`` atomically."""
    target = Path(directory)
    with atomic_io.atomic_directory(target) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt", "library": "fuselip_med"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return target


def export_reference(model: FuseLIP, directory: str | os.PathLike) -> Path:
    """Write the released hub layout (config.json + pytorch_model.bin, released key names) for interop."""
    target = Path(directory)
    with atomic_io.atomic_directory(target) as tmp:
        state = ours_to_reference({k: v.detach().cpu() for k, v in model.state_dict().items()})
        torch.save(state, tmp / REFERENCE_WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_reference_dict(), indent=2))
    return target
