"""Throughput and peak memory of ``FuseLIP.encode`` for image, text and image+text inputs.

Random weights (nothing is downloaded); sizes small (S) and base (B), batch 128 by default; CPU fp32 and,
where CUDA is present, fp32 and bf16 autocast. Each configuration runs in a fresh process so that peak
memory is its own. Prints one table.

    python benchmarks/bench_encode.py                 # CPU (and CUDA if present); ~9 min on 2 CPU cores
    python benchmarks/bench_encode.py --batch 32 --iters 2 --sizes small
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

CAPTION = "Axial contrast-enhanced CT of the chest showing a 32 mm spiculated mass in the right upper lobe."


def measure(size: str, kind: str, device: str, precision: str, batch: int, iters: int, queue) -> None:
    """Run one configuration and put (samples/s, peak MiB) on the queue."""
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size(size)).to(device).eval()
    pixels = torch.rand(batch, 3, 256, 256, device=device)
    text_ids = model.tokenizer([CAPTION] * batch).to(device)
    inputs = {"image": {"images": pixels}, "text": {"texts": text_ids},
              "image+text": {"images": pixels, "texts": text_ids}}[kind]
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")

    def once() -> None:
        with torch.inference_mode(), autocast:
            model.encode(**inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    once()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        once()
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put((batch * iters / seconds, peak))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=None, help="timed batches (default: 2 on CPU, 20 on CUDA)")
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda is skipped when absent)")
    args = parser.parse_args()

    devices = args.devices.split(",")
    setups = [("cpu", "fp32")] if "cpu" in devices else []
    if torch.cuda.is_available() and "cuda" in devices:
        setups += [("cuda", "fp32"), ("cuda", "bf16")]
    context = mp.get_context("spawn")
    rows = []
    for device, precision in setups:
        iters = args.iters or (20 if device == "cuda" else 2)
        for size in args.sizes.split(","):
            for kind in ("image", "text", "image+text"):
                queue = context.Queue()
                process = context.Process(target=measure,
                                          args=(size, kind, device, precision, args.batch, iters, queue))
                process.start()
                rate, peak = queue.get()
                process.join()
                rows.append((device, precision, size, kind, args.batch, rate, peak))
    header = f"{'device':<6} {'precision':<9} {'model':<6} {'input':<10} {'batch':>5} {'samples/s':>10} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for device, precision, size, kind, batch, rate, peak in rows:
        print(f"{device:<6} {precision:<9} {size:<6} {kind:<10} {batch:>5} {rate:>10.1f} {peak:>9.0f}")
    print("peak MiB: process RSS on CPU, torch.cuda.max_memory_allocated on CUDA")


if __name__ == "__main__":
    main()
