"""Metric trackers: a JSONL file always, TensorBoard and Weights & Biases when the recipe asks for them.

wandb never blocks a run: without credentials (or if the online start fails) it falls back to offline mode
and says so in one line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


class JsonlTracker:
    """Appends one JSON object per log call to ``metrics.jsonl`` (flushed, so a crash loses nothing logged)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class TensorBoardTracker:
    """Scalars to a TensorBoard event file under ``<log dir>/tensorboard``."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (no network call, no prompt)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbTracker:
    """A wandb run; offline when there are no credentials or the online start fails."""

    def __init__(self, directory: Path, project: str, name: str, config: dict[str, Any], mode: str,
                 say: Callable[[str], None]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        directory.mkdir(parents=True, exist_ok=True)
        if mode == "online" and not wandb_has_credentials():
            say("wandb: no credentials found (WANDB_API_KEY or `wandb login`); logging offline instead.")
            mode = "offline"
        settings = wandb.Settings(init_timeout=60, silent=True)
        try:
            self._run = wandb.init(project=project, name=name, config=config, dir=str(directory), mode=mode,
                                   settings=settings)
        except Exception as error:  # noqa: BLE001 - any online failure falls back to offline
            if mode != "online":
                raise
            say(f"wandb: online start failed ({type(error).__name__}); logging offline instead.")
            self._run = wandb.init(project=project, name=name, config=config, dir=str(directory), mode="offline",
                                   settings=settings)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Fans metrics out to every configured tracker."""

    def __init__(self, trackers: list[Any]):
        self._trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for tracker in self._trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


def build_trackers(kinds: list[str], log_dir: Path, *, project: str, run_name: str, config: dict[str, Any],
                   wandb_mode: str, say: Callable[[str], None]) -> Trackers:
    """The JSONL tracker plus whatever ``kinds`` names (tensorboard, wandb)."""
    trackers: list[Any] = [JsonlTracker(log_dir / "metrics.jsonl")]
    if "tensorboard" in kinds:
        trackers.append(TensorBoardTracker(log_dir))
    if "wandb" in kinds and wandb_mode != "disabled":
        trackers.append(WandbTracker(log_dir, project, run_name, config, wandb_mode, say))
    return Trackers(trackers)
