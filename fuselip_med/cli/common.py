"""What several command groups share: option help texts, the check of an input image option, and loading a model
for inference on a chosen device."""
from __future__ import annotations

import os
from typing import Optional

from fuselip_med.errors import UsageError

BASE_HELP = "For a LoRA adapter: its base model (hub id or path), replacing the recorded one (moved or copied base)."
MODEL_HELP = "Checkpoint: hub id, local directory, .pt file or LoRA adapter directory."
RECIPE_HELP = "Shipped recipe name (rocov2, rocov2_lora, rocov2_demo, ...) or a path to a YAML file."
SET_HELP = "Override a recipe value, e.g. --set train.lr=3e-5 --set data.root=/data/ROCOv2 (repeatable)."


def load_inference_model(model: str, device: Optional[str], base: Optional[str] = None):
    """``(model, image tokenizer, text tokenizer)`` of checkpoint ``model`` in eval mode on ``device`` (default:
    cuda when available, else cpu); ``base`` replaces a LoRA adapter's recorded base. Raises ``CheckpointError``."""
    import torch

    from fuselip_med.core.loading import load_model

    return load_model(model, device or ("cuda" if torch.cuda.is_available() else "cpu"), base=base)


def check_image_file(path: os.PathLike | str, flag: str) -> None:
    """Raise ``UsageError`` (one line, exit 2) when the image named by option ``flag`` does not exist or is not a
    regular file (a folder, FIFO, socket or device: reading a FIFO would block or look empty); symlinks are
    followed. Nothing is opened."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file.")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: not a regular file (a folder, FIFO or device); give an image file.")
