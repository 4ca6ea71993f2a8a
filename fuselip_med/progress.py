"""Progress bars: one library (``rich.progress``) and one policy for every command and data tool.

A bar is drawn only when its console is a terminal and the user has not asked for quiet (``fuselip-med --quiet``,
which sets the ``fuselip_med`` logger above INFO, or a caller's ``enabled=False`` such as a tool's
``--no-progress``); in logs, CI and pipes nothing is printed. Standard library and rich only: the data tools
load this file by path in the download image, which has no torch and no package.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["Bar", "new_progress", "progress_bar", "progress_enabled"]


def progress_enabled(console: Console, enabled: bool = True) -> bool:
    """Whether a bar on ``console`` is drawn: ``enabled``, a terminal, and ``fuselip_med`` logging not quiet."""
    quiet = logging.getLogger("fuselip_med").level > logging.INFO
    return enabled and console.is_terminal and not quiet


def new_progress(*columns: str | ProgressColumn, console: Console | None = None, enabled: bool = True,
                 transient: bool = False) -> Progress:
    """A ``rich.progress.Progress`` with the given columns (e.g. the trainer's loss and lr fields) under the
    policy above; ``console`` defaults to stderr, so bars never mix into a command's stdout."""
    console = console or Console(stderr=True)
    return Progress(*columns, console=console, disable=not progress_enabled(console, enabled), transient=transient)


class Bar:
    """One task of a ``Progress``: ``advance(n)`` items, ``set(completed)``, and a short ``note`` after the count."""

    def __init__(self, progress: Progress, task: TaskID):
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def set(self, completed: float, total: float | None = None) -> None:
        """Set the count (and, when given, a new total, e.g. for the next of several jobs on one bar)."""
        self._progress.update(self._task, completed=completed, total=total)

    def note(self, text: str) -> None:
        self._progress.update(self._task, note=text)

    @property
    def completed(self) -> float:
        return self._progress.tasks[self._task].completed


@contextmanager
def progress_bar(total: float | None, description: str, *, unit: str = "item", completed: float = 0,
                 enabled: bool = True, transient: bool = False, console: Console | None = None) -> Iterator[Bar]:
    """A single bar ``description  ━━━━  12/40 units  note  0:00:03 0:00:07``, closed on exit.

    ``total``: items expected (None: unknown); ``completed``: items already done (e.g. on resume).
    """
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(f"{unit}s"),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with new_progress(*columns, console=console, enabled=enabled, transient=transient) as progress:
        yield Bar(progress, progress.add_task(description, total=total, completed=completed, note=""))
