"""The search commands of ``fuselip-med``: ``index build``, ``search`` and ``serve`` (registered by
``register``; heavy imports happen inside the commands)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fuselip_med.cli.common import check_image_file
from fuselip_med.cli.options import (
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
    QUERY_RUNTIME,
    RUNTIME,
    dicomweb_options,
)
from fuselip_med.cli.units import ALLOW_BURNED_IN, KEEP_PATHS, PLANE, RENDER, SHOW_PATHS, SLICES, UNIT, WINDOW
from fuselip_med.errors import MissingExtraError, UsageError

__all__ = ["register"]

index_app = typer.Typer(help="Build and update a search index over a folder of images.", no_args_is_help=True)
INDEX_TYPES = "auto, flat (exact), ivf or hnsw"


@index_app.command("build")
def index_build(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint: hub id, local directory, .pt/.safetensors."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="What `embed` reads: a folder of images "
                                         "(PNG/JPEG/DICOM, <image>.txt captions), a CSV/TSV (path, caption), or a "
                                         "dataset for --adapter. Or give --dicomweb."),
    out: Path = typer.Option(..., "--out", "-o", help="Index directory (created, or updated in place)."),
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
    adapter: str = typer.Option("folder", help="Dataset adapter that lists --input: folder, csv, rocov2, ..."),
    split: str = typer.Option("train", help="Split for adapters that have splits (rocov2: train, valid, test)."),
    index_type: str = typer.Option("auto", "--index-type", help=f"FAISS index: {INDEX_TYPES}; auto = exact up to "
                                   "--exact-max vectors, hnsw above."),
    exact_max: int = typer.Option(200_000, help="Largest index searched exactly when --index-type is auto."),
    nlist: Optional[int] = typer.Option(None, help="IVF lists (default 4*sqrt(N), a power of two)."),
    nprobe: int = typer.Option(128, help="IVF lists searched per query."),
    hnsw_m: int = typer.Option(32, help="HNSW links per node."),
    ef_search: int = typer.Option(128, help="HNSW search beam width."),
    batch_size: int = typer.Option(32, help="Embedding batch size."),
    chunk_size: int = typer.Option(256, help="Images per resumable chunk (a killed build redoes one chunk at most; "
                                   "--unit series/study: chunk-size / slices series per chunk)."),
    rebuild: bool = typer.Option(False, help="Replace an index built with another model instead of refusing."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: this process's Accelerate device)."),
    runtime: str = RUNTIME,
    unit: str = UNIT,
    slices: int = SLICES,
    render: str = RENDER,
    window: Optional[str] = WINDOW,
    plane: str = PLANE,
    keep_paths: bool = KEEP_PATHS,
    show_paths: bool = SHOW_PATHS,
    allow_burned_in: bool = ALLOW_BURNED_IN,
) -> None:
    """Embed a folder (or any dataset `embed` reads) into a search index; re-run to update it incrementally.

    Only new or changed images (by content hash) are embedded, deleted ones are dropped; a killed build
    resumes where it stopped. Under `accelerate launch` each process embeds its share. With --dicomweb the
    series found by QIDO-RS are fetched (WADO-RS) into <out>/.dicomweb; a rebuild fetches only instances not
    fetched yet (by SOP Instance UID) and drops those deleted on the server. DICOM files are rows
    under salted instance keys with the index's own thumbnails; their paths are stored only with --keep-paths.

    With --unit series or study, --input is a PACS export folder, a DICOMDIR, NIfTI files or a CSV listing them;
    rows are series (or studies) under salted keys, each with its sampled slices' vectors and thumbnails, so
    `search` answers study / series / best slice. No DICOM path is stored unless --keep-paths.

    Examples:\n
      fuselip-med index build -m runs/rocov2/final -i my_images/ -o my_index\n
      FUSELIP_MED_DICOMWEB_PASSWORD=... fuselip-med index build -m runs/rocov2/final \\
        --dicomweb https://pacs/dicom-web --user alice --modality CT --study-date 20240101-20241231 -o ct_index\n
      fuselip-med index build -m runs/rocov2/final -i ROCOv2_data --adapter rocov2 --split test -o rocov2_index\n
      accelerate launch --num_processes 4 -m fuselip_med.cli index build -m chs20/FuseLIP-S-CC3M-MM -i pacs/ -o idx\n
      fuselip-med index build -m runs/rocov2/final -i pacs_export/ --unit series --slices 16 -o series_index\n
      fuselip-med index build -m runs/rocov2/final -i ct_rate/ --unit study --render multi -o study_index\n
      fuselip-med index build --runtime onnx -m exports/rocov2-int8 -i my_images/ -o my_index
    """
    if (input is None) == (dicomweb is None):
        raise UsageError("give --input (a folder, table or dataset) or --dicomweb URL, not both.")
    options = dicomweb_options(user=user, ca_bundle=ca_bundle, insecure=insecure, modality=modality,
                               study_date=study_date, study_description=study_description,
                               max_concurrent=max_concurrent, retries=retries)
    if unit != "image":
        if dicomweb is not None:  # the fetched instances are an export folder like any other (grouped by UIDs)
            input = _fetch_for_units(dicomweb, out, limit, options)
        _build_unit_index(model, input, out, unit, slices, render, window, plane, batch_size, device, rebuild,
                          keep_paths, show_paths, allow_burned_in, chunk_size, runtime)
        return
    import torch
    from accelerate import PartialState
    from rich.console import Console

    from fuselip_med.cli.units import privacy_options
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.skips import SKIPPED_CSV
    from fuselip_med.export.runtime import load_for_runtime
    from fuselip_med.io import check_writable
    from fuselip_med.search.index import IndexSettings, build_index, index_salt, list_entries

    check_writable(out)  # before any work: OutputError naming the folder
    settings = IndexSettings(index_type=index_type, exact_max=exact_max, nlist=nlist, nprobe=nprobe,  # type: ignore[arg-type]
                             hnsw_m=hnsw_m, ef_search=ef_search, batch_size=batch_size, chunk_size=chunk_size)
    privacy = privacy_options(keep_paths, show_paths, allow_burned_in)
    pseudonyms = Pseudonyms(index_salt(out, rebuild))
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())  # CPU: several gloo processes
    fetched = None
    if dicomweb is not None:
        from fuselip_med.search.pacs import dicomweb_entries

        entries, listed_skips, fetched = dicomweb_entries(dicomweb, out, limit=limit, process=state, **options)
    else:
        entries, listed_skips = list_entries(input, adapter=adapter, split=split, pseudonyms=pseudonyms,
                                             privacy=privacy)
    fuselip, model_id = load_for_runtime(model, runtime, device or state.device)
    console = Console()
    report = build_index(out, entries, fuselip, model_id, settings,
                         rebuild=rebuild, accelerator=state if state.num_processes > 1 else None,
                         salt=pseudonyms.salt if dicomweb is None else None, privacy=privacy)
    if not state.is_main_process:
        return
    if fetched is not None:
        console.print(_sync_line(fetched, len(entries)), highlight=False)
    if report.repaired:
        console.print(f"[yellow]Repaired:[/] {report.repaired}; rebuilt from the images.", highlight=False)
    state_word = "up to date" if report.up_to_date else "written"
    console.print(f"Index {out} {state_word}: {report.n_rows} images ({report.index_type}), {report.n_captions} "
                  f"captions; embedded {report.embedded_images} images (+{report.embedded_elsewhere} by other "
                  f"processes or an interrupted run) and {report.embedded_captions} captions, "
                  f"reused {report.reused_images}, removed {report.removed}.", highlight=False)
    skips = report.skips.extend(listed_skips)
    skips.unit = "images"
    listed = skips.write_csv(out / SKIPPED_CSV)  # this build's list, also when empty (no stale list is left)
    if skips.total:
        console.print(f"{skips.summary()}; the skipped images are named in {listed}.", style="yellow", markup=False,
                      highlight=False)


def _fetch_for_units(url: str, out: Path, limit: Optional[int], options: dict) -> Path:
    """Sync the index's DICOMweb cache (by SOP Instance UID: only new instances are fetched, deleted ones dropped)
    and return its folder of fetched instances, which the series reader reads like an export folder."""
    from rich.console import Console

    from fuselip_med.data.adapters.dicomweb import INDEX_CACHE
    from fuselip_med.io import check_writable
    from fuselip_med.search.pacs import dicomweb_entries

    check_writable(out)
    entries, _, fetched = dicomweb_entries(url, out, limit=limit, **options)
    Console().print(_sync_line(fetched, len(entries)), highlight=False)
    return out / INDEX_CACHE / "objects"


def _sync_line(fetched, n_instances: int) -> str:
    """The one-line account of a DICOMweb sync (``data.adapters.dicomweb.SyncReport``)."""
    return (f"DICOMweb: {fetched.series} series, {n_instances} instances; fetched {fetched.fetched}, "
            f"dropped {fetched.dropped}.")


def _build_unit_index(model: str, input: Path, out: Path, unit: str, slices: int, render: str,
                      window: Optional[str], plane: str, batch_size: int, device: Optional[str], rebuild: bool,
                      keep_paths: bool, show_paths: bool, allow_burned_in: bool, chunk_size: int,
                      runtime: str) -> None:
    """``index build --unit series|study`` (one process): unchanged series reuse their slice vectors, a killed
    build resumes (``search.index.build_unit_index``)."""
    from rich.console import Console

    from fuselip_med.cli.units import check_unit, list_series, privacy_options, unit_options
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.skips import SKIPPED_CSV, SkipReport
    from fuselip_med.export.runtime import load_for_runtime
    from fuselip_med.io import check_writable
    from fuselip_med.search.index import IndexSettings, build_unit_index, index_salt

    check_unit(unit)
    options = unit_options(slices, render, window)
    privacy = privacy_options(keep_paths, show_paths, allow_burned_in)
    settings = IndexSettings(batch_size=batch_size, chunk_size=chunk_size)
    check_writable(out)  # before any work (the salt of a first build is kept in it at once)
    pseudonyms = Pseudonyms(index_salt(out, rebuild))
    fuselip, model_id = load_for_runtime(model, runtime, device or "cpu")
    skips = SkipReport()
    series = list_series(input, pseudonyms, skips, plane=plane, listed=out / SKIPPED_CSV)
    report = build_unit_index(out, series, fuselip, model_id, unit, pseudonyms.salt,
                              options, settings, privacy=privacy, skips=skips, rebuild=rebuild, progress=True)
    console = Console()
    console.print(f"Index {out} {'up to date' if report.up_to_date else 'written'}: {report.n_rows} {unit} rows from "
                  f"{skips.kept} series, {report.n_slices} slices; embedded {report.embedded_images} series "
                  f"(+{report.embedded_elsewhere} from an interrupted run), reused {report.reused_images}, "
                  f"removed {report.removed}.", highlight=False)
    listed = skips.write_csv(out / SKIPPED_CSV)  # this build's list, also when empty (no stale list is left)
    if skips.total or skips.hints:
        console.print(f"Series problems: {skips.summary()}; named in {listed}.", style="yellow", markup=False,
                      highlight=False)


def search(
    index: Path = typer.Option(..., "--index", help="An index directory written by `fuselip-med index build`."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Query text; with --image, the instruction fused "
                                       "with the image (\"the same view, lateral\")."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query image: PNG, JPEG or DICOM."),
    k: int = typer.Option(10, "-k", help="Number of results."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Query model (default: the one the index was "
                                        "built with; another model is refused)."),
    target: str = typer.Option("image", help="Search the image vectors (image) or the caption vectors (caption)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    runtime: Optional[str] = QUERY_RUNTIME,
    export_kos: Optional[Path] = typer.Option(None, "--export-kos", help="Write the DICOM hits as a Key Object "
                                              "Selection document (\"Similar cases\", in the query's study) to this "
                                              ".dcm file. It carries the real UIDs and patient module. An "
                                              "existing file is refused unless --force; the query image always."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --export-kos file (never the query "
                               "image)."),
    stow: Optional[str] = typer.Option(None, "--stow", help="Store that Key Object Selection on this DICOMweb root "
                                       "with STOW-RS (credentials as for --dicomweb)."),
    user: Optional[str] = DW_USER,
    ca_bundle: Optional[str] = DW_CA_BUNDLE,
    insecure: bool = DW_INSECURE,
    retries: int = DW_RETRIES,
) -> None:
    """Search an index by text, by image (DICOM too), or by image + instruction fused into one query.

    Examples:\n
      fuselip-med search --index my_index --text "CT with a left pleural effusion"\n
      fuselip-med search --index my_index --image study.dcm -k 5\n
      fuselip-med search --index my_index --image study.dcm --text "the same study, lateral view" --json\n
      fuselip-med search --index my_onnx_index --runtime onnx --model exports/rocov2-int8 --text "effusion"\n
      fuselip-med search --index ct_index --image query.dcm -k 5 --export-kos similar.dcm \\
        --stow https://pacs/dicom-web --user alice\n
      fuselip-med search --index ct_index --image query.dcm --export-kos similar.dcm --force
    """
    from rich.console import Console
    from rich.table import Table

    from fuselip_med.search.index import open_index
    from fuselip_med.search.query import load_index_model, search as run_search

    if not (text and text.strip()) and image is None:
        raise UsageError("give --text, --image, or both (--image with --text is an image + instruction query).")
    if k < 1:
        raise UsageError(f"-k {k}: ask for at least one result.")
    if target not in ("image", "caption"):
        raise UsageError(f"--target {target!r}: choose image or caption.")
    if image is not None:
        check_image_file(image, "--image")
    if export_kos is not None:
        from fuselip_med.search.kos import check_kos_target

        check_kos_target(export_kos, image, force)
    opened = open_index(index)
    fuselip, _ = load_index_model(opened, model, runtime=runtime)
    hits = run_search(opened, fuselip, text=text, image=image, k=k, target=target)
    if export_kos is not None or stow is not None:
        _export_kos(hits, text, image, export_kos, stow, dicomweb_options(
            user=user, ca_bundle=ca_bundle, insecure=insecure, modality=None, study_date=None,
            study_description=None, max_concurrent=1, retries=retries))
    if as_json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=1))
        return
    table = Table(title=f"{len(hits)} results from {index}")
    if hits and hits[0].unit != "image":
        for column in ("rank", "score", "study", "series", "best slice", "slice score"):
            table.add_column(column, overflow="fold")
        for hit in hits:
            table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.study or "", hit.series or "", hit.best_slice or "",
                          f"{hit.slice_score:.4f}" if hit.slice_score is not None else "")
        Console().print(table)
        return
    for column in ("rank", "score", "id", "path", "caption"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left",
                         overflow="fold")  # ids and paths wrap whole instead of being cut
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.id, hit.path or "", hit.caption or "")
    Console().print(table)


def _export_kos(hits, text: str | None, image: Path | None, out: Path | None, stow: str | None,
                options: dict) -> None:
    """Write and/or STOW-RS the Key Object Selection of the DICOM hits (``search/kos.py``); one line to stderr."""
    from rich.console import Console

    from fuselip_med.data.adapters.dicomweb import DicomwebOptions, open_server
    from fuselip_med.search.kos import KosError, similar_cases_kos, stow_kos, write_kos
    from fuselip_med.search.pacs import hit_uids

    dicom_hits = [hit.path for hit in hits if hit_uids(hit.path) is not None]
    unstored = sum(hit.path is None and (hit.source == "dicom" or hit.unit != "image") for hit in hits)
    if not dicom_hits and unstored:
        raise KosError(f"--export-kos/--stow: the index holds no file of its {unstored} DICOM hits (it was built "
                         "without --keep-paths, so it keeps no UID), and a Key Object Selection must name their "
                         "instances; rebuild the index with --keep-paths to allow it.")
    server = open_server(stow, DicomwebOptions(cache="", **options)) if stow is not None else None
    query_image = image if image is not None and hit_uids(image) is not None else None
    query = " + ".join(part for part in ("query image" if image is not None else None, text) if part)  # no file name
    document = similar_cases_kos(dicom_hits, query, query_image=query_image)
    done = []
    if out is not None:
        done.append(f"written to {write_kos(document, out)}")
    if server is not None:
        stow_kos(document, server)
        done.append(f"stored on {server.url}")
    left_out = len(hits) - len(dicom_hits) - unstored
    notes = ([f"{left_out} hits that are not DICOM"] if left_out else []) + (
        [f"{unstored} DICOM hits without a stored file (indexed without --keep-paths)"] if unstored else [])
    Console(stderr=True).print(f"Key Object Selection of {len(dicom_hits)} hits {' and '.join(done)}"
                               + (f"; left out: {', '.join(notes)}." if notes else "."),
                               highlight=False, markup=False, soft_wrap=True)


def serve(
    index: Path = typer.Option(..., "--index", help="An index directory written by `fuselip-med index build`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default is reachable from this machine only."),
    port: int = typer.Option(7860, help="Port to listen on."),
    k: int = typer.Option(12, "-k", help="Results per query."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Query model (default: the index's)."),
    runtime: Optional[str] = QUERY_RUNTIME,
    viewer_url: Optional[str] = typer.Option(None, "--viewer-url", help="For an index built with --dicomweb: link "
                                             "each hit to the PACS viewer; a URL template with {study}, {series}, "
                                             "{instance} (the real UIDs, read from the cached files)."),
) -> None:
    """Serve a search page (Gradio) over an index: text, image (PNG/JPEG/DICOM) + instruction, "more like this".

    Needs the app extra: pip install "fuselip_med[app]". Runs on CPU; only images listed in the index are shown.

    Examples:\n
      fuselip-med serve --index my_index\n
      fuselip-med serve --index my_index --port 8080\n
      fuselip-med serve --index ct_index --viewer-url "https://pacs/ohif/viewer?StudyInstanceUIDs={study}"
    """
    from fuselip_med.search.index import open_index
    from fuselip_med.search.query import load_index_model

    try:
        from fuselip_med.search.app import serve as serve_page
    except ImportError as error:
        message = f"serve needs Gradio ({error}); install it with: pip install 'fuselip_med[app]'."
        raise MissingExtraError(message) from None
    from fuselip_med.search.pacs import check_viewer_url

    if viewer_url is not None:
        check_viewer_url(viewer_url)
    opened = open_index(index)
    fuselip, _ = load_index_model(opened, model, runtime=runtime)
    serve_page(opened, fuselip, host=host, port=port, k=k, viewer_url=viewer_url)


def register(app: typer.Typer) -> None:
    """Add ``index build``, ``search`` and ``serve`` to the ``fuselip-med`` app."""
    app.add_typer(index_app, name="index")
    app.command("search")(search)
    app.command("serve")(serve)
