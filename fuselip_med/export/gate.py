"""The export quality gate: an ONNX export is compared with the PyTorch fp32 model it came from on a reference set,
and only an export within its tolerances is written as final.

Figures (all on the reference set's images and captions):

- **code agreement**: share of TiTok code ids (N images x 128) equal to PyTorch fp32's. Codes are discrete, so a
  small numeric drift can flip one to a neighbouring codebook entry (reference-facts.md 1.7);
- **cosine** min and mean between the export's and PyTorch's embeddings of the same input, for image rows, text
  rows and image+text rows (the export runs end to end: its own codes feed its own encoder);
- **retrieval**: R@1 and R@10 image->text and text->image over the reference pairs (``eval.retrieval``; duplicate
  captions count as correct), for both models, and the change in points (export - PyTorch).

Defaults (``Tolerances.for_precision``): fp32 codes >= 99.9% equal and cosine >= 0.9999; int8 cosine >= 0.99 and
|R@1 change| <= 1 point in both directions. An export that misses one is not published (``--keep-rejected``
publishes it as ``<out>.rejected`` with its report) and ``ExportRejected`` names each failing figure.

The reference set is the bundled synthetic demo (``data.demo``: rendered radiology-like images with captions and
two of pydicom's real DICOM files) or a folder/CSV of captioned images (``--calibration DIR``, read as ``embed``
reads it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuselip_med.errors import UserError
from fuselip_med.export.onnx import REPORT_NAME
from fuselip_med.export.quantize import Int8Settings
from fuselip_med.io import atomic_write_json, publish_directory, temp_directory

__all__ = ["CARD_NAME", "REPORT_NAME", "ExportRejected", "ExportResult", "Outputs", "ReferenceSet", "Tolerances",
           "check_out", "demo_reference", "folder_reference", "gated_export", "judge", "measure", "outputs"]

CARD_NAME = "README.md"
REJECTED_SUFFIX = ".rejected"
ROW_KINDS = ("image", "text", "image+text")
DIRECTIONS = ("image_to_text", "text_to_image")


class ExportRejected(UserError):
    """The export missed its quality gate; the message names every failing figure."""


class ExportSetupError(UserError, ValueError):
    """An export cannot start: a bad tolerance, reference set, output folder or model (message names it)."""


# ------------------------------------------------------------------------------------------------ tolerances
@dataclass(frozen=True)
class Tolerances:
    """What an export must meet; ``None`` leaves a figure unchecked (it is still measured and reported).

    ``min_code_agreement``: share of TiTok codes equal to PyTorch fp32's (0-1). ``min_cosine``: the lowest
    cosine of any image, text or image+text row. ``max_r1_change``: largest |R@1 change| in points (0-100) of
    either retrieval direction.
    """

    min_code_agreement: float | None
    min_cosine: float | None
    max_r1_change: float | None

    def __post_init__(self) -> None:
        for name, low, high in (("min_code_agreement", 0, 1), ("min_cosine", -1, 1), ("max_r1_change", 0, 100)):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ExportSetupError(f"--{name.replace('_', '-')} {value}: give a value in [{low}, {high}].")

    @classmethod
    def for_precision(cls, precision: str, **overrides: float | None) -> "Tolerances":
        """The defaults of ``precision`` (fp32: codes 0.999, cosine 0.9999; int8: cosine 0.99, R@1 1 point) with
        the given (non-None) overrides."""
        defaults = {"fp32": cls(0.999, 0.9999, None), "int8": cls(None, 0.99, 1.0)}[precision]
        return cls(**{**asdict(defaults), **{k: v for k, v in overrides.items() if v is not None}})


# ------------------------------------------------------------------------------------------------ reference set
@dataclass
class ReferenceSet:
    """Captioned images to compare on: ``pixels`` [N, 3, S, S] float32 in [0, 1], one caption per image."""

    ids: list[str]
    pixels: torch.Tensor
    texts: list[str]
    source: str
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _decoded(ids: list[str], images: list[Any], texts: list[str], source: str, image_size: int) -> ReferenceSet:
    from fuselip_med.data.images import DecodeOptions
    from fuselip_med.inference.engine import decoded_images

    kept_ids, pixels, kept_texts, skipped = [], [], [], {}
    for i, px, skip in decoded_images(images, decode_options=DecodeOptions(image_size=image_size)):
        if skip is not None:
            skipped[ids[i]] = skip.reason
            continue
        pixels.append(px)
        kept_ids.append(ids[i])
        kept_texts.append(texts[i])
    if len(kept_ids) < 2:
        raise ExportSetupError(f"the reference set {source} has {len(kept_ids)} usable captioned images; "
                               "the gate needs at least 2 (retrieval compares them).")
    return ReferenceSet(kept_ids, torch.stack(pixels), kept_texts, source, skipped)


def demo_reference(n: int = 200, image_size: int = 256, seed: int = 0) -> ReferenceSet:
    """``n`` synthetic images with captions of the bundled demo (its test split, seed ``seed``) plus the two real
    DICOM files of pydicom's test data that the demo's test split holds; rendered into a temp folder and decoded."""
    from fuselip_med.data.adapters import get_adapter
    from fuselip_med.data.demo import write_demo_dataset

    if n < 2:
        raise ExportSetupError(f"--reference-size {n}: use at least 2 images.")
    with tempfile.TemporaryDirectory(prefix="fuselip_med_reference_") as tmp:
        root = write_demo_dataset(Path(tmp) / "demo", seed=seed, n_train=0, n_valid=0, n_test=n)
        source = get_adapter("rocov2")(str(root), split="test")
        samples = [source[i] for i in range(len(source))]
        return _decoded([s.id for s in samples], [s.query.image for s in samples],
                        [s.target.text for s in samples], f"the bundled demo (seed {seed}, {n} images)", image_size)


def folder_reference(path: str | os.PathLike, image_size: int = 256, limit: int | None = None) -> ReferenceSet:
    """The captioned images of a folder (``<image>.txt`` captions) or CSV/TSV, read as ``embed --kind pair``
    reads them; the first ``limit`` rows when given. Images that do not decode are left out and named in
    ``skipped`` by the rule of ``embed`` / ``index build`` (``embed.pseudonymize_rows``; PS3.15 Annex E: PACS
    exports name folders after patients): a DICOM file by its salted instance key (``im-`` + 20 hex), every
    other file by a salted ``file-`` key, with or without DICOM in the set (the report is not the user's index:
    unlike ``embed`` rows it keeps no relative path).
    The salt is fresh and not stored: the keys count and tell files apart, they name no patient. A second file
    of one SOP Instance is skipped as ``duplicate instance``. Raises the adapter's errors for a missing or empty
    input, ``ExportSetupError`` with < 2 images."""
    from fuselip_med.data.phi import Pseudonyms
    from fuselip_med.data.skips import SkipReport
    from fuselip_med.embed import open_input, pseudonymize_rows, rows_from_source

    pseudonyms, duplicates = Pseudonyms.fresh(), SkipReport()
    rows = pseudonymize_rows(rows_from_source(open_input(path, "pair"), "pair")[:limit], pseudonyms,
                             skips=duplicates)
    reference = _decoded([r.id for r in rows], [r.image for r in rows], [r.text or "" for r in rows], str(path),
                         image_size)
    dicom_ids = {r.id for r in rows if r.dicom}
    reference.skipped = {(id if id in dicom_ids else pseudonyms.key(id, "file-")): reason
                         for id, reason in reference.skipped.items()}
    reference.skipped.update((entry.id, entry.reason) for entry in duplicates.entries)
    return reference


# ------------------------------------------------------------------------------------------------ figures
def _batched(fn, n: int, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(slice(a, a + batch_size)) for a in range(0, n, batch_size)])


def _embeddings(model, codes: torch.Tensor, reference: ReferenceSet, batch_size: int) -> dict[str, torch.Tensor]:
    """Unit embeddings [N, D] per row kind; image rows use the model's own ``codes`` [N, 128] (what ``encode``
    computes from the pixels, so each model runs end to end while TiTok runs once per image)."""
    texts, n = reference.texts, len(reference)
    with torch.no_grad():
        return {
            "image": _batched(lambda s: model.encode(image_ids=codes[s]).float().cpu(), n, batch_size),
            "text": _batched(lambda s: model.encode(texts=texts[s]).float().cpu(), n, batch_size),
            "image+text": _batched(lambda s: model.encode(image_ids=codes[s], texts=texts[s]).float().cpu(), n,
                                   batch_size),
        }


def _recalls(vectors: dict[str, torch.Tensor], reference: ReferenceSet) -> dict[str, float]:
    from fuselip_med.eval.retrieval import retrieval_metrics

    metrics, _ = retrieval_metrics(vectors["image"], vectors["text"], reference.ids, reference.texts, ks=(1, 10))
    return {f"{d}_R@{k}": 100.0 * metrics[f"{d}_R@{k}"] for d in DIRECTIONS for k in (1, 10)}


@dataclass
class Outputs:
    """One model's outputs on a reference set: codes [N, 128] int64, unit embeddings [N, D] per row kind,
    R@1/R@10 in points per direction."""

    codes: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    recalls: dict[str, float]


def outputs(model, reference: ReferenceSet, batch_size: int = 16) -> Outputs:
    """``model``'s (PyTorch ``FuseLIP`` or ``OnnxFuseLIP``) codes, embeddings and recalls on ``reference``."""
    with torch.no_grad():
        codes = _batched(lambda s: model.image_codes(reference.pixels[s]).cpu(), len(reference), batch_size)
    embeddings = _embeddings(model, codes, reference, batch_size)
    return Outputs(codes, embeddings, _recalls(embeddings, reference))


