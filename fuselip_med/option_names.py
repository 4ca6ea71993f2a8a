"""How user-facing messages name an option: the one place that maps option names to command-line flags.

Library code (adapters, eval tasks) names an option by its keyword (``path_column``) and asks here how to write it
in advice: ``path_column=NAME`` for recipes and Python callers, ``--path-column NAME`` while a ``fuselip-med``
command runs (the command opens its input inside :func:`command_line_style`). The CLI's own option declarations
(``fuselip_med.cli.options``) take their flags from :func:`flag` too, so advice and parser cannot drift apart.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["advise_dataset", "advise_option", "command_line_style", "flag", "on_command_line"]

_ON_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("fuselip_med_on_command_line", default=False)


def flag(name: str) -> str:
    """The command-line flag of keyword option ``name``: ``path_column`` -> ``--path-column``."""
    return f"--{name.replace('_', '-')}"


@contextlib.contextmanager
def command_line_style() -> Iterator[None]:
    """Within this block, advice names options as command-line flags (``--path-column NAME``)."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """True inside :func:`command_line_style`."""
    return _ON_COMMAND_LINE.get()


def advise_option(name: str, value: str | None = "NAME") -> str:
    """How to write option ``name`` with ``value`` in a message: ``--path-column NAME`` on the command line, else
    ``path_column=NAME`` (recipe ``options`` / keyword argument). ``value=None`` is a switch: ``--allow-partial`` /
    ``allow_partial=True``."""
    if on_command_line():
        return flag(name) if value is None else f"{flag(name)} {value}"
    return f"{name}={'True' if value is None else value}"


def advise_dataset(adapter: str, example: str) -> str:
    """How to hand a local copy of dataset ``adapter`` over: ``with `--data rocov2=ROCOv2_data``` to ``eval``,
    else ``, or point the recipe at your local copy with `--set data.train.path=DIR``` (finetune/train)."""
    if on_command_line():
        return f" with `{flag('data')} {adapter}={example}`"
    return f", or point the recipe at your local copy with `{flag('set')} data.train.path=DIR`"
