"""Checkpoint files below any format: resolving a hub id or path, reading JSON, safetensors and ``torch.load``
files with every failure a one-line ``CheckpointError``, strict state-dict loading, weight hashes, model cards.

The formats built on these (released, ours, official training, LoRA) are read in ``core.checkpoints`` and
``core.lora``; the one loading door is ``core.loading``. Nothing here imports another ``core`` module.

Only ``safetensors`` and ``torch.load(weights_only=True)`` read weights: nothing in a checkpoint is executed. The
official training checkpoints (open_clip's ``epoch_N.pt``) also hold the run's ``argparse.Namespace`` and numpy
scalars in their metrics (open_clip issue 998); exactly those types are allowed through ``torch.serialization``'s
safe globals (:data:`SAFE_TRAINING_GLOBALS`), anything else is named in a one-line error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import SafetensorError
from safetensors.torch import load_file

from fuselip_med.errors import UserError, first_line
from fuselip_med.io import atomic_directory

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "fuselip_med"
CARD_TAGS = ("fuselip-med", "multimodal", "embeddings", "medical-imaging", "radiology")
MAX_LISTED_KEYS = 8


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as a model: a damaged file, a bad config, keys/shapes that do not match."""


# --------------------------------------------------------------------------------------------------------
# atomic directories
def write_directory_atomically(target: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Run ``fill(tmp)`` on a fresh temp sibling directory, then swap it in for ``target``
    (``fuselip_med.io.atomic_directory``); on any failure ``target`` keeps its previous content."""
    with atomic_directory(target) as tmp:
        fill(tmp)
    return Path(target)


# --------------------------------------------------------------------------------------------------------
# reading files, every failure a one-line CheckpointError naming the file
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or non-object file is a ``CheckpointError``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a model folder needs its {path.name}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"{path} is not valid JSON ({first_line(error)}); restore it from the model's source."
        raise CheckpointError(message) from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of config values.")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on CPU; a damaged header or truncated file is a ``CheckpointError``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is damaged ({first_line(error)}); re-download or re-save the model."
        ) from error


def _safe_training_globals() -> list[Any]:
    """The harmless non-tensor types of official training checkpoints: ``argparse.Namespace`` (the run's
    arguments) and numpy scalars with their dtypes (metrics such as ``val_loss``; open_clip issue 998)."""
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [argparse.Namespace, scalar, np.dtype, *dtypes]


_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")
_TERMINAL_CODES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def plain_text(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (safe to print on one line)."""
    return _TERMINAL_CODES.sub("", text)


def read_torch_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with :func:`_safe_training_globals` allowed; truncated files
    and any other pickled object are a one-line ``CheckpointError`` (naming the blocking type, without torch's
    advice to load unsafely)."""
    try:
        with torch.serialization.safe_globals(_safe_training_globals()), warnings.catch_warnings():
            # torch warns (two lines of its source on stderr) before refusing a plain pickle of protocol > 2;
            # the refusal below says what matters in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an unsafe or broken file
        blocked = _GLOBAL_NAME.search(str(error))
        if blocked:
            raise CheckpointError(
                f"{plain_text(str(path))} holds a {plain_text(blocked.group(1))} object, which a weights file must "
                "not contain (allowed: tensors, argparse.Namespace, numpy scalars); re-save it with torch.save of "
                "the state dict."
            ) from None
        detail = first_line(error).rstrip(".")
        if "weights_only" in detail:  # torch's own text, which advises loading unsafely: never repeated
            detail = "not a weights file"
        raise CheckpointError(
            f"Could not read {plain_text(str(path))} with torch.load(weights_only=True) ({plain_text(detail)}); "
            "the file is damaged or is not a PyTorch checkpoint."
        ) from error


def resolve_pretrained(
    name_or_path: str | os.PathLike, *, allow_patterns: Sequence[str] | None = None, **hub_kwargs: Any
) -> Path:
    """A local file/folder, or a hub repo id downloaded with ``snapshot_download`` (``hub_kwargs``: revision,
    cache_dir, token, force_download, local_files_only; only those given are passed on).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise CheckpointError(
            f"No checkpoint at {name!r}: give a local directory/file or a hub id like chs20/FuseLIP-S-CC3M-MM."
        )
    from huggingface_hub import snapshot_download

    from fuselip_med.core.network import NetworkError, hub_call

    given = {key: value for key, value in hub_kwargs.items() if value not in (None, False)}
    patterns = list(allow_patterns) if allow_patterns else None
    try:
        return Path(hub_call(f"downloading {name}", lambda: snapshot_download(name, allow_patterns=patterns, **given)))
    except NetworkError:
        raise
    except Exception as error:  # noqa: BLE001 - network/auth errors become one clear message
        raise CheckpointError(
            f"No local folder {name!r}, and it could not be downloaded from the Hugging Face Hub: {first_line(error)}"
        ) from error


def is_hub_id(reference: str | os.PathLike | None) -> bool:
    """Whether ``reference`` reads as a Hub repo id (``owner/name``) and is not a path on this machine."""
    name = str(reference or "")
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, names sorted: the same weights give the same hash
    whatever file format held them (released ``pytorch_model.bin`` or our ``model.safetensors``).
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_KEYS])
    return shown + (f", ... and {len(names) - MAX_LISTED_KEYS} more" if len(names) > MAX_LISTED_KEYS else "")


def load_state_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, failing with one line listing missing/unexpected/mis-shaped keys (first few of each).

    Raises ``CheckpointError`` naming ``source`` when the checkpoint does not match the model built from its config.
    """
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
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {'; '.join(wrong_shape[:MAX_LISTED_KEYS])}")
        raise CheckpointError(f"Checkpoint {source} does not match the model: " + " | ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------------------
# model cards
def model_card(
    *,
    title: str,
    summary: str,
    sections: Sequence[str] = (),
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    eval_results: Sequence[EvalResult] = (),
    tags: Sequence[str] = (),
    license: str | None = None,
) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` with Hub metadata (library, license, base_model, datasets, tags,
    model-index from ``eval_results``) and a markdown body: ``# title``, ``summary``, then ``sections``.

    ``base_model`` and ``datasets`` must be Hub ids (the Hub validates them); give local paths in the body instead.
    """
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=sorted(set(CARD_TAGS) | set(tags)),
        model_name=title,
        eval_results=list(eval_results) or None,
    )
    body = "\n\n".join([f"# {title}", summary.strip(), *[s.strip() for s in sections if s.strip()]])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def config_from_file(config_class: type, path: Path) -> Any:
    """``config_class.from_dict`` of a config.json; a missing/invalid file or value is a ``CheckpointError``."""
    data = read_json(path)
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path} is not a valid {config_class.__name__}: {first_line(error)}") from error
