"""``fuselip-med push``: check a saved model or LoRA adapter folder, then upload it to the Hugging Face Hub."""
from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open

from fuselip_med.core.checkpoints import REFERENCE_WEIGHTS_NAME
from fuselip_med.core.hub import (
    CARD_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    first_line,
    is_hub_id,
    model_card,
    read_json,
)
from fuselip_med.core.lora import ADAPTER_WEIGHTS, EMBEDDED_BASE, is_adapter_dir, recorded_base


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001 - any header failure means a damaged file
        raise CheckpointError(f"{path} is damaged ({first_line(error)}); nothing was pushed.") from error


def check_pushable(folder: Path) -> str:
    """``"adapter"`` or ``"model"`` for a folder that can be pushed as it is; else a ``CheckpointError`` naming why.

    A model needs config.json and readable weights; an adapter needs readable adapter weights and a base that
    others can reach (a hub id, or the base saved inside the folder), never a path on this machine.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; push a saved model folder such as runs/<name>/final.")
    if is_adapter_dir(folder):
        _check_safetensors(folder / ADAPTER_WEIGHTS)
        base, _ = recorded_base(folder)
        if base is None or base != EMBEDDED_BASE and not is_hub_id(base):
            raise CheckpointError(
                f"LoRA adapter {folder} was trained on the local base {base!r}, which others cannot download; "
                "merge it first (fuselip-med merge-lora) and push the merged model, or push the base and "
                "re-train from its hub id."
            )
        return "adapter"
    read_json(folder / CONFIG_NAME)
    if (folder / SAFETENSORS_NAME).exists():
        _check_safetensors(folder / SAFETENSORS_NAME)
    elif not (folder / REFERENCE_WEIGHTS_NAME).exists():
        raise CheckpointError(
            f"{folder} holds neither {SAFETENSORS_NAME} nor {REFERENCE_WEIGHTS_NAME}; nothing to push."
        )
    return "model"


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload FuseLIP model with fuselip-med", token: str | None = None) -> str:
    """Upload ``folder`` to the Hub repo ``repo_id`` (created when missing) in one commit; returns the commit URL.

    The folder is checked first (``check_pushable``); a folder without ``README.md`` gets a minimal model card
    written into it. Raises ``CheckpointError`` for an invalid folder and for Hub errors (one line).
    """
    import huggingface_hub

    folder = Path(folder)
    kind = check_pushable(folder)
    if not (folder / CARD_NAME).exists():
        model_card(
            title=repo_id.split("/")[-1],
            summary=f"A FuseLIP {'LoRA adapter' if kind == 'adapter' else 'model'} saved with fuselip_med.",
            tags=["lora", "peft"] if kind == "adapter" else (),
        ).save(folder / CARD_NAME)
    from fuselip_med.core.network import NetworkError, hub_call

    api = huggingface_hub.HfApi(token=token)
    try:
        repo = hub_call(f"creating {repo_id}", lambda: api.create_repo(repo_id=repo_id, private=private,
                                                                        exist_ok=True))
        commit = hub_call(f"uploading {folder}", lambda: api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message,
            revision=revision, ignore_patterns=[".*", "**/.*"]))
    except NetworkError:
        raise
    except Exception as error:  # noqa: BLE001 - auth, network and permission errors become one clear line
        raise CheckpointError(f"Could not push {folder} to {repo_id}: {first_line(error)}") from error
    return str(getattr(commit, "commit_url", commit))
