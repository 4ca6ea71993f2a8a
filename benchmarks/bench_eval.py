"""Chunked retrieval ranking on a large random pool: time and peak memory, both directions, one table.

    python benchmarks/bench_eval.py                 # 100k x 512 on CPU (and CUDA when present)
    python benchmarks/bench_eval.py --n 20000 --device cpu
"""
from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import torch

from fuselip_med.eval.retrieval import rank_metrics
from fuselip_med.eval.similarity import default_chunk_size, rank_targets


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(n: int, dim: int, device: str, chunk: int | None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 4.0 / dim**0.5 * torch.randn(n, dim, generator=g), dim=1)
    img, txt = img.to(device), txt.to(device)
    targets = torch.arange(n)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    i2t = rank_targets(img, txt, targets, chunk_size=chunk).ranks
    t2i = rank_targets(txt, img, targets, chunk_size=chunk).ranks
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    m = {**rank_metrics(i2t, "i2t"), **rank_metrics(t2i, "t2i")}
    return {
        "device": device, "n": n, "dim": dim, "chunk": chunk or default_chunk_size(n),
        "seconds": seconds, "queries_per_s": 2 * n / seconds,
        "embeddings_mib": 2 * n * dim * 4 / 2**20,
        "peak_rss_mib": _rss_mib(), "rss_growth_mib": _rss_mib() - rss_before,
        "py_peak_mib": py_peak / 2**20,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan"),
        "i2t_R@1": m["i2t_R@1"], "t2i_R@1": m["t2i_R@1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=None, help="queries per block (default: ~256 MiB of scores)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    rows = [bench(args.n, args.dim, d, args.chunk) for d in devices if d == "cpu" or torch.cuda.is_available()]
    cols = ["device", "n", "dim", "chunk", "seconds", "queries_per_s", "embeddings_mib", "peak_rss_mib",
            "rss_growth_mib", "py_peak_mib", "cuda_peak_mib", "i2t_R@1", "t2i_R@1"]
    print(f"# rank_targets, both directions (image->text and text->image), torch threads={torch.get_num_threads()}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
