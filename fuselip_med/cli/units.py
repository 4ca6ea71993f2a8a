"""Command-line options and runs shared by ``embed --unit`` and ``index build --unit`` (series/study units) and
the privacy switches every writer honours (``--keep-paths``, ``--show-paths``, ``--allow-burned-in``).

Heavy imports (torch, MONAI) happen inside the functions."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fuselip_med.errors import UsageError

__all__ = ["ALLOW_BURNED_IN", "KEEP_PATHS", "PLANE", "RENDER", "SHOW_PATHS", "SLICES", "UNIT", "WINDOW",
           "UNITS", "check_unit", "list_series", "privacy_options", "read_units", "unit_options"]

UNITS = ("image", "series", "study")  # what one vector stands for (--unit)

UNIT: str = typer.Option("image", "--unit", help="What one vector stands for: image (each file; default), series "
                         "(DICOM series / NIfTI volume: mean of its sampled slices) or study (mean of its series).")
SLICES: int = typer.Option(16, "--slices", help="Slices sampled evenly along each series (--unit series/study).")
RENDER: str = typer.Option("plain", "--render", help="Slice rendering: plain (the file's window, or --window) or "
                           "multi (three CT windows as the channels; multi:lung,mediastinum,bone by default).")
WINDOW: Optional[str] = typer.Option(None, "--window", help="Window preset for plain rendering (lung, mediastinum, "
                                     "bone, brain, ...); default: the DICOM file's own window.")
PLANE: str = typer.Option("acquisition", "--plane", help="Slice plane of NIfTI volumes: acquisition (the file's "
                          "own slice axis), or axial / coronal / sagittal for isotropic volumes.")
KEEP_PATHS: bool = typer.Option(False, "--keep-paths", help="Store the file paths of DICOM inputs (off: PACS "
                                "folders are often named after patients; rows carry salted keys instead).")
SHOW_PATHS: bool = typer.Option(False, "--show-paths", help="Show stored paths on the search page (needs "
                                "--keep-paths; default: keys only).")
ALLOW_BURNED_IN: bool = typer.Option(False, "--allow-burned-in", help="Keep thumbnails of images that may carry "
                                     "burned-in text (BurnedInAnnotation YES, ultrasound, secondary capture).")


def unit_options(slices: int, render: str, window: Optional[str]):
    """The typed ``units.UnitOptions`` for the command-line values (``UsageError`` naming a bad value)."""
    from fuselip_med.data.volumes import Rendering
    from fuselip_med.inference.units import UnitOptions

    try:
        return UnitOptions(slices=slices, rendering=Rendering.parse(render, window))
    except ValueError as error:
        raise UsageError(str(error)) from None


def privacy_options(keep_paths: bool, show_paths: bool, allow_burned_in: bool):
    """The typed ``phi.PrivacyOptions`` (``UsageError`` for --show-paths without --keep-paths)."""
    from fuselip_med.data.phi import PrivacyOptions

    try:
        return PrivacyOptions(keep_paths=keep_paths, show_paths=show_paths, allow_burned_in=allow_burned_in)
    except ValueError as error:
        raise UsageError(str(error)) from None


def list_series(input: Path, pseudonyms, skips, *, plane: str, listed: Path) -> list:
    """The series under ``input`` (``data.studies.find_series``). When it holds no usable series, the skip list
    is written to ``listed`` (skipped.csv) and the ``StudiesError`` (one line: reasons with example keys) names it."""
    from fuselip_med.data.studies import StudiesError, find_series

    try:
        return find_series(input, pseudonyms, skips, plane=plane)  # type: ignore[arg-type]
    except StudiesError as error:
        if not skips.entries:
            raise
        raise StudiesError(f"{error} Named in {skips.write_csv(listed)}.") from None


def read_units(model, input: Path, unit: str, options, *, pseudonyms, plane: str, batch_size: int, skips,
               listed: Path):
    """List the series under ``input`` (``list_series``) and embed them: ``units.UnitRow``s of ``unit`` (series or
    study). Raises ``StudiesError`` when ``input`` holds no usable series (the skip list written to ``listed``)."""
    from fuselip_med.inference.units import embed_series, unit_rows

    series = list_series(input, pseudonyms, skips, plane=plane, listed=listed)
    embedded = embed_series(model, series, options, batch_size=batch_size, skips=skips, progress=True)
    skips.kept = len(embedded)
    return unit_rows(embedded, unit) if embedded else []


def check_unit(unit: str, allowed: tuple[str, ...] = UNITS) -> None:
    """``UsageError`` unless ``unit`` is one of ``allowed``."""
    if unit not in allowed:
        raise UsageError(f"--unit {unit!r}: choose {', '.join(allowed[:-1])} or {allowed[-1]}.")
