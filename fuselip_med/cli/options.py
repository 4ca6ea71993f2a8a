"""Command-line options shared by several commands: how ``embed`` and ``eval`` read a user's table or folder (each
maps one to one onto a keyword option of the csv/folder adapter, ``--path-column`` -> ``path_column``, by
:func:`fuselip_med.option_names.flag`, so that recipes, Python and the command line use the same names), and which
runtime embeds (``--runtime``: ``embed``, ``index build``, ``search``, ``serve``)."""
from __future__ import annotations

from typing import Any, Optional

import typer

from fuselip_med.option_names import flag

__all__ = ["CAPTION_COLUMN", "ENCODING", "ID_COLUMN", "IMAGE_ROOT", "PATH_COLUMN", "QUERY_RUNTIME", "RUNTIME", "SEP",
           "table_options"]

PATH_COLUMN: Optional[str] = typer.Option(
    None, flag("path_column"), help="Table column holding the image paths (default: path).")
CAPTION_COLUMN: Optional[str] = typer.Option(
    None, flag("caption_column"), help="Table column holding the captions (default: caption).")
ID_COLUMN: Optional[str] = typer.Option(
    None, flag("id_column"), help="Table column holding the row IDs (default: id, else the path as written).")
SEP: Optional[str] = typer.Option(
    None, flag("sep"), help="Field separator: ',' , 'tab' or one character (default: detected from the header).")
IMAGE_ROOT: Optional[str] = typer.Option(
    None, flag("image_root"),
    help="Folder relative paths point to, and the only folder besides the table's that images may come from.")
ENCODING: Optional[str] = typer.Option(
    None, flag("encoding"), help="Text encoding of the table and captions, e.g. cp1252 or latin-1 (default: UTF-8).")

RUNTIME: str = typer.Option(
    "pytorch", "--runtime", help="pytorch (--model is a checkpoint) or onnx (--model is a folder written by "
    "`fuselip-med export`, run with ONNX Runtime on the CPU).")
QUERY_RUNTIME: Optional[str] = typer.Option(
    None, "--runtime", help="pytorch or onnx (default: the runtime the index was built with; another one is "
    "refused like another model).")


def table_options(*, path_column: str | None, caption_column: str | None, id_column: str | None, sep: str | None,
                  image_root: str | None, encoding: str | None) -> dict[str, Any]:
    """The csv/folder adapter options the user gave (the adapter's defaults apply to the others)."""
    given = {"path_column": path_column, "caption_column": caption_column, "id_column": id_column, "sep": sep,
             "image_root": image_root, "encoding": encoding}
    return {key: value for key, value in given.items() if value is not None}
