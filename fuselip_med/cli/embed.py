"""``embed``: images, texts or image+text pairs from a table or folder -> an embedding matrix (.npy/.parquet),
with every row not embedded named in ``<stem>.skipped.csv``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fuselip_med.cli import common
from fuselip_med.cli.common import BASE_HELP, MODEL_HELP
from fuselip_med.cli.options import (
    CAPTION_COLUMN,
    DICOMWEB,
    DW_CA_BUNDLE,
    DW_INSECURE,
    DW_LIMIT,
    DW_MAX_CONCURRENT,
    DW_MODALITY,
    DW_RETRIES,
    DW_STUDY_DATE,
    DW_STUDY_DESCRIPTION,
    DW_USER,
    ENCODING,
    ID_COLUMN,
    IMAGE_ROOT,
    PATH_COLUMN,
    RUNTIME,
    SEP,
    dicomweb_options,
    table_options,
)
from fuselip_med.cli.units import KEEP_PATHS, PLANE, RENDER, SLICES, UNIT, WINDOW
from fuselip_med.errors import InputError, UsageError
from fuselip_med.option_names import command_line_style

__all__ = ["register"]
console = Console()


def embed(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="A CSV/TSV (path and, for text/pair, caption "
                                         "columns) or a folder of images (DICOM found by content; .txt captions for "
                                         "text/pair). Or give --dicomweb."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (ids in .ids.json beside it) or .parquet; skipped "
                             "rows are listed in <stem>.skipped.csv beside it."),
    kind: str = typer.Option("image", help="What to embed per row: image (no captions needed), text or pair "
                             "(image+caption fused)."),
    path_column: Optional[str] = PATH_COLUMN,
    caption_column: Optional[str] = CAPTION_COLUMN,
    id_column: Optional[str] = ID_COLUMN,
    sep: Optional[str] = SEP,
    image_root: Optional[str] = IMAGE_ROOT,
    encoding: Optional[str] = ENCODING,
    batch_size: int = typer.Option(64, help="Batch size."),
    num_workers: int = typer.Option(2, help="Image decoding workers."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
    dicomweb: Optional[str] = DICOMWEB,
    user: Optional[str] = DW_USER,
    ca_bundle: Optional[str] = DW_CA_BUNDLE,
    insecure: bool = DW_INSECURE,
    modality: Optional[str] = DW_MODALITY,
    study_date: Optional[str] = DW_STUDY_DATE,
    study_description: Optional[str] = DW_STUDY_DESCRIPTION,
    limit: Optional[int] = DW_LIMIT,
    max_concurrent: int = DW_MAX_CONCURRENT,
    retries: int = DW_RETRIES,
    runtime: str = RUNTIME,
    unit: str = UNIT,
    slices: int = SLICES,
    render: str = RENDER,
    window: Optional[str] = WINDOW,
    plane: str = PLANE,
    keep_paths: bool = KEEP_PATHS,
) -> None:
    """Embed images, texts or image+text pairs for search, batched, with progress; every row not embedded is named.

    With --unit series or study, --input is a folder (searched recursively), a DICOMDIR, a NIfTI file or a CSV
    listing them: DICOM is grouped into series by its UIDs, each series embedded through --slices sampled slices,
    and rows carry salted series/study keys (no paths, no UIDs); slice vectors go beside the output.

    With the default --unit image, DICOM files are named by salted instance keys (no paths unless --keep-paths;
    the salt stays in the output, so a re-run gives the same keys); PNG/JPEG rows keep their paths as ids.

    With --dicomweb the images are the instances of the series QIDO-RS finds, fetched (WADO-RS) into
    <out stem>.dicomweb/ beside --out and reused by the next run; ids are salted instance keys, not UIDs.

    Examples:\n
      fuselip-med embed -m runs/rocov2/final -i my_images/ -o image_embeddings.npy\n
      fuselip-med embed -m runs/rocov2/final -i reports.csv --kind text -o text_embeddings.parquet\n
      fuselip-med embed -m runs/rocov2/final -i train.tsv --path-column filepath --caption-column title \\\n
        --kind pair -o pairs.npy\n
      fuselip-med embed -m runs/rocov2/final -i export.csv --encoding cp1252 --image-root /data/pacs -o scans.npy\n
      fuselip-med embed -m runs/rocov2/final -i pacs_export/ --unit series --slices 16 -o series.npy\n
      fuselip-med embed -m runs/rocov2/final -i ct_rate/valid/ --unit study --render multi -o studies.parquet\n
      fuselip-med embed -m runs/rocov2/final --dicomweb https://pacs/dicom-web --user alice --modality CT -o ct.npy\n
      fuselip-med embed --runtime onnx -m exports/rocov2-int8 -i my_images/ -o image_embeddings.npy
    """
    if unit != "image":
        if dicomweb is not None or input is None:
            raise UsageError(f"--unit {unit} reads --input (a folder, DICOMDIR, NIfTI or CSV); --dicomweb embeds "
                             "images.")
        _embed_units(model, input, out, unit, slices, render, window, plane, batch_size, device, base)
        return
    from fuselip_med.cli.units import privacy_options
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.skips import SkipReport
    from fuselip_med.embed import (
        KINDS,
        embed_rows,
        open_input,
        pseudonymize_rows,
        rows_from_source,
        skipped_csv_path,
        stored_salt,
        write_embeddings,
    )
    from fuselip_med.export.runtime import load_for_runtime
    from fuselip_med.io import check_writable

    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose image, text or pair.")
    if out.suffix not in (".npy", ".parquet"):
        raise UsageError(f"--out {out}: use a .npy or .parquet file name.")
    if (input is None) == (dicomweb is None):
        raise UsageError("give --input (a table or folder) or --dicomweb URL, not both.")
    if dicomweb is not None and kind != "image":
        raise UsageError(f"--kind {kind}: a DICOMweb server gives images only; use --kind image.")
    check_writable(out.parent)  # before any work: OutputError naming the folder
    options = table_options(path_column=path_column, caption_column=caption_column, id_column=id_column, sep=sep,
                            image_root=image_root, encoding=encoding)
    with command_line_style():
        if dicomweb is not None:
            from fuselip_med.data.adapters import get_adapter

            pacs = dicomweb_options(user=user, ca_bundle=ca_bundle, insecure=insecure, modality=modality,
                                    study_date=study_date, study_description=study_description,
                                    max_concurrent=max_concurrent, retries=retries)
            cache = out.with_name(f"{out.stem}.dicomweb")
            source = get_adapter("dicomweb")(dicomweb, limit=limit, cache=str(cache), **pacs)
        else:
            source = open_input(input, kind, **options)  # type: ignore[arg-type]
    skips = SkipReport.merged([source.skipped])
    privacy = privacy_options(keep_paths, False, False)
    salt = stored_salt(out)
    pseudonyms = Pseudonyms(salt) if salt else Pseudonyms.fresh()
    rows = pseudonymize_rows(rows_from_source(source, kind, skips), pseudonyms, privacy,  # type: ignore[arg-type]
                             skips, rename=dicomweb is None)  # DICOMweb rows already carry their salted keys
    if not rows:
        raise InputError(f"{input or 'the DICOMweb server'}: no row to embed ({skips.summary()}).")
    fuselip, _ = load_for_runtime(model, runtime, device, base=base)
    matrix, kept, _ = embed_rows(fuselip, rows, batch_size=batch_size, num_workers=num_workers, skips=skips)
    keyed = dicomweb is None and any(row.dicom for row in kept)  # keys of our salt (DICOMweb: the cache's)
    written = write_embeddings(out, matrix, kept, model, pseudonyms.salt if keyed else None, privacy)
    skips.kept = len(kept)
    skipped_csv = skips.write_csv(skipped_csv_path(out))
    console.print(f"Embedded {len(kept)} {kind} rows -> {', '.join(map(str, written))} (dim {matrix.shape[1]}).",
                  markup=False, highlight=False)
    if skips.total:
        console.print(f"Skipped rows: {skips.summary()}; full list in {skipped_csv}.", style="yellow", markup=False,
                      highlight=False)


def _embed_units(model: str, input: Path, out: Path, unit: str, slices: int, render: str, window: Optional[str],
                 plane: str, batch_size: int, device: Optional[str], base: Optional[str]) -> None:
    """``embed --unit series|study``: series vectors (or study vectors) keyed by salted keys."""
    from fuselip_med.cli.units import check_unit, read_units, unit_options
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.skips import SkipReport
    from fuselip_med.embed import skipped_csv_path, stored_salt, write_unit_embeddings
    from fuselip_med.io import check_writable

    check_unit(unit)
    options = unit_options(slices, render, window)
    if out.suffix not in (".npy", ".parquet"):
        raise UsageError(f"--out {out}: use a .npy or .parquet file name.")
    check_writable(out.parent)  # before any work: OutputError naming the folder
    salt = stored_salt(out)
    pseudonyms = Pseudonyms(salt) if salt else Pseudonyms.fresh()
    skips = SkipReport()
    fuselip, _, _ = common.load_inference_model(model, device, base)
    rows = read_units(fuselip, input, unit, options, pseudonyms=pseudonyms, plane=plane, batch_size=batch_size,
                      skips=skips, listed=skipped_csv_path(out))
    skipped_csv = skips.write_csv(skipped_csv_path(out))
    if not rows:
        raise InputError(f"{input}: no series could be embedded ({skips.summary()}); the series are named in "
                         f"{skipped_csv}.")
    written = write_unit_embeddings(out, rows, model, unit, pseudonyms.salt, options.describe())
    console.print(f"Embedded {len(rows)} {unit} rows from {skips.kept} series -> {', '.join(map(str, written))} "
                  f"(dim {rows[0].vector.shape[-1]}).", markup=False, highlight=False)
    if skips.total or skips.hints:
        console.print(f"Series problems: {skips.summary()}; full list in {skipped_csv}.", style="yellow",
                      markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``embed`` to the ``fuselip-med`` app."""
    app.command()(embed)
