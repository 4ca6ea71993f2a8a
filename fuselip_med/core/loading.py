"""The one loading door: every checkpoint layout, of every arch, through :func:`load_model`
(``fuselip_med.load_model``), and the trainer's model build (:func:`build_model`).

Layouts: ours (config.json + model.safetensors, or a bare .safetensors), FuseLIP's released hub layout
(config.json + pytorch_model.bin), an official training checkpoint (``epoch_N.pt`` with ``state_dict``), a
training run folder (its ``final``), a LoRA adapter folder written by ``finetune`` (merged into its base), and a
hub id holding any of them. ``core.checkpoints`` reads the model layouts, ``core.lora`` the adapters; model classes
know no file format.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuselip_med.core.checkpoints import MODEL_FILES, read_model_files
from fuselip_med.core.configs import arch_of, config_for, image_size_of
from fuselip_med.core.hub import CheckpointError, is_hub_id, load_state_strict, resolve_pretrained
from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.core.lora import ADAPTER_FILES, is_adapter_dir, merge_adapter
from fuselip_med.core.models import build_from_config
from fuselip_med.core.text_tokenizer import TextTokenizer

__all__ = ["build_model", "load_model"]


def _adapter_folder(path: Path) -> Path | None:
    """``path`` itself or its ``final`` when either is a LoRA adapter folder, else None."""
    return path if is_adapter_dir(path) else path / "final" if is_adapter_dir(path / "final") else None


def _load_weights(path: Path) -> nn.Module:
    """The model of the checkpoint's arch at ``path`` (a local model layout), weights loaded strictly."""
    config, state, _, source = read_model_files(path)
    model = build_from_config(config)
    load_state_strict(model, state, source)
    return model


def load_model(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *, base: str | os.PathLike | None = None,
    **hub_kwargs: Any,
) -> tuple[nn.Module, ImagePreprocess, TextTokenizer]:
    """Load a checkpoint of any layout and arch (module docstring) for inference.

    Returns ``(model, image_preprocess, text_tokenizer)``: the model (``FuseLIP`` or ``LateFusion``; a LoRA adapter
    merged into its base, so outputs equal base + adapter) in eval mode on ``device``; the reference eval
    preprocessing (PIL -> (3, S, S) float32 in [0, 1], S = 256 for every released size) and the CLIP-BPE tokenizer.
    ``base`` replaces a LoRA adapter's recorded base (a moved or copied base); it is an error for a plain model.
    ``hub_kwargs`` (revision, cache_dir, token, ...) go to the hub download. Raises ``CheckpointError`` (one line
    naming the file) for anything unreadable.
    """
    path = Path(name_or_path).expanduser()
    if not path.exists() and is_hub_id(name_or_path):
        path = resolve_pretrained(name_or_path, allow_patterns=[*MODEL_FILES, *ADAPTER_FILES], **hub_kwargs)
    adapter = _adapter_folder(path) if path.is_dir() else None
    if adapter is not None:
        model = merge_adapter(adapter, base=base)
    elif base is not None:
        raise CheckpointError(f"--base applies to LoRA adapters only, and {name_or_path} is not an adapter folder.")
    else:
        model = _load_weights(resolve_pretrained(path))
    model.to(device).eval()
    return model, ImagePreprocess(image_size=image_size_of(model.config)), model.tokenizer


def build_model(size: str = "small", init: str | os.PathLike | None = None, arch: str | None = None,
                **overrides: Any) -> nn.Module:
    """A model of the registry's ``arch`` (default fuselip) in train mode, initialised from ``init`` (a model
    checkpoint of any layout) or freshly at ``size``. Raises ``CheckpointError`` when ``arch`` is given and the
    checkpoint is of another arch."""
    if init is None:
        return build_from_config(config_for(arch or "fuselip", size, **overrides))
    model = _load_weights(resolve_pretrained(init, allow_patterns=MODEL_FILES))
    if arch is not None and arch_of(model.config) != arch:
        raise CheckpointError(
            f"model.init {init} is a {arch_of(model.config)} checkpoint but model.arch is {arch}; point model.init "
            f"at a {arch} checkpoint or train from scratch with --set model.init=null."
        )
    return model.train()
