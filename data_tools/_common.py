"""Small pieces shared by the data tools: atomic writes and temp-file cleanup (``fuselip_med/io.py``), progress
bars (``fuselip_med/progress.py``), the closing summary table.

Standard library, pandas and rich only, so that the download image can run the tools without the
package (and its torch) installed.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType


def _load_shared(name: str) -> ModuleType:
    """``fuselip_med/<name>.py`` loaded by file path: one implementation for the package and the tools, without
    importing the package (and its torch). The download image copies these stand-alone files beside the tools."""
    path = Path(__file__).resolve().parent.parent / "fuselip_med" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fuselip_med_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_io = _load_shared("io")
atomic_write_bytes = _io.atomic_write_bytes
atomic_write_csv = _io.atomic_write_csv
atomic_write_text = _io.atomic_write_text
remove_temp_files = _io.remove_temp_files
progress_bar = _load_shared("progress").progress_bar


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print one summary table (rich when available, plain text otherwise)."""
    rows = [[str(cell) for cell in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency of the package and of the download image
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(title)
        for line in [list(columns), *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        return
    table = Table()
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs (docker, CI, pipes): one table row per line rather than 80 columns
        console.width = max(console.width, 200)
    console.print(title, highlight=False, soft_wrap=True)
    console.print(table)


def format_counter(counter) -> str:
    """``Counter({'corrupt image': 2})`` -> ``"corrupt image: 2"`` (or ``-`` when empty)."""
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counter.items())) or "-"
