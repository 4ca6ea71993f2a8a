"""The one base class of user-facing errors: bad input (a file, a key, a value, a server) rather than a bug.

The ``fuselip-med`` handler (``fuselip_med.cli.errors.UserErrorGroup``) prints a ``UserError`` as one ``error: …``
line and exits with its ``exit_code`` (1; 2 for a wrong command line); any other exception is a bug and keeps its
traceback. Subclass it (with ``ValueError``/``OSError``/``LookupError`` as a second base where callers already
catch those) and write the message as one sentence naming the input and what to do.
"""
from __future__ import annotations

import os

__all__ = ["InputError", "MissingExtraError", "OutputExistsError", "UnknownNameError", "UsageError", "UserError",
           "first_line", "without_paths"]


class UserError(Exception):
    """Bad input a user can fix; its message is one sentence naming the file, key, value or server."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """A command line that cannot work (contradicting or out-of-range options); exit code 2 like click's."""

    exit_code = 2


class InputError(UserError, ValueError):
    """Input data (a table, a folder, an option value) that cannot be used as given."""


class UnknownNameError(UserError, KeyError):
    """A name (text encoding, adapter, task) that is not one of the known ones; the message lists them.

    A ``KeyError`` (hence a ``LookupError``) whose text is the plain message, without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OutputExistsError(UserError, FileExistsError):
    """An output path that already holds something the command will not overwrite unasked."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency a command needs is not installed; the message names the pip extra."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (library errors can span a screen), cut to ``limit``
    characters when given; the exception's type name when the message is empty (``MemoryError()``). A first line
    that only announces its details (ends with ":", as torch's "Error(s) in loading state_dict for X:") is
    joined with the next one, which says what is wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__[:limit]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:limit]


def without_paths(text: str, *paths: str | os.PathLike) -> str:
    """``text`` with every spelling of each path (as given, absolute, symlinks resolved; longest first) replaced by
    ``<file>``: library errors (nibabel, pydicom, ``OSError``) quote the whole path, whose folders are often patient
    names in PACS exports (PS3.15 Annex E), so a detail written to a skip report or printed must not carry it."""
    spellings = set()
    for path in paths:
        path = os.fspath(path)
        if path:
            spellings.update({path, os.path.abspath(path), os.path.realpath(path)})
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, "<file>")
    return text
