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

# typer parses with its own copy of click; these are the exceptions its parser raises
CommandLineError = typer.BadParameter.__mro__[1]  # typer's click UsageError: unknown option, bad value, missing
NoArgsIsHelp = next(c for c in CommandLineError.__subclasses__() if c.__name__ == "NoArgsIsHelpError")

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


def _usage_exit(error: Exception) -> None:
    """A command line click cannot parse (unknown option, wrong type, missing value) as one ``error:`` line naming
    the command and its ``--help``, exit code 2 (click's), instead of click's boxed usage text."""
    command = error.ctx.command_path if error.ctx is not None else "fuselip-med"
    print_error(Console(stderr=True), f"{command}: {error.format_message()} (see {command} --help)")
    raise typer.Exit(error.exit_code)


class UserErrorGroup(TyperGroup):
    """The top-level command group: a ``UserError`` in any (sub)command prints one ``error:`` line and exits with
    its ``exit_code``; a command line that cannot be parsed is one ``error:`` line too (exit 2)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except NoArgsIsHelp:
            raise  # a bare group prints its help
        except CommandLineError as error:
            _usage_exit(error)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelp:
            raise
        except CommandLineError as error:
            if debug_requested(ctx):
                raise
            _usage_exit(error)
        except UserError as error:
            if debug_requested(ctx):
                raise
            print_error(Console(), str(error))
            raise typer.Exit(error.exit_code) from None
