"""Command-line options shared by several commands: how ``embed`` and ``eval`` read a user's table or folder (each
maps one to one onto a keyword option of the csv/folder adapter, ``--path-column`` -> ``path_column``, by
:func:`fuselip_med.option_names.flag`, so that recipes, Python and the command line use the same names), which
runtime embeds (``--runtime``: ``embed``, ``index build``, ``search``, ``serve``), and how to reach a DICOMweb
server (``index build``, ``embed``, ``search --stow``; ``--max-concurrent`` -> ``max_concurrent`` likewise)."""
from __future__ import annotations

from typing import Any, Optional

import typer

from fuselip_med.option_names import flag

__all__ = [
    "CAPTION_COLUMN", "ENCODING", "ID_COLUMN", "IMAGE_ROOT", "PATH_COLUMN", "QUERY_RUNTIME", "RUNTIME", "SEP",
    "table_options", "DICOMWEB", "DW_USER", "DW_CA_BUNDLE", "DW_INSECURE", "DW_MODALITY", "DW_STUDY_DATE",
    "DW_STUDY_DESCRIPTION", "DW_LIMIT", "DW_MAX_CONCURRENT", "DW_RETRIES", "dicomweb_options",
]

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


DICOMWEB: Optional[str] = typer.Option(
    None, flag("dicomweb"), help="Read the images from a PACS: its DICOMweb root URL, e.g. https://pacs/dicom-web "
    "(QIDO-RS search, WADO-RS retrieval). Password from FUSELIP_MED_DICOMWEB_PASSWORD or netrc, or a bearer token "
    "from FUSELIP_MED_DICOMWEB_TOKEN.")
DW_USER: Optional[str] = typer.Option(
    None, flag("user"), help="DICOMweb basic-auth user (default: the user in the URL; the password never goes on the "
    "command line).")
DW_CA_BUNDLE: Optional[str] = typer.Option(
    None, flag("ca_bundle"), help="CA certificate file to verify the server's TLS.")
DW_INSECURE: bool = typer.Option(False, flag("insecure"), help="Do not verify the server's TLS certificate (warns).")
DW_MODALITY: Optional[str] = typer.Option(
    None, flag("modality"), help="DICOMweb: only series of this modality (CT, MR, ...).")
DW_STUDY_DATE: Optional[str] = typer.Option(
    None, flag("study_date"), help="DICOMweb: only studies of this date or range, e.g. 20240101-20241231.")
DW_STUDY_DESCRIPTION: Optional[str] = typer.Option(
    None, flag("study_description"), help="DICOMweb: only studies whose description contains this text.")
DW_LIMIT: Optional[int] = typer.Option(None, flag("limit"), help="DICOMweb: at most this many series.")
DW_MAX_CONCURRENT: int = typer.Option(4, flag("max_concurrent"), help="DICOMweb: requests in flight at most.")
DW_RETRIES: int = typer.Option(
    4, flag("retries"), help="DICOMweb: tries per request on refused connections, timeouts and 5xx (backoff 0.5 s, "
    "1 s, ...).")


def dicomweb_options(*, user: str | None, ca_bundle: str | None, insecure: bool, modality: str | None,
                     study_date: str | None, study_description: str | None, max_concurrent: int,
                     retries: int) -> dict[str, Any]:
    """The dicomweb adapter options (``data.adapters.dicomweb.DicomwebOptions`` fields) the user gave."""
    return {"user": user, "ca_bundle": ca_bundle, "insecure": insecure, "modality": modality,
            "study_date": study_date, "study_description": study_description, "max_concurrent": max_concurrent,
            "retries": retries}
