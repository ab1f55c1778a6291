"""How the demo's D2 settings were found: D2 variants on a finished demo, against the ground truth.

    python -m pipeline.demo.sweep d2prune-demo [--quick] [--markdown docs/demo_tuning.md]

Runs after ``d2prune demo``: it reuses the committed embeddings, rebuilds the kNN graph where a
variant needs another one (``graph.vector`` / ``graph.k``, in side work dirs next to the demo's,
through the graph stage itself), recomputes the selection with :func:`pipeline.select.stage.select`
for each variant, and scores each against the ground truth. Nothing of the demo is modified.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

# One change at a time from the published defaults (gamma=1, beta=0, image graph), then together.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("published defaults: image graph, gamma 1, beta 0", {"vector": "image", "gamma": 1.0, "beta": 0.0}),
    ("gamma 10", {"vector": "image", "gamma": 10.0, "beta": 0.0}),
    ("gamma 30", {"vector": "image", "gamma": 30.0, "beta": 0.0}),
    ("image+text graph", {"vector": "image+text", "gamma": 1.0, "beta": 0.0}),
    ("image+text graph, gamma 10", {"vector": "image+text", "gamma": 10.0, "beta": 0.0}),
    ("beta 0.1", {"vector": "image", "gamma": 1.0, "beta": 0.1}),
    ("beta 0.1, gamma 10", {"vector": "image", "gamma": 10.0, "beta": 0.1}),
    ("image+text, beta 0.1, gamma 5", {"vector": "image+text", "gamma": 5.0, "beta": 0.1}),
    ("image+text, beta 0.1, gamma 10 (the demo)", {"vector": "image+text", "gamma": 10.0, "beta": 0.1}),
    ("image+text, beta 0.1, gamma 20", {"vector": "image+text", "gamma": 20.0, "beta": 0.1}),
    ("image+text, beta 0.15, gamma 10", {"vector": "image+text", "gamma": 10.0, "beta": 0.15}),
    ("image+text, beta 0.1, gamma 10, k 10", {"vector": "image+text", "gamma": 10.0, "beta": 0.1, "k": 10}),
]


def _graph_variant(cfg, store, vector: str, k: int):
    """`cfg` with another graph, built by the graph stage in a side work dir (embeddings copied)."""
    from ..job import run_one

    if vector == cfg.graph.vector and k == cfg.graph.k:
        return cfg
    variant = cfg.model_copy(deep=True)
    variant.workdir = f"{cfg.workdir}-variants/graph-{vector.replace('+', '-')}-k{k}"
    variant.graph.vector = vector
    variant.graph.k = k
    if not os.path.exists(os.path.join(variant.workdir, "embeddings")):
        shutil.copytree(os.path.join(cfg.workdir, "embeddings"), os.path.join(variant.workdir, "embeddings"))
    run_one(variant, store, "graph")  # starts Ray itself; returns at once when already committed
    return variant


def run_sweep(out_dir: str, quick: bool = False) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    import ray

    from ..config import load_config
    from ..select.stage import select
    from ..storage import Store
    from .evaluate import evaluate_selection

    suffix = "-quick" if quick else ""
    cfg = load_config(os.path.join(out_dir, f"demo{suffix}.yaml"))
    with open(os.path.join(out_dir, f"pool{suffix}", "pool.json")) as fh:
        ground_truth = pq.read_table(json.load(fh)["ground_truth"])
    store = Store(cfg.storage)
    rows = []
    try:
        for name, v in VARIANTS:
            variant = _graph_variant(cfg, store, v["vector"], v.get("k", cfg.graph.k)).model_copy(deep=True)
            variant.select.method = "d2"
            variant.select.beta = v["beta"]
            variant.select.gamma_forward = variant.select.gamma_reverse = v["gamma"]
            table, stats = select(variant, store, use_ray=False)
            result = evaluate_selection(ground_truth, table.column("uid").to_pylist())
            rows.append({"variant": name, **result, "overlap_with_exact": stats.get("overlap_with_exact")})
        for method in ("score_topk", "random"):
            variant = cfg.model_copy(deep=True)
            variant.select.method = method
            variant.select.beta = 0.0
            table, _ = select(variant, store, use_ray=False)
            rows.append({"variant": f"baseline: {method}",
                         **evaluate_selection(ground_truth, table.column("uid").to_pylist())})
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def frac(v):
        return f"{v[0]}/{v[1]}"

    lines = ["| variant | mismatches dropped | near-dup groups thinned | redundant copies | kinds | "
             "kinds x texture | rare shape kept | rare colour kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mismatches_dropped']:.1%} | {r['dup_groups_thinned']:.1%} | "
                     f"{r['redundant_copies_kept']} | {frac(r['kinds_covered'])} | {frac(r['fine_kinds_covered'])} | "
                     f"{frac(r['rare_shape_kept'])} | {frac(r['rare_colour_kept'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="D2 variants on a finished demo, scored against its ground truth.")
    parser.add_argument("out_dir", help="the directory given to `d2prune demo --out`")
    parser.add_argument("--quick", action="store_true", help="the --quick demo in that directory")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = markdown(run_sweep(os.path.abspath(args.out_dir), args.quick))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
