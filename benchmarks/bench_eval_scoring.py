"""Candidate-list scoring of the benchmark tasks (MMEB-sized by default): time to Precision@1 from embeddings.

Scoring only, not embedding: 36 subsets x 1,000 queries x 1,000 candidates each (MMEB-eval's size), the
embeddings random and L2-normalised. Half the subsets draw every query's candidates from one shared pool of
1,000 targets (classification: class names), half from a pool of 20,000 (retrieval: mostly different
candidates per query), which take the two paths of ``fuselip_med.eval.scoring.top1_positions``. Timed:
``pad_candidates`` (the ragged lists -> [Q, C]) + ``top1_positions``. Goal: <= 30 s on 2 CPU cores.

Findings (the ``findings`` task's metrics, :func:`fuselip_med.eval.findings.findings_metrics`): 14 labels x 100,000
images with 1,000 bootstrap resamples of every AUROC, thresholds chosen on 10,000 validation rows; random scores with
a planted signal, 5% uncertain labels. Goal: <= 60 s on 2 CPU cores.

    python benchmarks/bench_eval_scoring.py                       # full size, 2 threads
    python benchmarks/bench_eval_scoring.py --subsets 2 --queries 50 --candidates 20 --images 2000 --boot 50  # smoke
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fuselip_med.eval.findings import findings_metrics
from fuselip_med.eval.scoring import pad_candidates, top1_positions


def bench(subsets: int, queries: int, candidates: int, dim: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kind, pool in (("shared pool", candidates), ("pool of 20x", 20 * candidates)):
        n_sub = subsets // 2 if kind == "shared pool" else subsets - subsets // 2
        targets = torch.nn.functional.normalize(torch.randn(pool, dim, generator=g), dim=1)
        q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=1)
        lists = [torch.randperm(pool, generator=g)[:candidates].tolist() for _ in range(queries)]
        start = time.perf_counter()
        correct = 0
        for _ in range(n_sub):
            ids, valid = pad_candidates(lists)
            correct += int((top1_positions(q, targets, ids, valid) == 0).sum())
        seconds = time.perf_counter() - start
        rows.append({"kind": kind, "subsets": n_sub, "queries": n_sub * queries, "candidates": candidates,
                     "dim": dim, "seconds": seconds, "p@1": correct / max(1, n_sub * queries)})
    return rows


def bench_findings(labels: int, images: int, boot: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def table(n):
        truth = rng.random((n, labels)) < 0.2
        scores = rng.random((n, labels)) + 0.3 * truth
        cells = np.where(truth, 1.0, 0.0)
        cells[rng.random((n, labels)) < 0.05] = -1.0
        return scores, cells

    scores, cells = table(images)
    v_scores, v_cells = table(max(100, images // 10))
    start, cpu = time.perf_counter(), time.process_time()
    res = findings_metrics([f"f{j}" for j in range(labels)], scores, cells, v_scores, v_cells, n_boot=boot, seed=seed)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "macro_AUROC": res["metrics"]["macro_AUROC"],
            "ci": res["intervals"]["macro_AUROC"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subsets", type=int, default=36)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--labels", type=int, default=14, help="findings: label columns")
    parser.add_argument("--images", type=int, default=100_000, help="findings: test images")
    parser.add_argument("--boot", type=int, default=1000, help="findings: bootstrap resamples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench(args.subsets, args.queries, args.candidates, args.dim)
    total = sum(r["seconds"] for r in rows)
    chance = 1 / args.candidates
    print(f"| kind | subsets | queries | candidates/query | dim | threads | seconds | P@1 (chance {chance:.4f}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['subsets']} | {r['queries']} | {r['candidates']} | {r['dim']} | {args.threads} | "
              f"{r['seconds']:.2f} | {r['p@1']:.4f} |")
    print(f"| total | {args.subsets} | {sum(r['queries'] for r in rows)} | {args.candidates} | {args.dim} | "
          f"{args.threads} | {total:.2f} | goal <= 30 s |")
    f = bench_findings(args.labels, args.images, args.boot)
    print()
    print("| findings | labels | images | bootstrap | threads | seconds | CPU seconds | macro AUROC [95% CI] |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| AUROC + CI, AP, thresholds | {args.labels} | {args.images} | {args.boot} | {args.threads} | "
          f"{f['seconds']:.2f} (goal <= 60 s) | {f['cpu_seconds']:.2f} | {f['macro_AUROC']:.4f} "
          f"[{f['ci'][0]:.4f}, {f['ci'][1]:.4f}] |")


if __name__ == "__main__":
    main()
