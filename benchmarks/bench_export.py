"""CPU throughput of the ONNX exports against PyTorch fp32, with the quality gate's figures beside them.

One run: a FuseLIP model built from its config (``--size small`` = FuseLIP-S: TiTok-S-128 + the S encoder) with
RANDOM weights (seed 0; speed does not depend on the weights, the gate's figures do: they describe this random
model, not a trained one), exported with ``export.onnx.write_export`` as fp32 and int8, then timed:

- images/s: ``encode(images=pixels)`` (TiTok + the encoder over 130 ids) on [--batch, 3, 256, 256] pixels;
- texts/s: ``encode(texts=...)`` on captions of the bundled demo (about 25 ids each);

PyTorch fp32 with ``torch.set_num_threads(--threads)``, ONNX Runtime with ``intra_op_num_threads = --threads``.
Each figure is the best of ``--repeats`` timed passes after one warm-up pass. The gate's figures (code agreement,
cosine min per row kind, R@1 change) come from ``export.gate.measure`` on ``--reference-size`` demo images, judged
with each precision's default tolerances. Goal (issue 27): int8 >= 2.5x PyTorch fp32 images/s with R@1 within 1
point.

    python benchmarks/bench_export.py [--size small] [--threads 2] [--batch 8] [--reference-size 32]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="FuseLIP size preset (small = FuseLIP-S; tiny for a check)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="images (and texts x4) per timed call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-size", type=int, default=32, help="demo images for the gate's figures")
    parser.add_argument("--int8-scope", default="all", help="all or encoder (see fuselip-med export --help)")
    args = parser.parse_args()

    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.export.gate import Tolerances, demo_reference, judge, measure, outputs
    from fuselip_med.export.onnx import write_export
    from fuselip_med.export.runtime import OnnxFuseLIP

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size(args.size)).eval()
    reference = demo_reference(args.reference_size)
    pixels = reference.pixels[: args.batch]
    texts = (reference.texts * 4)[: 4 * args.batch]
    expected = outputs(model, reference)

    rows = []

    def timed(name: str, runner, figures=None, tolerances=None) -> None:
        with torch.no_grad():
            image_s = best_seconds(lambda: runner.encode(images=pixels), args.repeats)
            text_s = best_seconds(lambda: runner.encode(texts=texts), args.repeats)
        rows.append((name, len(pixels) / image_s, len(texts) / text_s, figures, tolerances))

    timed("PyTorch fp32", model)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            folder = Path(tmp) / precision
            start = time.perf_counter()
            write_export(model, folder, precision=precision, int8_scope=args.int8_scope)
            print(f"exported {precision} in {time.perf_counter() - start:.0f} s", flush=True)
            runner = OnnxFuseLIP(folder, threads=args.threads)
            figures = measure(model, runner, reference, expected=expected)
            timed(f"ONNX {precision}" + (f" ({args.int8_scope})" if precision == "int8" else ""), runner, figures,
                  Tolerances.for_precision(precision))

    base_images = rows[0][1]
    print(f"\nFuseLIP-{args.size} (random weights), {args.threads} threads, batch {len(pixels)} images / "
          f"{len(texts)} texts, gate on {len(reference)} demo images")
    print("| runtime | images/s | texts/s | images/s vs PyTorch | codes equal | cosine min image / text / image+text "
          "| R@1 change i->t / t->i (points) | gate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, images, texts_per_s, figures, tolerances in rows:
        gate = cos = codes = change = "-"
        if figures is not None:
            cos = " / ".join(f"{figures['cosine'][k]['min']:.4f}" for k in ("image", "text", "image+text"))
            codes = f"{figures['code_agreement']:.2%}"
            delta = figures["retrieval"]["change_points"]
            change = f"{delta['image_to_text_R@1']:+.1f} / {delta['text_to_image_R@1']:+.1f}"
            failures = judge(figures, tolerances)
            gate = "pass" if not failures else "FAIL: " + "; ".join(failures)
        print(f"| {name} | {images:.2f} | {texts_per_s:.1f} | {images / base_images:.2f}x | {codes} | {cos} | "
              f"{change} | {gate} |")


if __name__ == "__main__":
    main()
