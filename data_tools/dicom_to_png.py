#!/usr/bin/env python
"""A tree of DICOM files -> the same tree of 8-bit PNGs, windowed as asked.

    python data_tools/dicom_to_png.py CT_STUDY/ CT_PNG/ --window lung
    python data_tools/dicom_to_png.py XRAYS/ XRAYS_PNG/                  # the file's own VOI LUT / window
    python data_tools/dicom_to_png.py CT/ CT_PNG/ --window 400,40 --workers 2

Decoding is the package's (``fuselip_med.data.images.load_image``): modality LUT (HU), the window, MONOCHROME1
inverted, middle frame of multi-frame files unless --frame says otherwise, native size. ``a/b/x.dcm`` becomes
``OUT/a/b/x.png`` (a file without a DICOM extension gets ``.png`` appended). Files named *.dcm/*.dicom/*.dic/
*.ima are converted, other files when their content is DICOM (the Part 10 magic, or a preamble-less data set as
some scanners and PACS export as ``IM000001``). Files that cannot be decoded are skipped and counted by reason;
PNGs already there are kept (rerun to resume, --overwrite to redo).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if not __package__:  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools._common import (  # noqa: E402
    atomic_write_bytes,
    format_counter,
    print_table,
    progress_bar,
)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
CONVERTED, EXISTING = "converted", "already there"


def parse_window(text: str) -> str | tuple[float, float] | None:
    """``auto`` -> None (the file's own window), a preset name, or ``W,L`` -> (width, level)."""
    from fuselip_med.vocab import WINDOW_PRESETS

    value = text.strip().lower()
    if value == "auto":
        return None
    if "," in value:
        try:
            width, level = (float(v) for v in value.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"window {text!r}: write WIDTH,LEVEL, e.g. 400,40") from None
        if width <= 0:
            raise argparse.ArgumentTypeError(f"window {text!r}: the width must be positive")
        return width, level
    key = value.replace("-", "_").replace(" ", "_")
    if key not in WINDOW_PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown window {text!r}: use auto, WIDTH,LEVEL or one of {', '.join(sorted(WINDOW_PRESETS))}"
        )
    return key


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dicom_to_png",
        description="Convert a tree of DICOM files to 8-bit PNGs (same tree), windowed as asked.",
    )
    parser.add_argument("input", type=Path, help="folder holding the DICOM files (searched recursively)")
    parser.add_argument("output", type=Path, help="folder for the PNGs (created)")
    parser.add_argument(
        "--window",
        type=parse_window,
        default=None,
        help="auto (default: the file's VOI LUT/window, else min-max), a preset "
        "(lung, mediastinum, soft_tissue, abdomen, liver, brain, bone) or WIDTH,LEVEL such as 400,40",
    )
    parser.add_argument("--frame", type=int, help="frame of multi-frame files (default: the middle one)")
    parser.add_argument("--workers", type=int, default=1, help="files converted in parallel (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="convert again files whose PNG exists")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any file could not be converted")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.frame is not None and args.frame < 0:
        parser.error("--frame must be 0 or more")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def find_dicom_files(root: Path) -> list[Path]:
    """DICOM candidates under ``root``, sorted: DICOM extensions, or any file whose content is DICOM."""
    from fuselip_med.data.images import image_kind

    found = []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(folder, name)
            if path.suffix.lower() in DICOM_SUFFIXES or (path.is_file() and image_kind(path) == "dicom"):
                found.append(path)
    return sorted(found)


def png_path(source: Path, root: Path, out: Path) -> Path:
    relative = source.relative_to(root)
    if relative.suffix.lower() in DICOM_SUFFIXES:
        return out / relative.with_suffix(".png")
    return out / relative.parent / f"{relative.name}.png"


def convert_one(source: Path, target: Path, window, frame: int | None, overwrite: bool) -> str:
    """Convert one file; returns CONVERTED, EXISTING or the reason it was skipped."""
    from fuselip_med.data.images import DecodeOptions, ImageDecodeError, load_image

    if target.is_file() and not overwrite:
        return EXISTING
    try:
        image = load_image(source, DecodeOptions(window=window, frame=frame))
    except ImageDecodeError as error:
        return error.reason
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue())
    return CONVERTED


def _convert_star(job: tuple) -> str:
    return convert_one(*job)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.input.is_dir():
        print(f"error: {args.input} is not a folder", file=sys.stderr)
        return 1
    files = find_dicom_files(args.input)
    jobs = [(f, png_path(f, args.input, args.output), args.window, args.frame, args.overwrite) for f in files]
    outcomes: Counter = Counter()
    failed: list[tuple[Path, str]] = []
    with ProcessPoolExecutor(args.workers) if args.workers > 1 else contextlib.nullcontext() as pool, \
            progress_bar(len(jobs), "dicom->png", unit="file", enabled=not args.no_progress) as bar:
        results = pool.map(_convert_star, jobs, chunksize=16) if pool else map(_convert_star, jobs)
        for job, outcome in zip(jobs, results):
            outcomes[outcome] += 1
            bar.advance(1)
            if outcome not in (CONVERTED, EXISTING):
                failed.append((job[0], outcome))
    skipped = Counter({reason: n for reason, n in outcomes.items() if reason not in (CONVERTED, EXISTING)})
    for path, reason in failed[:10]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(failed) > 10:
        print(f"... and {len(failed) - 10} more", file=sys.stderr)
    print_table(
        f"{args.input} -> {args.output}",
        ["DICOM files", "converted", "already there", "skipped"],
        [[len(jobs), outcomes[CONVERTED], outcomes[EXISTING], format_counter(skipped)]],
    )
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
