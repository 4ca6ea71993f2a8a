"""``fuselip-med explain``: why did an image match a text (or an image + instruction query)? Registered by
``register``; torch, MONAI and matplotlib are imported inside the command."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import typer

from fuselip_med.cli import common
from fuselip_med.errors import UsageError, UserError
from fuselip_med.io import check_writable, same_file

__all__ = ["register"]


class ExplainInterrupted(UserError):
    """Ctrl-C during a map: nothing is written; exit code 130 as for SIGINT."""

    exit_code = 130


def explain(
    model: str = typer.Option(..., "--model", "-m", help=common.MODEL_HELP),
    image: Path = typer.Option(..., "--image", "-i", help="The image to explain: PNG, JPEG or DICOM (a series slice "
                               "or, with --frame, a frame of a multi-frame file)."),
    text: str = typer.Option(..., "--text", "-t", help="The text it matched; with --query-image, the instruction "
                             "fused with the query image."),
    out: Path = typer.Option(..., "--out", "-o", help="Overlay PNG; the raw grid goes beside it as <stem>.npy and "
                             "<stem>.json."),
    query_image: Optional[Path] = typer.Option(None, "--query-image", help="Query image (PNG/JPEG/DICOM): explain the "
                                               "fused query (this image + --text) against --image."),
    grid: int = typer.Option(8, "--grid", help="Cells per side: 8 (32 px cells) or 16 (16 px cells)."),
    fill: str = typer.Option("blur", "--fill", help="What a hidden cell shows: blur (the cell of a blurred copy, "
                             "sigma = cell/4) or mean (the image mean)."),
    frame: Optional[int] = typer.Option(None, "--frame", help="Frame of a multi-frame DICOM (default: the middle)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Occluded copies per model pass."),
    sanity: bool = typer.Option(False, "--sanity", help="Also run the saliency sanity checks (model and text "
                                "randomisation on this image, pointing game on planted demo findings) and mark a "
                                "failing map."),
    sanity_images: int = typer.Option(16, "--sanity-images", help="Planted demo images for the pointing game "
                                      "(0 leaves it out)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    base: Optional[str] = typer.Option(None, "--base", help=common.BASE_HELP),
) -> None:
    """Show which regions of an image a match depends on: occlusion sensitivity on the pixels (each cell of a grid
    hidden in turn; the map is the drop in cosine similarity), drawn over the image with a colour bar.

    Text query: the image vs the text. With --query-image: the fused query (query image + instruction) vs the
    image. The map says where the model looks for this text, not where a finding is: check it with --sanity.

    Examples:\n
      fuselip-med explain -m runs/rocov2_demo/final --image scan.jpg --text "left pleural effusion" -o map.png\n
      fuselip-med explain -m runs/rocov2/final --image ct.dcm --text "hemorrhage" --grid 16 --sanity -o why.png\n
      fuselip-med explain -m runs/rocov2/final --image result.dcm --query-image query.dcm \\\n
        --text "the same study, lateral view" -o why.png
    """
    from fuselip_med.explain.occlusion import FILLS, GRIDS

    if not text.strip():
        raise UsageError("--text is empty: give the finding or instruction to explain, e.g. "
                         "--text \"left pleural effusion\".")
    if grid not in GRIDS:
        raise UsageError(f"--grid {grid}: choose one of {', '.join(map(str, GRIDS))}.")
    if fill not in FILLS:
        raise UsageError(f"--fill {fill!r}: choose one of {', '.join(FILLS)}.")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: give a .png file name (the grid is written beside it as .npy and .json).")
    if sanity_images < 0:
        raise UsageError(f"--sanity-images {sanity_images}: give 0 or more.")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give 1 or more.")
    if frame is not None and frame < 0:
        raise UsageError(f"--frame {frame}: give a frame number, 0 or more (0 is the first frame).")
    inputs = [(path, flag) for path, flag in ((image, "--image"), (query_image, "--query-image")) if path is not None]
    for path, flag in inputs:
        common.check_image_file(path, flag)
    for written in (out, out.with_suffix(".npy"), out.with_suffix(".json")):
        for path, flag in inputs:
            if same_file(written, path):
                raise UsageError(f"--out {out}: {written} would replace {flag} {path}; name another file.")
    check_writable(out.parent)  # before the model loads and the map is computed: OutputError naming the folder
    _run(model, image, text, out, query_image, grid, fill, frame, batch_size, sanity, sanity_images, device, base)


def _run(model_name, image, text, out, query_image, grid, fill, frame, batch_size, sanity, sanity_images, device,
         base) -> None:
    import numpy as np
    from rich.console import Console

    from fuselip_med.data.images import DecodeOptions
    from fuselip_med.explain.occlusion import OcclusionExplainer, load_explain_image
    from fuselip_med.explain.overlay import overlay_png
    from fuselip_med.explain.sanity import Case, run_sanity
    from fuselip_med.io import atomic_write_bytes, atomic_write_json
    from fuselip_med.progress import progress_bar

    console = Console()
    display, pixels = load_explain_image(image, grid, DecodeOptions(frame=frame))  # bad input: before the model
    query_pixels = None if query_image is None else load_explain_image(query_image, 1)[1]  # embedded whole
    fuselip, _, _ = common.load_inference_model(model_name, device, base)
    explainer = OcclusionExplainer(grid=grid, fill=fill, batch_size=batch_size, keep=max(4, sanity_images + 2))
    n_maps = 1 + (4 + sanity_images if sanity else 0)  # map; trained/random and text/unrelated pairs; planted
    checks = []
    try:
        with progress_bar(None, "explain", unit="model pass", console=Console(stderr=True)) as bar:
            reporting = _reporting(explainer, bar, n_maps)
            result = reporting(fuselip, pixels, text, query_image=query_pixels)
            if sanity:
                checks = run_sanity(fuselip, reporting, [Case(pixels, text, query_pixels)], n_planted=sanity_images)
    except KeyboardInterrupt:
        raise ExplainInterrupted("interrupted: no map written.") from None
    failed = [c.name for c in checks if not c.passed]
    record = {"text": text, "query_image": query_image is not None, "model": model_name, **result.to_dict()}
    if checks:
        record["sanity"] = {c.name: c.to_dict() for c in checks}
        record["sanity_passed"] = not failed
    heading = (f"why \u201c{text}\u201d" if query_pixels is None else f"why the query image + \u201c{text}\u201d")
    atomic_write_bytes(out, overlay_png(display, result, title=f"{heading} matched", failed=failed))
    grid_file = io.BytesIO()
    np.save(grid_file, result.drops)
    atomic_write_bytes(out.with_suffix(".npy"), grid_file.getvalue())
    atomic_write_json(out.with_suffix(".json"), record)
    row, col = result.max_cell
    console.print(f"Wrote {out} (overlay), {out.with_suffix('.npy')} ({grid}x{grid} drops) and "
                  f"{out.with_suffix('.json')}. Similarity before {result.similarity_before:.4f}; largest drop "
                  f"{result.drops[row, col]:.4f} at row {row}, column {col} (0 = top left).", highlight=False,
                  markup=False)
    for check in checks:
        console.print(check.line(), style=None if check.passed else "bold red", highlight=False, markup=False)
    if failed:
        console.print(f"The map failed: {', '.join(failed)}; it is marked so in {out} and {out.with_suffix('.json')}.",
                      style="yellow", highlight=False, markup=False)


def _reporting(explainer, bar, n_maps: int):
    """``explainer`` with its progress on ``bar``: the model passes of the current map, and which map it is."""
    count = 0

    def call(model, image, text, *, query_image=None):
        nonlocal count
        count += 1
        bar.note(f"map {min(count, n_maps)} of {n_maps}")
        return explainer(model, image, text, query_image=query_image,
                         on_progress=lambda done, total: bar.set(done, total=total))

    return call


def register(app: typer.Typer) -> None:
    """Add ``explain`` to the ``fuselip-med`` app."""
    app.command("explain")(explain)
