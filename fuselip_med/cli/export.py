"""``fuselip-med export``: a FuseLIP checkpoint (LoRA adapters merged) as ONNX graphs, written only when the
quality gate passes (``export.gate``). Heavy imports happen inside the command."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fuselip_med.errors import UsageError

__all__ = ["register"]

def export(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint: hub id, local directory, .pt file or LoRA "
                              "adapter directory (merged into its base first)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder (replaced when it holds an earlier export)."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or int8 (ONNX Runtime quantization)."),
    int8_mode: str = typer.Option("dynamic", "--int8-mode", help="int8 only: dynamic (activations quantized per "
                                  "batch at run time) or static (QDQ, per-channel weights, activation ranges "
                                  "calibrated on the reference images)."),
    int8_scope: str = typer.Option("all", "--int8-scope", help="int8 only: all (both graphs) or encoder (the "
                                   "FuseLIP encoder int8, the TiTok graph fp32 so its codes stay exact)."),
    titok_fp32_blocks: int = typer.Option(0, "--titok-fp32-blocks", help="int8, scope all: keep TiTok's last N "
                                          "transformer blocks fp32 (nearest the VQ argmin)."),
    calibration_method: str = typer.Option("minmax", "--calibration-method", help="static int8: minmax, entropy "
                                           "or percentile (ONNX Runtime's calibrators)."),
    calibration_size: int = typer.Option(32, "--calibration-size", help="static int8: images of the reference set "
                                         "that the activation ranges are calibrated on."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Reference set for the gate: a folder "
                                               "of images with <image>.txt captions, or a CSV/TSV (path, caption); "
                                               "default: the bundled demo images and captions."),
    reference_size: int = typer.Option(200, "--reference-size", help="Images of the reference set used (the demo "
                                       "renders this many; a --calibration set is cut to it)."),
    min_code_agreement: Optional[float] = typer.Option(None, "--min-code-agreement", help="Least share of TiTok "
                                                       "codes equal to PyTorch fp32's, 0-1 (fp32 default 0.999; "
                                                       "int8: unchecked)."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Least cosine to PyTorch fp32 of any "
                                               "image, text or image+text row (fp32 default 0.9999, int8 0.99)."),
    max_r1_change: Optional[float] = typer.Option(None, "--max-r1-change", help="Largest |R@1 change| in points "
                                                  "on the reference set, both directions (int8 default 1; fp32: "
                                                  "unchecked)."),
    keep_rejected: bool = typer.Option(False, "--keep-rejected", help="Write an export that misses its gate to "
                                       "<out>.rejected with its report (it is never written to --out)."),
    batch_size: int = typer.Option(16, help="Batch size while measuring the gate."),
    base: Optional[str] = typer.Option(None, "--base", help="For a LoRA adapter: its base model, replacing the "
                                       "recorded one."),
) -> None:
    """Export a model to ONNX (fp32 or int8) for CPU servers, behind a quality gate.

    Two graphs: titok.onnx (pixels -> 128 code ids, the VQ argmin inside) and encoder.onnx (joint ids -> unit
    embeddings), dynamic batch and text length, with the tokenizer files and config.json beside them. Before
    anything is written the export is compared with the PyTorch fp32 model on a reference set (code agreement,
    cosine per row kind, R@1/R@10 change); the figures go into export_report.json and the model card (README.md).
    An export that misses a tolerance is not written and the command exits 1 naming the failing figure.

    Examples:\n
      fuselip-med export -m runs/rocov2/final --out exports/rocov2-fp32\n
      fuselip-med export -m runs/rocov2/final --precision int8 --out exports/rocov2-int8\n
      fuselip-med export -m runs/rocov2_lora/final --precision int8 --calibration my_pairs.csv --out exports/int8\n
      fuselip-med export -m chs20/FuseLIP-S-CC3M-MM --precision int8 --int8-scope encoder --keep-rejected -o x\n
      fuselip-med export -m runs/rocov2/final --precision int8 --int8-mode static --calibration-method entropy -o y\n
      fuselip-med search --index my_index --runtime onnx --model exports/rocov2-int8 --text "pleural effusion"
    """
    from fuselip_med.core.loading import load_model
    from fuselip_med.export.gate import (
        ExportSetupError,
        Tolerances,
        check_out,
        demo_reference,
        folder_reference,
        gated_export,
    )
    from fuselip_med.export.onnx import PRECISIONS
    from fuselip_med.export.quantize import Int8Settings, Int8SettingsError
    from fuselip_med.export.runtime import require_onnxruntime
    from fuselip_med.io import check_writable
    from fuselip_med.progress import progress_bar
    from fuselip_med.search.index import model_fingerprint

    if format != "onnx":
        raise UsageError(f"--format {format!r}: the one export format is onnx.")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    try:
        int8 = Int8Settings(mode=int8_mode, scope=int8_scope, calibration_method=calibration_method,
                            titok_fp32_blocks=titok_fp32_blocks)
    except Int8SettingsError as error:
        raise UsageError(f"{error}.") from None
    if calibration_size < 1:
        raise UsageError(f"--calibration-size {calibration_size}: use at least 1 image.")
    if reference_size < 2:
        raise UsageError(f"--reference-size {reference_size}: use at least 2 images.")
    require_onnxruntime()
    check_out(out)  # before the model loads (seconds): a folder that is not an export is refused at once
    check_writable(out.parent)  # and one that cannot be written: OutputError naming the folder
    tolerances = Tolerances.for_precision(precision, min_code_agreement=min_code_agreement, min_cosine=min_cosine,
                                          max_r1_change=max_r1_change)
    fuselip, _, _ = load_model(model, "cpu", base=base)
    if not hasattr(fuselip, "image_tokenizer"):
        raise ExportSetupError(f"{model} is a late-fusion baseline; only FuseLIP (early fusion) models export.")
    size = fuselip.config.titok.image_size
    with progress_bar(4, f"export {precision}", unit="step", transient=True) as bar:
        bar.note("preparing the reference set")
        reference = (folder_reference(calibration, size, limit=reference_size) if calibration is not None
                     else demo_reference(reference_size, size))
        bar.advance()
        source = {"name": model, "fingerprint": model_fingerprint(fuselip)}
        result = gated_export(fuselip, out, reference, source=source, precision=precision, tolerances=tolerances,
                              int8=int8, calibration_size=calibration_size, keep_rejected=keep_rejected,
                              batch_size=batch_size, progress=bar)
    figures = result.report["figures"]
    cosine = ", ".join(f"{kind} {v['min']:.6f}" for kind, v in figures["cosine"].items())
    change = figures["retrieval"]["change_points"]
    typer.echo(f"Exported {model} ({precision}) to {result.path}: gate passed. Codes equal "
               f"{figures['code_agreement']:.4%}; cosine min {cosine}; R@1 change image->text "
               f"{change['image_to_text_R@1']:+.2f}, text->image {change['text_to_image_R@1']:+.2f} points.")


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``fuselip-med`` app."""
    app.command("export")(export)
