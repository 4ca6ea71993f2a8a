"""Seconds per occlusion map (``fuselip_med.explain``): tiny and S (FuseLIP-S with TiTok-S, built from their configs
with random weights: the cost does not depend on the weights), grid 8 and 16, on the CPU (and CUDA when present).

A map is one TiTok pass per cell plus one encoder pass per distinct code row (and the unoccluded image); the
"another text" column is a second map of the same image for another text, which reuses the sweep (no TiTok, no
encoder: one text embedding). "CPU s" is the process's CPU time for the first map (all threads): on a machine
shared with other jobs it shows what the map costs, and CPU s / threads is the wall time on idle cores when the
threads scale. MONAI's import is done before timing. Prints one table.

    python benchmarks/bench_explain.py                        # tiny and small, grids 8 and 16, CPU
    python benchmarks/bench_explain.py --sizes small --grids 8 --batch 32
"""
from __future__ import annotations

import argparse
import time

import torch

TEXT = "Pelvic ultrasound showing a large 26 mm anechoic cyst in the left lower pelvis."


def one_map(size: str, grid: int, fill: str, batch: int, device: str) -> tuple[float, float, float]:
    """(seconds for a first map, its CPU seconds, seconds for a second map of the same image with another text)."""
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.data.demo import planted_findings
    from fuselip_med.data.images import decode_image
    from fuselip_med.explain.occlusion import OcclusionExplainer

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size(size)).to(device).eval()
    pixels = decode_image(planted_findings(1)[0].jpeg)
    explainer = OcclusionExplainer(grid=grid, fill=fill, batch_size=batch)
    start, cpu = time.perf_counter(), time.process_time()
    explainer(model, pixels, TEXT)
    first, cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    explainer(model, pixels, "Axial non-contrast CT of the head")
    return first, cpu, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--grids", default="8,16")
    parser.add_argument("--fill", default="blur", choices=("blur", "mean"))
    parser.add_argument("--batch", type=int, default=16, help="occluded copies per model pass")
    parser.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda is skipped when absent)")
    args = parser.parse_args()

    import monai.visualize  # noqa: F401  - import cost is not map cost

    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    print(f"torch threads {torch.get_num_threads()}, fill {args.fill}, batch {args.batch}")
    print(f"{'device':<6} {'model':<6} {'grid':>4} {'cells':>5} {'s/map':>8} {'CPU s':>8} {'another text s':>15}")
    for device in devices:
        for size in args.sizes.split(","):
            for grid in (int(g) for g in args.grids.split(",")):
                first, cpu, again = one_map(size, grid, args.fill, args.batch, device)
                print(f"{device:<6} {size:<6} {grid:>4} {grid * grid:>5} {first:>8.2f} {cpu:>8.1f} {again:>15.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