def measure(reference_model, candidate, reference: ReferenceSet, batch_size: int = 16,
            expected: Outputs | None = None) -> dict[str, Any]:
    """The gate's figures of ``candidate`` (an ``OnnxFuseLIP``) against ``reference_model`` (PyTorch fp32 FuseLIP)
    on ``reference``: code agreement, cosine min/mean per row kind, R@1/R@10 of both and the change in points
    (recalls in points, 0-100). ``expected``: ``outputs(reference_model, reference)`` when already computed."""
    expected = expected or outputs(reference_model, reference, batch_size)
    got = outputs(candidate, reference, batch_size)
    cosine = {}
    for kind in ROW_KINDS:
        values = torch.nn.functional.cosine_similarity(got.embeddings[kind], expected.embeddings[kind], dim=-1)
        cosine[kind] = {"min": float(values.min()), "mean": float(values.mean())}
    before, after = expected.recalls, got.recalls
    return {
        "n_images": len(reference), "codes_compared": int(expected.codes.numel()),
        "code_agreement": float((expected.codes == got.codes).double().mean()),
        "cosine": cosine,
        "retrieval": {"pytorch_fp32": before, "export": after,
                      "change_points": {k: after[k] - before[k] for k in before}},
    }


def judge(figures: dict[str, Any], tolerances: Tolerances) -> list[str]:
    """The failing figures, each as ``"<figure> <value> < <bound>"`` (empty: the export passes)."""
    failures = []
    if tolerances.min_code_agreement is not None and figures["code_agreement"] < tolerances.min_code_agreement:
        failures.append(f"code agreement {figures['code_agreement']:.4%} < {tolerances.min_code_agreement:.4%}")
    if tolerances.min_cosine is not None:
        for kind in ROW_KINDS:
            low = figures["cosine"][kind]["min"]
            if low < tolerances.min_cosine:
                failures.append(f"{kind} cosine min {low:.6f} < {tolerances.min_cosine}")
    if tolerances.max_r1_change is not None:
        for direction in DIRECTIONS:
            change = figures["retrieval"]["change_points"][f"{direction}_R@1"]
            if abs(change) > tolerances.max_r1_change:
                failures.append(f"{direction} R@1 change {change:+.2f} points exceeds ±{tolerances.max_r1_change}")
    return failures


