"""CPU throughput of the ONNX exports against PyTorch fp32, with the quality gate's figures beside them.

One run: a FuseLIP model built from its config (``--size small`` = FuseLIP-S: TiTok-S-128 + the S encoder) with
RANDOM weights (seed 0; speed does not depend on the weights, the gate's figures do: they describe this random
model, not a trained one), or a checkpoint (``--model``: a directory, .pt file or LoRA adapter), traced once to
ONNX fp32 and quantized to int8 in each ``--int8`` setting (``export.quantize``), then timed:

- images/s: ``encode(images=pixels)`` (TiTok + the encoder over 130 ids) on [--batch, 3, 256, 256] pixels;
- texts/s: ``encode(texts=...)`` on captions of the bundled demo (about 25 ids each);

PyTorch fp32 with ``torch.set_num_threads(--threads)``, ONNX Runtime with ``intra_op_num_threads = --threads``.
Each figure is the best of ``--repeats`` timed passes after one warm-up pass; the passes are interleaved (pass 1
of every runtime, then pass 2 of every runtime, ...) so that a change of load from other jobs during the run
hits every row alike. The gate's figures (code agreement,
cosine min per row kind, R@1 change) come from ``export.gate.measure`` on ``--reference-size`` demo images (+ 2
DICOMs), judged with each precision's default tolerances; static settings calibrate on the first
``--calibration-size`` of them, as ``fuselip-med export`` does. Goal (issue 27): int8 >= 2.5x PyTorch fp32
images/s with R@1 within 1 point.

An ``--int8`` setting is ``MODE:SCOPE[:N]``: mode dynamic|static, scope all|encoder, N = TiTok's last blocks kept
fp32 (``--titok-fp32-blocks``); static uses ``--calibration-method``.

    python benchmarks/bench_export.py --size small --reference-size 48          # about 6 min on 2 idle cores
    python benchmarks/bench_export.py --int8 dynamic:all dynamic:all:4 --model runs/rocov2_demo/final
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_INT8 = ("dynamic:all", "static:all", "dynamic:encoder", "static:encoder")


def seconds(fn) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def int8_settings(text: str, calibration_method: str):
    """``MODE:SCOPE[:N]`` -> ``Int8Settings``."""
    from fuselip_med.export.quantize import Int8Settings

    mode, scope, *blocks = text.split(":")
    return Int8Settings(mode=mode, scope=scope, calibration_method=calibration_method,
                        titok_fp32_blocks=int(blocks[0]) if blocks else 0)


def label_of(setting) -> str:
    """The table's name of an ``Int8Settings``."""
    label = f"ONNX int8 {setting.mode}, {'both graphs' if setting.scope == 'all' else 'encoder only'}"
    if setting.titok_fp32_blocks:
        label += f", TiTok last {setting.titok_fp32_blocks} blocks fp32"
    return label + (f" ({setting.calibration_method})" if setting.mode == "static" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="FuseLIP size preset (small = FuseLIP-S; tiny for a check)")
    parser.add_argument("--model", help="a checkpoint instead of random weights (its size wins over --size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="images (and texts x4) per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up pass")
    parser.add_argument("--reference-size", type=int, default=48, help="demo images for the gate's figures")
    parser.add_argument("--int8", nargs="+", default=list(DEFAULT_INT8), help="int8 settings MODE:SCOPE[:N]")
    parser.add_argument("--calibration-method", default="minmax", help="minmax, entropy or percentile")
    parser.add_argument("--calibration-size", type=int, default=32, help="reference images static int8 calibrates on")
    args = parser.parse_args()

    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.export.gate import Tolerances, demo_reference, judge, measure, outputs
    from fuselip_med.export.onnx import write_export
    from fuselip_med.export.quantize import calibration_inputs
    from fuselip_med.export.runtime import OnnxFuseLIP

    torch.set_num_threads(args.threads)
    settings = [int8_settings(text, args.calibration_method) for text in args.int8]
    if args.model:
        from fuselip_med.core.loading import load_model

        model, _, _ = load_model(args.model, "cpu")
        name = f"{args.model} (FuseLIP-{model.config.transformer_size})"
    else:
        torch.manual_seed(0)
        model = FuseLIP(FuseLIPConfig.from_size(args.size)).eval()
        name = f"FuseLIP-{args.size} (random weights, seed 0)"
    reference = demo_reference(args.reference_size)
    pixels = reference.pixels[: args.batch]
    texts = (reference.texts * 4)[: 4 * args.batch]
    expected = outputs(model, reference)
    calibration = None

    runners = [("PyTorch fp32", model, None, None)]
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "fp32"
        start = time.perf_counter()
        write_export(model, traced)
        print(f"traced in {time.perf_counter() - start:.0f} s", flush=True)
        runs = [("ONNX fp32", "fp32", None)] + [(label_of(s), "int8", s) for s in settings]
        for index, (label, precision, setting) in enumerate(runs):
            if setting is not None and setting.mode == "static" and calibration is None:
                calibration = calibration_inputs(model, reference.pixels[: args.calibration_size],
                                                 reference.texts[: args.calibration_size])
            folder = Path(tmp) / str(index)
            start = time.perf_counter()
            write_export(model, folder, precision=precision, int8=setting, calibration=calibration, traced=traced)
            runner = OnnxFuseLIP(folder, threads=args.threads)
            figures = measure(model, runner, reference, expected=expected)
            print(f"{label}: written and measured in {time.perf_counter() - start:.0f} s", flush=True)
            runners.append((label, runner, figures, Tolerances.for_precision(precision)))
        image_s = {label: float("inf") for label, *_ in runners}
        text_s = dict(image_s)
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # pass 0 warms up
                for label, runner, _, _ in runners:
                    images = seconds(lambda: runner.encode(images=pixels))
                    captions = seconds(lambda: runner.encode(texts=texts))
                    if repeat:
                        image_s[label], text_s[label] = min(image_s[label], images), min(text_s[label], captions)
                print(f"timing pass {repeat} done", flush=True)
    rows = [(label, len(pixels) / image_s[label], len(texts) / text_s[label], figures, tolerances)
            for label, _, figures, tolerances in runners]

    base_images, base_texts = rows[0][1], rows[0][2]
    print(f"\n{name}, {args.threads} threads, batch {len(pixels)} images / {len(texts)} texts, gate on "
          f"{len(reference)} demo images")
    print("| runtime | images/s | texts/s | images/s vs PyTorch | texts/s vs PyTorch | codes equal | cosine min image "
          "/ text / image+text | R@1 change i->t / t->i (points) | gate (defaults) |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for label, images, texts_per_s, figures, tolerances in rows:
        gate = cos = codes = change = "-"
        if figures is not None:
            cos = " / ".join(f"{figures['cosine'][k]['min']:.4f}" for k in ("image", "text", "image+text"))
            codes = f"{figures['code_agreement']:.2%}"
            delta = figures["retrieval"]["change_points"]
            change = f"{delta['image_to_text_R@1']:+.1f} / {delta['text_to_image_R@1']:+.1f}"
            failures = judge(figures, tolerances)
            gate = "pass" if not failures else "FAIL: " + "; ".join(failures)
        print(f"| {label} | {images:.2f} | {texts_per_s:.1f} | {images / base_images:.2f}x | "
              f"{texts_per_s / base_texts:.2f}x | {codes} | {cos} | {change} | {gate} |")


if __name__ == "__main__":
    main()
