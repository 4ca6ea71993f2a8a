"""Vector search speed and accuracy: build throughput, single-query latency (p50/p95) and recall@10 of the
approximate indexes against exact search, on synthetic unit vectors (10k and 100k x 512; 1M with --large).

The index kinds are those ``fuselip-med index build`` writes (``fuselip_med.search.index.make_faiss_index``,
float16 storage, inner product): ``flat`` (exact), ``ivf`` and ``hnsw`` with the default settings of
``IndexSettings`` unless overridden. Recall@10 = |approximate top-10 ∩ exact top-10| / 10, averaged over the
queries; the exact top-10 is a float32 matrix product over the same float16 vectors.

Data: embedding-like unit vectors, not uniform noise. Image/text embeddings concentrate near a low-dimensional
subspace (their neighbours mean something); uniform random directions in 512-d have no near neighbours at all,
which no index (and no user) can exploit. Each vector is ``normalize(z @ A + s * e)``, ``z`` ~ N(0, I_r) with
``r = --latent-dim`` (32), ``A`` a fixed random [r, D] map, ``e`` isotropic noise with ``s = --noise`` relative
to the signal; queries are fresh draws. Goals (issue 13, 2 CPU cores): exact 100k ≤ 20 ms p50; approximate 1M
≤ 10 ms p50 with recall@10 ≥ 0.95.

    python benchmarks/bench_search.py [--large] [--threads 2] [--queries 200] [--kinds flat ivf hnsw]
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from fuselip_med.search.index import IndexSettings, make_faiss_index

GOALS = {("flat", 100_000): "≤ 20 ms p50", ("ivf", 1_000_000): "≤ 10 ms p50, R@10 ≥ 0.95",
         ("hnsw", 1_000_000): "≤ 10 ms p50, R@10 ≥ 0.95"}


def embedding_like(n: int, dim: int, latent: int, noise: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    """[n, dim] float32 unit vectors near a random ``latent``-dim subspace (see the module doc)."""
    mapping = np.random.default_rng(12345).standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        block = rng.standard_normal((rows, latent), dtype=np.float32) @ mapping
        block += noise * rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """[Q, k] row ids of the exact top-k inner products (float32 products, chunked over the database)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(database), chunk):
        scores = queries @ database[start:start + chunk].T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids


def measure(kind: str, database: np.ndarray, queries: np.ndarray, truth: np.ndarray, settings: IndexSettings):
    start = time.perf_counter()
    index = make_faiss_index(database, kind, settings)
    build_s = time.perf_counter() - start
    for query in queries[:10]:  # warm-up
        index.search(query[None], 10)
    latencies, found = [], []
    for query in queries:
        start = time.perf_counter()
        _, ids = index.search(query[None], 10)
        latencies.append(time.perf_counter() - start)
        found.append(ids[0])
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    params = {"flat": "fp16, exact", "ivf": f"nlist {settings.resolved_nlist(len(database))}, "
              f"nprobe {settings.nprobe}", "hnsw": f"M {settings.hnsw_m}, efC {settings.ef_construction}, "
              f"efS {settings.ef_search}"}[kind]
    p50, p95 = (1000 * np.percentile(latencies, q) for q in (50, 95))
    return params, len(database) / build_s, p50, p95, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="Add the 1M x 512 row (several GB of memory).")
    parser.add_argument("--sizes", type=int, nargs="+", help="Database sizes (default 10000 100000 [1000000]).")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="FAISS/OpenMP threads (the goals are for 2).")
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--nprobe", type=int, default=IndexSettings.nprobe)
    parser.add_argument("--ef-search", type=int, default=IndexSettings.ef_search)
    parser.add_argument("--hnsw-m", type=int, default=IndexSettings.hnsw_m)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or [10_000, 100_000] + ([1_000_000] if args.large else [])
    settings = IndexSettings(nprobe=args.nprobe, ef_search=args.ef_search, hnsw_m=args.hnsw_m)
    queries = embedding_like(args.queries, args.dim, args.latent_dim, args.noise, seed=1)
    print("| N | index | parameters | build (vectors/s) | p50 ms | p95 ms | recall@10 | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        database = embedding_like(n, args.dim, args.latent_dim, args.noise, seed=0)
        database = database.astype(np.float16).astype(np.float32)  # what the index stores
        truth = exact_top(database, queries, 10)
        for kind in args.kinds:
            params, rate, p50, p95, recall = measure(kind, database, queries, truth, settings)
            goal = GOALS.get((kind, n), "")
            print(f"| {n:,} | {kind} | {params} | {rate:,.0f} | {p50:.2f} | {p95:.2f} | {recall:.3f} | {goal} |",
                  flush=True)
    print(f"\n{args.threads} FAISS threads, D = {args.dim}, {args.queries} single queries, k = 10, faiss "
          f"{faiss.__version__}; data: rank-{args.latent_dim} embedding-like unit vectors, noise {args.noise}.")


if __name__ == "__main__":
    main()