# ------------------------------------------------------------------------------------------------ the card
def _figures_table(figures: dict[str, Any]) -> str:
    cos = figures["cosine"]
    retrieval = figures["retrieval"]
    lines = ["| figure | value |", "|---|---|",
             f"| TiTok code agreement ({figures['codes_compared']} codes) | {figures['code_agreement']:.4%} |"]
    lines += [f"| {kind} cosine min / mean | {cos[kind]['min']:.6f} / {cos[kind]['mean']:.6f} |" for kind in ROW_KINDS]
    for key, change in retrieval["change_points"].items():
        lines.append(f"| {key} PyTorch fp32 -> export (points) | {retrieval['pytorch_fp32'][key]:.2f} -> "
                     f"{retrieval['export'][key]:.2f} ({change:+.2f}) |")
    return "\n".join(lines)


def _write_card(directory: Path, report: dict[str, Any]) -> None:
    from fuselip_med.core.hub import model_card

    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    tolerances = ", ".join(f"{k} {v}" for k, v in report["tolerances"].items() if v is not None)
    summary = (f"ONNX export ({report['precision']}) of `{report['source']['name']}`, written by "
               "`fuselip-med export`: `titok.onnx` (pixels [B, 3, 256, 256] float32 in [0, 1] -> [B, 128] int64 "
               "codes) and `encoder.onnx` (joint ids [B, L] int64 -> L2-normalised embeddings), run with ONNX "
               "Runtime. Use it with `--runtime onnx --model <this folder>` (embed, index build, search, serve).")
    gate = (f"## Quality gate: {verdict}\n\nCompared with the PyTorch fp32 model on {report['reference']['source']} "
            f"({report['reference']['n_images']} images). Tolerances: {tolerances}.\n\n"
            + _figures_table(report["figures"]))
    model_card(title=f"FuseLIP ONNX export ({report['precision']})", summary=summary, sections=[gate],
               tags=["onnx", report["precision"]]).save(directory / CARD_NAME)


