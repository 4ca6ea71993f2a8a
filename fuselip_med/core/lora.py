"""LoRA through PEFT: wrap FuseLIP's transformer linears, save portable adapters, load them anywhere, merge.

An adapter folder is what PEFT writes (``adapter_config.json`` + ``adapter_model.safetensors``) plus
``fuselip_base.json``. ``adapter_config.json`` carries ``base_model_name_or_path``: a hub id as given, or a
local base resolved to an absolute path, or ``base`` for a fresh base saved inside the adapter folder.
``fuselip_base.json`` adds the base's weights hash (``core.hub.state_dict_sha256``, format-independent), so a
moved or changed base is named in a clear error and another location can be passed (``base=``, CLI ``--base``).

The trained loss scale/bias (root parameters ``logit_scale``/``logit_bias``) are stored in
``adapter_model.safetensors`` under PEFT's key prefix (``base_model.model.logit_scale``). PEFT's
``modules_to_save`` only wraps submodules, and the reference parameter names must stay; PEFT's own
``PeftModel.from_pretrained`` passes such non-LoRA keys through to ``load_state_dict``, so plain PEFT
loading restores them too (tested).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from fuselip_med.core.checkpoints import MODEL_FILES, read_model_files
from fuselip_med.core.fuselip import FuseLIP
from fuselip_med.core.hub import (
    CARD_NAME,
    CheckpointError,
    first_line,
    is_hub_id,
    load_state_strict,
    model_card,
    read_json,
    read_safetensors,
    resolve_pretrained,
    state_dict_sha256,
    write_directory_atomically,
)
from fuselip_med.core.models import build_from_config
from fuselip_med.core.pretrained import save_pretrained

if TYPE_CHECKING:  # PEFT is imported where an adapter is built or read (seconds at start-up otherwise)
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_POINTER = "fuselip_base.json"
EMBEDDED_BASE = "base"
PEFT_PREFIX = "base_model.model."
LOGIT_PARAMS = ("logit_scale", "logit_bias")
KNOWN_TARGETS = {
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "out_proj": "attn", "c_fc": "mlp", "c_proj": "mlp",
}
ADAPTER_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_POINTER, f"{EMBEDDED_BASE}/*"]
"""Files fetched from a hub repo holding a LoRA adapter (with a base saved inside it, if any)."""
BASE_HINT = "pass the base's current location or hub id with --base (Python: base=...)"


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
    """Wrap ``model`` with LoRA adapters of rank ``r``; only adapters (and optionally the loss scale/bias) train."""
    pattern = model.lora_target_pattern(targets) if hasattr(model, "lora_target_pattern") else target_pattern(targets)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    for name in LOGIT_PARAMS:
        getattr(base, name).requires_grad_(train_logit_params)
    return peft_model


def base_model_of(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (``model`` itself when it is not wrapped); PEFT injects its layers in place,
    so calling the base runs the adapters."""
    peft = sys.modules.get("peft")  # not imported: no adapter can exist in this process
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def adapter_parameter_count(peft_model: PeftModel) -> int:
    """Number of LoRA adapter weights (the A and B matrices)."""
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json`` present)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


# --------------------------------------------------------------------------------------------------------
# saving
def _describe_base(base: str | None) -> tuple[str | None, str | None]:
    """(reference to record, weights sha256): a local base resolved absolute and hashed; a hub id as given."""
    if base is None:
        return None, None
    local = Path(base).expanduser()
    if not local.exists():
        return str(base), None
    _, state, _, _ = read_model_files(local.resolve())
    return str(local.resolve()), state_dict_sha256(state)


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike, base: str | None) -> Path:
    """Write the PEFT adapter (+ trained logit parameters) and the base pointer into ``directory`` atomically.

    ``base`` is the checkpoint the model was built from (hub id or local path, relative paths allowed); with
    none (a LoRA on a fresh model) the base weights are saved inside, under ``base/``.
    """
    fuselip = peft_model.get_base_model()

    def fill(tmp: Path) -> None:
        reference, sha256 = _describe_base(base)
        if reference is None:
            clean = _unwrapped_copy(peft_model)
            save_pretrained(clean, tmp / EMBEDDED_BASE)
            reference, sha256 = EMBEDDED_BASE, state_dict_sha256(clean.state_dict())
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = reference
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        extras = {PEFT_PREFIX + name: getattr(fuselip, name).detach().cpu().contiguous()
                  for name in LOGIT_PARAMS if getattr(fuselip, name).requires_grad}
        if extras:
            weights = tmp / ADAPTER_WEIGHTS
            save_file({**read_safetensors(weights), **extras}, str(weights), metadata={"format": "pt"})
        model_card(
            title="FuseLIP LoRA adapter",
            summary=f"A PEFT LoRA adapter for FuseLIP (base: `{reference}`), written by fuselip_med. Load it with "
                    "`fuselip_med.load_model(path)` or PEFT's "
                    "`PeftModel.from_pretrained(FuseLIP.from_pretrained(base), path)`.",
            base_model=reference if is_hub_id(reference) else None,
            tags=["lora", "peft"],
        ).save(tmp / CARD_NAME)
        pointer: dict[str, Any] = {"base_model": reference, "given_as": base, "weights_sha256": sha256,
                                   "config": fuselip.config.to_dict()}
        (tmp / BASE_POINTER).write_text(json.dumps(pointer, indent=2))

    return write_directory_atomically(directory, fill)


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


