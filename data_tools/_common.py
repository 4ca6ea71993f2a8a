"""Small pieces shared by the data tools: atomic writes, temp-file cleanup, the closing summary table.

Standard library, pandas and rich only, so that the download image can run the tools without the
package (and its torch) installed.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

TMP_MARK = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete, never half written."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv_atomic(path: Path, frame) -> None:
    """pandas CSV (header, no index, RFC 4180 quoting) written atomically."""
    atomic_write_text(path, frame.to_csv(index=False))


def remove_temp_files(folder: Path) -> int:
    """Delete the temp files that an interrupted run left in ``folder``; returns how many."""
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            if TMP_MARK in entry.name and entry.is_file():
                os.unlink(entry.path)
                removed += 1
    return removed


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