# ------------------------------------------------------------------------------------------------ the pipeline
@dataclass
class ExportResult:
    """Where the export was published and its report (``export_report.json`` content)."""

    path: Path
    report: dict[str, Any]


def check_out(out: str | os.PathLike) -> None:
    """Raise ``ExportSetupError`` when ``out`` exists and is neither an export (replaced) nor an empty folder;
    the CLI calls it before loading the model, ``gated_export`` again before writing."""
    from fuselip_med.export.runtime import is_export_dir

    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_export_dir(out) or not any(out.iterdir()))):
        raise ExportSetupError(f"--out {out} exists and is not an ONNX export: choose a new or empty folder.")


def _stepper(progress):
    """``step(note)``: mark the previous step done and name the next one on ``progress`` (a no-op without it)."""
    started = [False]

    def step(note: str) -> None:
        if progress is None:
            return
        if started[0]:
            progress.advance()
        started[0] = True
        progress.note(note)

    return step


def gated_export(model, out: str | os.PathLike, reference: ReferenceSet, *, source: dict[str, str],
                 precision: str = "fp32", tolerances: Tolerances | None = None, int8: Int8Settings | None = None,
                 calibration: ReferenceSet | None = None, calibration_size: int = 32, keep_rejected: bool = False,
                 batch_size: int = 16, progress=None) -> ExportResult:
    """Export ``model`` (PyTorch FuseLIP, LoRA already merged) to ``out`` if it passes the gate on ``reference``.

    The export is written to a temp folder beside ``out``, measured (``measure``), judged (``judge``), given its
    ``export_report.json`` and model card, and only then published as ``out`` (atomically, replacing an earlier
    export). A failing export is removed, or published as ``<out>.rejected`` with ``keep_rejected``, and
    ``ExportRejected`` names the failing figures. ``int8``: the quantization settings (int8 precision; default
    dynamic, both graphs). Static quantization calibrates on the first ``calibration_size`` images of
    ``calibration`` (default: ``reference`` itself). Raises ``ExportSetupError`` when ``out`` holds something
    that is not an export. ``progress``: a ``progress.Bar`` advanced by one at each of the 3 steps (write, measure,
    publish).
    """
    from fuselip_med.export.onnx import write_export
    from fuselip_med.export.quantize import calibration_inputs
    from fuselip_med.export.runtime import OnnxFuseLIP

    out = Path(out)
    tolerances = tolerances or Tolerances.for_precision(precision)
    check_out(out)
    int8 = int8 or Int8Settings()
    if int8.titok_fp32_blocks > model.config.titok.layers:
        raise ExportSetupError(f"--titok-fp32-blocks {int8.titok_fp32_blocks}: this TiTok has "
                               f"{model.config.titok.layers} blocks.")
    static = precision == "int8" and int8.mode == "static"
    calibration = (calibration or reference) if static else None
    staging = temp_directory(out)
    try:
        step = _stepper(progress)
        step(f"writing the {precision} graphs")
        feeds = (calibration_inputs(model, calibration.pixels[:calibration_size], calibration.texts[:calibration_size])
                 if calibration is not None else None)
        write_export(model, staging, precision=precision, int8=int8, calibration=feeds, source=source)
        step(f"measuring the gate on {len(reference)} images")
        candidate = OnnxFuseLIP(staging)
        figures = measure(model, candidate, reference, batch_size=batch_size)
        step("writing the report")
        failures = judge(figures, tolerances)
        report = {"passed": not failures, "failures": failures, "precision": precision,
                  "tolerances": asdict(tolerances), "figures": figures, "source": source,
                  "fingerprint": candidate.fingerprint, "graphs": candidate.graph_digests,
                  "reference": {"source": reference.source, "n_images": len(reference),
                                "skipped": reference.skipped},
                  "calibration": ({"source": calibration.source,
                                   "n_images": min(calibration_size, len(calibration))}
                                  if calibration is not None else None)}
        atomic_write_json(staging / REPORT_NAME, report)
        _write_card(staging, report)
        if not failures:
            return ExportResult(publish_directory(staging, out), report)
        kept = ""
        if keep_rejected:
            rejected = out.with_name(out.name + REJECTED_SUFFIX)
            publish_directory(staging, rejected)
            kept = f"; the export and its report are in {rejected}"
        raise ExportRejected(f"the {precision} export missed its quality gate: {'; '.join(failures)}. Nothing was "
                             f"written to {out}{kept}.")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
