"""``fuselip-med data radcrepe``: write the RadCrepe hard-negative set once (SugarCrepe's layout), so that every
model is scored on the same items (added to the ``data`` group by :func:`register`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fuselip_med.errors import UsageError

__all__ = ["register", "radcrepe"]


def radcrepe(
    input: str = typer.Option(..., "--input", "-i", help="Caption source: a ROCOv2 folder (official or parquet "
                              "mirror), a hub id, or a CSV/TSV/folder for --adapter folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <edit type>.json (and images/ for embedded ones)."),
    adapter: str = typer.Option("rocov2", help="Adapter to read --input with (rocov2, folder, csv, ...)."),
    split: str = typer.Option("test", help="Split to read (train, valid, test)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many captions (the first ones)."),
) -> None:
    """Write RadCrepe: for each caption, rule-made edits that change one fact (laterality, negation, modality,
    body region, size/number), one JSON per edit type as SugarCrepe lays it out.

    Examples:\n
      fuselip-med data radcrepe --input ROCOv2_data --out radcrepe\n
      fuselip-med eval -m runs/rocov2/final -t radcrepe --data radcrepe=radcrepe
    """
    from fuselip_med.data.adapters import get_adapter
    from fuselip_med.eval.radcrepe import write_radcrepe
    from fuselip_med.io import check_writable
    from fuselip_med.progress import progress_bar

    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: give 1 or more (or leave it out to read every caption).")
    check_writable(out)  # before the captions are read: OutputError naming the folder
    source = get_adapter(adapter)(path=input, split=split)
    n = len(source) if limit is None else min(limit, len(source))

    def items():
        with progress_bar(n, "reading captions") as bar:
            for i in range(n):
                s = source[i]
                image = s.query.image if s.query.image is not None else s.target.image
                caption = s.target.text or s.query.text
                bar.set(i + 1)
                if image is not None and caption:
                    yield s.id, image, caption

    counts = write_radcrepe(items(), out)
    Console().print("Wrote " + ", ".join(f"{k}.json ({v})" for k, v in counts.items()) + f" to {out}.",
                    highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``radcrepe`` to the ``data`` command group ``app``."""
    app.command("radcrepe")(radcrepe)
