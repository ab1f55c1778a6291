"""Speed and recall@10 of the graph stage's kNN path against exact brute force (FAISS flat).

    python benchmarks/graph_speed.py --n 1000000 --json benchmarks/results/graph_speed.json
    python benchmarks/graph_speed.py --quick          # N = 10^5, under two minutes

Vectors: 512-d unit vectors with cluster structure, like CLIP embeddings (see clip_like_vectors),
generated from a seed, in chunks.

The kNN path is the one-process `pipeline.core.knn.knn_graph` (one-level k-means on a seeded
sample of 200,000, nlist = about 4*sqrt(N) capped at 1/39 of the sample, list-major search). Its
time includes training, adding and searching all N nodes. The graph stage itself (two-level
training, nlist = 4*sqrt(N), search by groups of lists on Ray) is measured by graph_scale.py.

Exact brute force over all N queries is too slow at 10^6 on two cores, so it is timed on a seeded
sample of --exact-queries nodes and extrapolated linearly (exact search cost is linear in the number
of queries); recall@10 is measured on that sample (self removed by id on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import GraphConfig  # noqa: E402
from pipeline.core.knn import exact_knn, knn_graph, recall_at_k  # noqa: E402
from pipeline.testing import clip_like_vectors  # noqa: E402


def run_knn(x: np.ndarray, k: int, sample: np.ndarray, exact_nb: np.ndarray, **kwargs) -> dict:
    timings: dict = {}
    start = time.perf_counter()
    nb, _, cells = knn_graph(x, k, timings=timings, **kwargs)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "train_s": timings["train"], "add_s": timings["add"], "search_s": timings["search"],
        "recall": recall_at_k(nb[sample], exact_nb),
        "index_bytes": int(timings["index_bytes"]),
        "cells": int(len(np.unique(cells))),
    }


def progress(message: str) -> None:
    print(f"[graph_speed] {message}", file=sys.stderr, flush=True)


def markdown_table(result: dict) -> str:
    lines = [
        f"### N = {result['n']:,} ({result['dim']}-d, k = {result['k']}, nlist = {result['nlist']}, "
        f"nprobe = {result['nprobe']}, train_size = {result['train_size']:,})",
        "",
        f"Exact brute force (FAISS flat): {result['exact_sample_seconds']:.1f} s for {result['exact_queries']:,} "
        f"seeded queries, extrapolated to {result['exact_all_seconds_extrapolated']:.0f} s for all N.",
        "",
        "| index | recall@10 | total s | train s | add s | search s | speedup vs exact | index MB | index / float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['index']} | {r['recall']:.4f} | {r['seconds']:.1f} | {r['train_s']:.1f} | {r['add_s']:.1f} | "
            f"{r['search_s']:.1f} | {r['speedup']:.1f}x | {r['index_bytes'] / 2**20:.1f} | {r['memory_fraction']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="N = 10^5")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exact-queries", type=int, default=10_000)
    parser.add_argument("--nprobe", type=int, default=None, help="default: GraphConfig's")
    parser.add_argument("--nlist", type=int, default=None, help="default: GraphConfig's (about 4*sqrt(N))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result as JSON (top-level recall, speedup)")
    parser.add_argument("--md", default=None, help="append the result table as markdown to this file")
    args = parser.parse_args(argv)
    n = 100_000 if args.quick else args.n
    defaults = GraphConfig()
    nprobe = args.nprobe or defaults.nprobe
    train_size = 200_000
    common = dict(nlist=args.nlist or defaults.nlist, nprobe=nprobe, seed=args.seed, train_size=train_size)

    t = time.perf_counter()
    x = clip_like_vectors(n, args.dim, seed=args.seed)
    gen_s = time.perf_counter() - t
    progress(f"generated {n} x {args.dim} vectors in {gen_s:.1f}s")

    rng = np.random.default_rng(args.seed + 1)
    sample = np.sort(rng.choice(n, size=min(args.exact_queries, n), replace=False))
    t = time.perf_counter()
    exact_nb, exact_sqd = exact_knn(x, args.k, sample)
    exact_sample_s = time.perf_counter() - t
    pairs = rng.choice(n, size=(2, 2000))
    geometry = {
        "mean_cos_nearest": float(1 - exact_sqd[:, 0].mean() / 2),
        "mean_cos_kth": float(1 - exact_sqd[:, -1].mean() / 2),
        "mean_cos_random_pair": float((x[pairs[0]] * x[pairs[1]]).sum(1).mean()),
    }
    exact_all_s = exact_sample_s * n / len(sample)
    progress(f"exact search of {len(sample)} queries: {exact_sample_s:.1f}s")

    rows = []
    ivf = run_knn(x, args.k, sample, exact_nb, index="ivfflat", **common)
    rows.append({"index": "ivfflat", **ivf})
    progress(f"ivfflat: {ivf['seconds']:.1f}s recall {ivf['recall']:.4f}")
    vector_bytes = n * args.dim * 4
    for r in rows:
        r["speedup"] = exact_all_s / r["seconds"]
        r["memory_fraction"] = r["index_bytes"] / vector_bytes

    from pipeline.core.knn import resolve_nlist, training_ids

    nlist = resolve_nlist("ivfflat", n, len(training_ids(n, train_size, args.seed)), common["nlist"])
    result = {
        "benchmark": "graph_speed",
        "n": n, "dim": args.dim, "k": args.k, "nlist": nlist, "nprobe": nprobe,
        "train_size": min(n, train_size),
        "exact_queries": int(len(sample)),
        "exact_sample_seconds": exact_sample_s,
        "exact_all_seconds_extrapolated": exact_all_s,
        "generate_seconds": gen_s,
        "data_geometry": geometry,
        "recall": rows[0]["recall"],
        "speedup": rows[0]["speedup"],
        "rows": rows,
        "float32_vector_bytes": vector_bytes,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), python {platform.python_version()}",
        "faiss_threads": __import__("faiss").omp_get_max_threads(),
    }

    print(f"graph_speed N={n} d={args.dim} k={args.k} nlist={nlist} nprobe={nprobe} "
          f"exact: {exact_sample_s:.1f}s for {len(sample)} queries -> {exact_all_s:.0f}s for all N (extrapolated)")
    print("data: mean cosine nearest %.3f, %dth %.3f, random pairs %.3f" % (
        geometry["mean_cos_nearest"], args.k, geometry["mean_cos_kth"], geometry["mean_cos_random_pair"]))
    print(f"{'index':<20} {'recall@10':>9} {'total s':>8} {'train':>7} {'add':>7} {'search':>7} "
          f"{'speedup':>8} {'index MB':>9} {'mem/f32':>8}")
    for r in rows:
        print(f"{r['index']:<20} {r['recall']:>9.4f} {r['seconds']:>8.1f} {r['train_s']:>7.1f} {r['add_s']:>7.1f} "
              f"{r['search_s']:>7.1f} {r['speedup']:>7.1f}x {r['index_bytes'] / 2**20:>9.1f} {r['memory_fraction']:>8.4f}")
    if args.md:
        with open(args.md, "a") as fh:
            fh.write(markdown_table(result) + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
