"""Metric tracking on Accelerate's tracking API: ``Accelerator(log_with=log_with(...), project_dir=<log dir>)``,
``start_trackers`` (``accelerator.init_trackers``), ``accelerator.log(values, step=...)``,
``accelerator.end_training()``.

What is logged where (``<log dir>`` is ``recipe.log_dir()``), by the main process only:

- ``<log dir>/metrics.jsonl``, always: one JSON object per ``accelerator.log`` call (``{"step": ..., **values}``);
- ``<log dir>/tensorboard/events.out.tfevents.*`` when ``logging.trackers`` names ``tensorboard``: the scalars;
- ``<log dir>/wandb/`` when it names ``wandb`` (and ``logging.wandb_mode`` is not ``disabled``): a run in project
  ``logging.wandb_project``, named after the recipe, with the recipe as its config.

wandb never blocks a run: without credentials (or if the online start fails) it logs offline and says so in one line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker
from accelerate.utils import LoggerType

from fuselip_med.recipes import LoggingSection


class JsonlTracker(GeneralTracker):
    """``<logging_dir>/metrics.jsonl``: appends one JSON object per log call, flushed (a crash loses nothing logged)."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self._handle = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    @property
    def tracker(self):
        return self._handle

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        self._handle.write(json.dumps({"step": step, **values}) + "\n")
        self._handle.flush()

    def finish(self) -> None:
        self._handle.close()


def log_with(logging: LoggingSection, log_dir: Path) -> list[GeneralTracker | str]:
    """The ``Accelerator(log_with=...)`` list: wandb first (so an online start that fails has started nothing else),
    the JSONL file, TensorBoard under ``<log dir>/tensorboard``."""
    trackers: list[GeneralTracker | str] = []
    if "wandb" in logging.trackers and logging.wandb_mode != "disabled":
        trackers.append("wandb")
    trackers.append(JsonlTracker(log_dir))
    if "tensorboard" in logging.trackers:
        trackers.append(TensorBoardTracker("tensorboard", log_dir))
    return trackers


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (no network call, no prompt)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def start_trackers(accelerator: Accelerator, logging: LoggingSection, log_dir: Path, *, run_name: str,
                   config: dict[str, Any], say: Callable[[str], None]) -> None:
    """``accelerator.init_trackers`` (main process only), with wandb offline when there are no credentials or the
    online start fails."""
    if not accelerator.is_main_process:
        return
    init_kwargs = {}
    if LoggerType.WANDB in accelerator.log_with:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        log_dir.mkdir(parents=True, exist_ok=True)
        mode = logging.wandb_mode
        if mode == "online" and not wandb_has_credentials():
            say("wandb: no credentials found (WANDB_API_KEY or `wandb login`); logging offline instead.")
            mode = "offline"
        init_kwargs["wandb"] = {"name": run_name, "config": config, "dir": str(log_dir), "mode": mode,
                                "settings": wandb.Settings(init_timeout=60, silent=True)}
    try:
        accelerator.init_trackers(logging.wandb_project, init_kwargs=init_kwargs)
    except Exception as error:  # noqa: BLE001 - any online failure falls back to offline
        if init_kwargs.get("wandb", {}).get("mode") != "online":
            raise
        say(f"wandb: online start failed ({type(error).__name__}); logging offline instead.")
        accelerator.trackers = []  # wandb starts first: nothing else was started
        init_kwargs["wandb"]["mode"] = "offline"
        accelerator.init_trackers(logging.wandb_project, init_kwargs=init_kwargs)
