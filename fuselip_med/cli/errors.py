"""The CLI-wide error policy: bad input (a damaged checkpoint, a wrong recipe, missing data) is one ``error:`` line
and the error's exit code (1; 2 for a wrong command line) in every command; tracebacks are for bugs, or on request
(``--debug``, ``FUSELIP_MED_DEBUG=1``). Commands raise :class:`fuselip_med.errors.UserError` subclasses and catch
nothing themselves."""
from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fuselip_med.errors import UserError

DEBUG_ENV = "FUSELIP_MED_DEBUG"


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of spaces collapsed, so the error stays on one line."""
    return " ".join(message.split())


def print_error(console: Console, message: str) -> None:
    """``error: <message>`` on one line, never wrapped at the terminal width."""
    console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def debug_requested(ctx: typer.Context) -> bool:
    """``--debug`` on the command line or ``FUSELIP_MED_DEBUG`` set to anything but empty/0."""
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UserErrorGroup(TyperGroup):
    """The top-level command group: a ``UserError`` in any (sub)command prints one ``error:`` line and exits with
    its ``exit_code``."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            if debug_requested(ctx):
                raise
            print_error(Console(), str(error))
            raise typer.Exit(error.exit_code) from None
