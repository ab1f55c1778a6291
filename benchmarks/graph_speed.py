"""Speed and recall@10 of the graph stage's kNN path against exact brute force (FAISS flat).

    python benchmarks/graph_speed.py --n 1000000 --json benchmarks/results/graph_speed.json
    python benchmarks/graph_speed.py --quick          # N = 10^5, under two minutes

Vectors: 512-d unit vectors with cluster structure, like CLIP embeddings (see clip_like_vectors),
generated from a seed, in chunks.

The kNN path is `pipeline.core.ivf.sharded_knn_graph`, the graph stage's maths in one process
(two-level k-means on 64 vectors per list, nlist = round(4*sqrt(N)), search by groups of lists
under graph.max_task_rows rows), bit for bit what the stage writes for these vectors. Its time
includes training, assigning, grouping and searching all N nodes. The stage itself on Ray (tasks,
scratch files, several nodes) is measured by graph_scale.py.

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
from pipeline.core.ivf import FINE_POINTS_PER_LIST, nlist_for, sharded_knn_graph  # noqa: E402
from pipeline.core.knn import exact_knn, recall_at_k  # noqa: E402
from pipeline.testing import clip_like_vectors  # noqa: E402


def run_knn(x: np.ndarray, k: int, sample: np.ndarray, exact_nb: np.ndarray, **kwargs) -> dict:
    timings: dict = {}
    start = time.perf_counter()
    nb, _, cells = sharded_knn_graph(x, k, timings=timings, **kwargs)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "train_s": timings["train"], "assign_s": timings["assign"], "group_s": timings["group"],
        "search_s": timings["search"], "groups": int(timings["groups"]),
        "groups_per_query": float(timings["groups_per_query"]),
        "recall": recall_at_k(nb[sample], exact_nb),
        "cells": int(len(np.unique(cells))),
    }


def progress(message: str) -> None:
    print(f"[graph_speed] {message}", file=sys.stderr, flush=True)


def markdown_table(result: dict) -> str:
    lines = [
        f"### N = {result['n']:,} ({result['dim']}-d, k = {result['k']}, nlist = {result['nlist']}, "
        f"nprobe = {result['nprobe']}, train_size = {result['train_size']:,}, "
        f"max_task_rows = {result['max_task_rows']:,})",
        "",
        f"Exact brute force (FAISS flat): {result['exact_sample_seconds']:.1f} s for {result['exact_queries']:,} "
        f"seeded queries, extrapolated to {result['exact_all_seconds_extrapolated']:.0f} s for all N.",
        "",
        "| index | recall@10 | total s | train s | assign s | group s | search s | speedup vs exact | groups "
        "| groups per query |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['index']} | {r['recall']:.4f} | {r['seconds']:.1f} | {r['train_s']:.1f} | {r['assign_s']:.1f} | "
            f"{r['group_s']:.1f} | {r['search_s']:.1f} | {r['speedup']:.1f}x | {r['groups']} | "
            f"{r['groups_per_query']:.2f} |"
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
    nlist = nlist_for(n, args.nlist or defaults.nlist)
    common = dict(nlist=nlist, nprobe=nprobe, seed=args.seed, train_size=defaults.train_size,
                  max_rows_per_group=defaults.max_task_rows)

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
    ivf = run_knn(x, args.k, sample, exact_nb, **common)
    rows.append({"index": "ivfflat", **ivf})
    progress(f"ivfflat: {ivf['seconds']:.1f}s recall {ivf['recall']:.4f}")
    vector_bytes = n * args.dim * 4
    for r in rows:
        r["speedup"] = exact_all_s / r["seconds"]

    result = {
        "benchmark": "graph_speed",
        "n": n, "dim": args.dim, "k": args.k, "nlist": nlist, "nprobe": nprobe,
        "train_size": min(n, defaults.train_size or FINE_POINTS_PER_LIST * nlist),
        "max_task_rows": defaults.max_task_rows,
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
    print(f"{'index':<20} {'recall@10':>9} {'total s':>8} {'train':>7} {'assign':>7} {'group':>7} {'search':>7} "
          f"{'speedup':>8} {'groups':>7} {'g/query':>8}")
    for r in rows:
        print(f"{r['index']:<20} {r['recall']:>9.4f} {r['seconds']:>8.1f} {r['train_s']:>7.1f} {r['assign_s']:>7.1f} "
              f"{r['group_s']:>7.1f} {r['search_s']:>7.1f} {r['speedup']:>7.1f}x {r['groups']:>7} "
              f"{r['groups_per_query']:>8.2f}")
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
