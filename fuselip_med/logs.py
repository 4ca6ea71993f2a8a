"""Console logging for the command line: ``--verbose`` / ``--quiet`` set the ``fuselip_med`` logger's level.

Library code logs through ``logging.getLogger(__name__)`` and never configures handlers itself; the CLI calls
``configure_logging`` once. Records go to stderr through ``rich.logging.RichHandler`` (stdout stays for
results). Levels: ``--verbose`` DEBUG, default INFO, ``--quiet`` WARNING (which also turns progress bars off,
see ``fuselip_med.progress``).
"""
from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

__all__ = ["configure_logging"]

LOGGER = "fuselip_med"


def configure_logging(level: str | int = "INFO") -> logging.Logger:
    """Set the ``fuselip_med`` logger to ``level`` ("DEBUG", "INFO", "WARNING", ... or a number) with one rich
    stderr handler (added once, however often this is called); returns the logger. Raises ``ValueError`` for
    an unknown level name."""
    logger = logging.getLogger(LOGGER)
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(number, int):
        raise ValueError(f"unknown logging level {level!r}; use DEBUG, INFO, WARNING or ERROR.")
    logger.setLevel(number)
    if not any(getattr(h, "_fuselip_med", False) for h in logger.handlers):
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
        handler._fuselip_med = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger
