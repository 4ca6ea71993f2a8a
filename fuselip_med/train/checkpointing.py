"""Training checkpoints: one directory per step, written atomically, newest complete one found on resume.

``step_000120/`` holds ``model.safetensors`` (the trained module's state) with its ``config.json``, ``optimizer.pt``,
``scaler.pt`` (fp16 only), ``trainer_state.json`` (step, schedule, sampler position, metrics, skip counts),
``rng_rank{r}.pt`` per process, ``recipe.yaml`` and ``checksums.json`` (size and SHA-256 of each, verified on
resume). It is written under a temporary name and renamed, so a
crash mid-write never leaves a directory that looks complete.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fuselip_med.errors import UserError
from fuselip_med.io import damaged_files, disk_full, file_record, is_disk_full

STEP_DIR = re.compile(r"^step_(\d{6,})$")
TMP_PREFIX = ".tmp-step_"
CHECKSUMS = "checksums.json"


def step_dir_name(step: int) -> str:
    """A checkpoint's folder name, ``step_NNNNNN``."""
    return f"step_{step:06d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (what ``--resume`` picks), or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(directory: Path) -> None:
    """Drop half-written checkpoint directories left by a killed run."""
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def prune(directory: Path, keep_last: int) -> None:
    """Keep only the newest ``keep_last`` complete checkpoints."""
    for path in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` reads back."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's torch, Python, NumPy (and CUDA, when present) RNGs from ``rng_state()``'s output."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_dir(directory: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before its atomic rename (``remove_stale_temporaries`` drops it)."""
    return directory / f"{TMP_PREFIX}{step:06d}"


def write_process_files(tmp: Path, rank: int) -> None:
    """What every process writes into the shared temporary directory (its RNG state)."""
    with _full_device_as_error(tmp, 0):
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


@contextmanager
def _full_device_as_error(tmp: Path, needed: int) -> Iterator[None]:
    """A full device while writing ``tmp`` becomes ``io.OutputError`` naming the checkpoint folder and ``needed``
    bytes; the unfinished ``tmp`` is removed. torch.save wraps ENOSPC in a RuntimeError, safetensors in its own."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(tmp.parent, needed or None) from None


def write_main_files(
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    recipe_yaml: str,
    model_config: dict[str, Any],
) -> None:
    """What the main process writes: weights (+ config.json, so ``load_model`` reads a full-model checkpoint),
    optimizer, scaler, trainer state and the resolved recipe. A full device raises ``io.OutputError`` naming the
    checkpoint folder and the space a checkpoint needs, and removes the unfinished ``tmp``."""
    with _full_device_as_error(tmp, _tensor_bytes(model_state) + _tensor_bytes(optimizer_state)):
        _write_main_files(tmp, model_state, optimizer_state, scaler_state, trainer_state, recipe_yaml, model_config)


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what ``torch.save``/``save_file`` will write, roughly."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0


def _write_main_files(tmp: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                      scaler_state: dict[str, Any] | None, trainer_state: dict[str, Any], recipe_yaml: str,
                      model_config: dict[str, Any]) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if scaler_state is not None:
        torch.save(scaler_state, tmp / "scaler.pt")
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    records = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (tmp / CHECKSUMS).write_text(json.dumps(records, indent=1))


class CheckpointDamagedError(UserError, OSError):
    """A file of a training checkpoint is missing, cut short or altered (size or SHA-256 differs from
    ``checksums.json``); the message names it and the checkpoint to resume from instead."""


def verify_checkpoint(path: Path) -> None:
    """Raise ``CheckpointDamagedError`` unless every file recorded in ``path/checksums.json`` is intact
    (checkpoints written before checksums existed are not checked)."""
    try:
        records = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return
    except ValueError:
        records = {CHECKSUMS: {"size": -1, "sha256": ""}}
    damaged = damaged_files(path, records)
    if damaged:
        name, why = next(iter(damaged.items()))
        earlier = [p for p in list_checkpoints(path.parent) if p.name < path.name]
        advice = (f"resume from the checkpoint before it with --resume {earlier[-1]}" if earlier
                  else "start the run again without --resume")
        raise CheckpointDamagedError(f"{path / name} is damaged ({why}); {advice}, after moving {path} aside.")


def commit(tmp: Path, directory: Path, step: int) -> Path:
    """Rename the finished temporary directory into place (atomic on one filesystem)."""
    final = directory / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def read_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Everything a resume needs from one checkpoint directory (tensors loaded with weights_only); raises
    ``CheckpointDamagedError`` naming a damaged file."""
    verify_checkpoint(path)
    rng_file = path / f"rng_rank{rank}.pt"
    return {
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "scaler": torch.load(path / "scaler.pt", weights_only=True) if (path / "scaler.pt").exists() else None,
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "rng": torch.load(rng_file, weights_only=True) if rng_file.exists() else None,
    }