# --------------------------------------------------------------------------------------------------------
# loading
def recorded_base(directory: str | os.PathLike) -> tuple[str | None, str | None]:
    """(base reference, weights sha256 or None) recorded by ``save_adapter`` (or by PEFT alone: no hash)."""
    directory = Path(directory)
    adapter_config = read_json(directory / ADAPTER_CONFIG)
    pointer = read_json(directory / BASE_POINTER) if (directory / BASE_POINTER).exists() else {}
    reference = pointer.get("base_model") or adapter_config.get("base_model_name_or_path")
    return reference, pointer.get("weights_sha256")


def load_adapter_base(directory: str | os.PathLike, base: str | os.PathLike | None = None) -> FuseLIP:
    """The adapter's base FuseLIP: the recorded one, or ``base`` when given; its weights hash is checked.

    Raises ``CheckpointError`` naming the base and the adapter when the base is missing or is not the one the
    adapter was trained on.
    """
    directory = Path(directory)
    reference, expected = recorded_base(directory)
    if base is None and reference is None:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG} names no base model; {BASE_HINT}.")
    if base is not None:
        chosen: str | os.PathLike = base
    elif not Path(reference).is_absolute() and (directory / reference).exists():
        chosen = directory / reference  # a base saved inside the adapter folder travels with it
    else:
        chosen = reference
    try:
        path = resolve_pretrained(chosen, allow_patterns=MODEL_FILES)
    except CheckpointError as error:
        raise CheckpointError(
            f"The base model {str(chosen)!r} of LoRA adapter {directory} is not available ({error}); {BASE_HINT}."
        ) from None
    config, state, _, source = read_model_files(path)
    if expected is not None and (found := state_dict_sha256(state)) != expected:
        raise CheckpointError(
            f"The base model at {path} is not the one LoRA adapter {directory} was trained on (weights sha256 "
            f"{found[:12]}... vs recorded {expected[:12]}...); {BASE_HINT}."
        )
    model = build_from_config(config)
    load_state_strict(model, state, source)
    return model


def load_adapter(directory: str | os.PathLike, device: str | torch.device = "cpu", trainable: bool = False,
                 base: str | os.PathLike | None = None) -> PeftModel:
    """Base model (recorded, or ``base``) + adapter weights, as a PeftModel on ``device``.

    Raises ``CheckpointError`` (one line naming the file) for a missing/changed base, a damaged
    ``adapter_model.safetensors`` or an adapter that does not fit the base.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    if not is_adapter_dir(directory):
        raise CheckpointError(f"{directory} is not a LoRA adapter folder (no {ADAPTER_CONFIG}).")
    saved = read_safetensors(directory / ADAPTER_WEIGHTS)
    model = load_adapter_base(directory, base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"LoRA adapter {directory} does not fit its base model: {first_line(error)}"
        ) from error
    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    missing = sorted(expected - set(saved))
    if missing:
        raise CheckpointError(
            f"{directory / ADAPTER_WEIGHTS} lacks {len(missing)} LoRA weights its config asks for (e.g. {missing[0]}); "
            "the file is incomplete."
        )
    return peft_model.to(device)


def merge_adapter(directory: str | os.PathLike, device: str | torch.device = "cpu",
                  base: str | os.PathLike | None = None) -> FuseLIP:
    """A plain FuseLIP with the adapter folded into its weights (outputs equal base + adapter)."""
    return load_adapter(directory, device, base=base).merge_and_unload()
