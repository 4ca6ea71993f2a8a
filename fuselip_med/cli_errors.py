"""The CLI-wide error policy: bad input (a damaged checkpoint, a wrong recipe, missing data) is one ``error:`` line
and exit code 1 in every command; tracebacks are for bugs, or on request (``--debug``, ``FUSELIP_MED_DEBUG=1``)."""
from __future__ import annotations

import os

import typer
from rich.console import Console
from typer.core import TyperGroup

DEBUG_ENV = "FUSELIP_MED_DEBUG"


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of spaces collapsed, so the error stays on one line."""
    return " ".join(message.split())


def print_error(console: Console, message: str) -> None:
    """``error: <message>`` on one line, never wrapped at the terminal width."""
    console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)


def user_error_types() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (checkpoint, recipe, data), not a bug (imported only when one is raised)."""
    from fuselip_med.core.hub import CheckpointError
    from fuselip_med.data.adapters import DatasetEmptyError
    from fuselip_med.errors import UserError
    from fuselip_med.io import OutputError
    from fuselip_med.recipes import RecipeError
    from fuselip_med.train.data import DataSetupError
    from fuselip_med.train.trainer import TrainingStopped

    return UserError, OutputError, CheckpointError, DatasetEmptyError, RecipeError, DataSetupError, TrainingStopped


def debug_requested(ctx: typer.Context) -> bool:
    """``--debug`` on the command line or ``FUSELIP_MED_DEBUG`` set to anything but empty/0."""
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UserErrorGroup(TyperGroup):
    """The top-level command group: a user error in any (sub)command prints one ``error:`` line and exits 1."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except Exception as error:
            if debug_requested(ctx) or not isinstance(error, user_error_types()):
                raise
            print_error(Console(), str(error))
            raise typer.Exit(1) from None
