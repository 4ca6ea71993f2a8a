"""LoRA through PEFT: wrap the encoder's attention/MLP linears, save adapters with a base pointer, merge.

An adapter directory holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, ``fuselip_base.json``
(where the base model lives) and, when the loss scale/bias were trained, ``fuselip_extras.safetensors``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from fuselip_med.core.checkpoints import (
    CheckpointError,
    atomic_directory,
    build_model,
    commit_directory,
    load_model,
    save_pretrained,
)
from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.core.models import build_from_config, image_size_of
from fuselip_med.core.text_tokenizer import TextTokenizer

BASE_POINTER = "fuselip_base.json"
EXTRAS_FILE = "fuselip_extras.safetensors"
LOGIT_PARAMS = ("logit_scale", "logit_bias")
KNOWN_TARGETS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "out_proj": "attn", "c_fc": "mlp",
                 "c_proj": "mlp"}


def target_pattern(targets: list[str]) -> str:
    """A regex over module names that selects the FuseLIP transformer's linears named in ``targets``.

    Anchored on ``transformer.resblocks`` so the frozen TiTok's own ``mlp.c_fc`` layers are never wrapped.
    """
    unknown = sorted(set(targets) - set(KNOWN_TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets} not understood; choose from {sorted(KNOWN_TARGETS)}.")
    attn = [t for t in targets if KNOWN_TARGETS[t] == "attn"]
    mlp = [t for t in targets if KNOWN_TARGETS[t] == "mlp"]
    parts = ([rf"attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
    return rf"^(.*\.)?transformer\.resblocks\.\d+\.({'|'.join(parts)})$"


def apply_lora(model: FuseLIP, r: int, alpha: float, dropout: float, targets: list[str],
               train_logit_params: bool = True) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; only adapters (and optionally the loss scale/bias) stay trainable."""
    pattern = model.lora_target_pattern(targets) if hasattr(model, "lora_target_pattern") else target_pattern(targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    for name in LOGIT_PARAMS:
        getattr(base, name).requires_grad_(train_logit_params)
    return peft_model


def adapter_parameter_count(peft_model: PeftModel) -> int:
    """Number of LoRA adapter weights (the A and B matrices)."""
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file() and (Path(path) / BASE_POINTER).is_file()


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike, base: str | None) -> Path:
    """Write the PEFT adapter, the base pointer and trained logit parameters atomically.

    With no base checkpoint (a LoRA on a fresh model), the base weights are saved inside, under ``base/``.
    """
    target = Path(directory)
    tmp = atomic_directory(target)
    try:
        fuselip = peft_model.get_base_model()
        pointer: dict[str, Any] = {"base_model": base, "config": fuselip.config.to_dict()}
        if base is None:
            save_pretrained(_unwrapped_copy(peft_model), tmp / "base")
            pointer["base_model"] = "base"
        peft_model.save_pretrained(str(tmp))
        extras = {name: getattr(fuselip, name).detach().cpu().reshape(()) for name in LOGIT_PARAMS
                  if getattr(fuselip, name).requires_grad}
        if extras:
            save_file(extras, str(tmp / EXTRAS_FILE))
        (tmp / BASE_POINTER).write_text(json.dumps(pointer, indent=2))
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _unwrapped_copy(peft_model: PeftModel) -> FuseLIP:
    """The base model's weights without adapters, as a plain FuseLIP (for saving a fresh base)."""
    fuselip = peft_model.get_base_model()
    clean = build_from_config(fuselip.config)
    state = {}
    for key, value in fuselip.state_dict().items():
        if "lora_" in key:
            continue
        state[re.sub(r"\.base_layer\.", ".", key)] = value
    clean.load_state_dict(state, strict=True)
    return clean


def load_adapter(directory: str | os.PathLike, device: str | torch.device = "cpu",
                 trainable: bool = False) -> PeftModel:
    """Base model (from the pointer) + adapter weights, as a PeftModel."""
    directory = Path(directory)
    if not is_adapter_dir(directory):
        raise CheckpointError(f"{directory} is not a fuselip_med LoRA adapter directory (no {BASE_POINTER}).")
    pointer = json.loads((directory / BASE_POINTER).read_text())
    base_ref = pointer.get("base_model")
    if base_ref is None:
        raise CheckpointError(f"{directory / BASE_POINTER} names no base model.")
    local = directory / base_ref
    base = build_model(init=str(local) if local.exists() else base_ref)
    peft_model = PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
    extras_path = directory / EXTRAS_FILE
    if extras_path.exists():
        fuselip = peft_model.get_base_model()
        with torch.no_grad():
            for name, value in load_file(str(extras_path)).items():
                getattr(fuselip, name).copy_(value)
    return peft_model.to(device)


def merge_adapter(directory: str | os.PathLike, device: str | torch.device = "cpu") -> FuseLIP:
    """A plain FuseLIP with the adapter folded into its weights (outputs equal base + adapter)."""
    return load_adapter(directory, device).merge_and_unload()


def load_for_inference(name_or_path: str | os.PathLike,
                       device: str | torch.device = "cpu") -> tuple[FuseLIP, ImagePreprocess, TextTokenizer]:
    """``load_model`` that also accepts a LoRA adapter directory (merged on load)."""
    if is_adapter_dir(name_or_path):
        model = merge_adapter(name_or_path, device).eval()
        return model, ImagePreprocess(image_size=image_size_of(model.config)), model.tokenizer
    return load_model(name_or_path, device)
