"""``finetune`` and ``train``: run a recipe on Accelerate (from a checkpoint, or from scratch)."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from fuselip_med.cli.common import RECIPE_HELP, SET_HELP

__all__ = ["register"]

RESUME_HELP = ("Continue from the newest complete checkpoint of this run (bare --resume), or from the run/checkpoint "
               "directory given.")
SIZE_HELP = "Model size (small or base; tiny for tests), sets model.size."


def _run_recipe(recipe_name: str, size: Optional[str], overrides: list[str], resume: Optional[str],
                from_scratch: bool) -> None:
    from fuselip_med.recipes import load_recipe
    from fuselip_med.train.trainer import Trainer

    recipe = load_recipe(recipe_name, overrides, size=size)
    Trainer(recipe, resume=resume, from_scratch=from_scratch, console=Console()).run()


def finetune(
    recipe: str = typer.Option("rocov2", "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help=SIZE_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
) -> None:
    """Fine-tune a FuseLIP checkpoint (full or LoRA) with a recipe, on Accelerate.

    Examples:\n
      fuselip-med finetune --recipe rocov2_demo\n
      fuselip-med finetune --recipe rocov2 --size base --set data.root=/data/ROCOv2_data\n
      fuselip-med finetune --recipe rocov2_lora --set model.lora.r=8\n
      accelerate launch --num_processes 4 -m fuselip_med.cli finetune --recipe rocov2\n
      fuselip-med finetune --recipe rocov2 --resume
    """
    _run_recipe(recipe, size, set_, resume, from_scratch=False)


def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help=RECIPE_HELP),
    size: Optional[str] = typer.Option(None, "--size", help=SIZE_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
) -> None:
    """Train a FuseLIP from scratch (model.init is ignored) with the same machinery as finetune.

    Examples:\n
      fuselip-med train --recipe cc3m_mm --set data.root=/data\n
      accelerate launch --multi_gpu --num_processes 8 -m fuselip_med.cli train --recipe cc3m_mm --size base
    """
    _run_recipe(recipe, size, set_, resume, from_scratch=True)


def register(app: typer.Typer) -> None:
    """Add ``finetune`` and ``train`` to the ``fuselip-med`` app."""
    app.command(context_settings={"allow_interspersed_args": True})(finetune)
    app.command()(train)
