"""What the radiology benchmark readers share: finding the image a table row names, and the half rule.

A published table names its images relative to where the release unpacks (CheXpert's ``Path`` starts with
``CheXpert-v1.0-small/`` and its CSV sits inside that folder; RSNA and VinDr-CXR name an ID whose DICOM sits in a
split folder). :func:`resolve_image` tries the table's folder and its two parents, then the given sub-folders and
suffixes. A row whose image is missing, or whose fields are unusable, is a named skip
(:class:`~fuselip_med.data.skips.SkipReport`); :func:`check_half` refuses a run where fewer than half of the listed
rows are evaluable unless ``--allow-partial`` (the rule of :func:`~fuselip_med.eval.tasks.context.check_coverage`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fuselip_med.data.skips import SkipReport
from fuselip_med.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "resolve_image", "check_half", "read_table"]

IMAGE_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


def resolve_image(table: str | os.PathLike, name: str, *, folders: Sequence[str] = ("",),
                  suffixes: Sequence[str] = ("",)) -> Path | None:
    """The existing file a row names: ``name`` (+ a suffix) under a folder of ``folders`` below the directory of
    ``table``, its parent or grandparent (first found); an absolute ``name`` as is. None when none exists."""
    if not name:
        return None
    given = Path(name).expanduser()
    if given.is_absolute():
        return given if given.is_file() else None
    here = Path(table).expanduser().resolve().parent
    for base in (here, here.parent, here.parent.parent):
        for folder in folders:
            for suffix in suffixes:
                candidate = base / folder / f"{name}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def check_half(name: str, n_evaluated: int, n_listed: int, skips: SkipReport, allow_partial: bool) -> None:
    """``InputError`` (naming the reasons and example IDs) when fewer than half of the ``n_listed`` rows of ``name``
    are evaluable and ``allow_partial`` is False: the one half rule of every evaluation task."""
    if allow_partial or 2 * n_evaluated >= n_listed:
        return
    from fuselip_med.data.adapters import advise_option

    skips.kept = n_evaluated
    raise InputError(f"only {n_evaluated} of the {n_listed} rows listed by {name} can be evaluated "
                     f"({skips.summary()}); fix the data, or pass {advise_option('allow_partial', None)} "
                     "to evaluate the rest.")


def read_table(path: str | os.PathLike, what: str):
    """A CSV as a pandas DataFrame of strings (blank cells as ""); ``ValueError`` naming ``what`` and the file when
    it is missing or not CSV."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{what}: {file} is not a file")
    try:
        return pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{what}: cannot read {file} as CSV ({error})") from None
