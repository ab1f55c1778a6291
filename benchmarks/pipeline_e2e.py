"""The whole d2prune job on a generated pool: seconds per stage, and the partitioned select stage
against the exact global greedy (overlap |S_part ∩ S_exact| / B, cross-partition edges).

    .venv/bin/python benchmarks/pipeline_e2e.py --samples 20000 --json benchmarks/results/pipeline_e2e.json

The pool is written with pipeline.testing.write_pool (48 px JPEG/PNG images, captions, json uids;
no broken samples) to a local directory, embedded with the tiny open_clip model (random weights,
CPU), graphed with IVF-Flat, selected with D2 (70% pruned) and written as new shards. Then the
select stage alone is re-run (in process, on the same graph) for several partition settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time



def machine() -> str:
    import multiprocessing

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{multiprocessing.cpu_count()}-core {platform.machine()} CPU, {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--prune-rate", type=float, default=0.7)
    parser.add_argument("--partitions", default="cells,16,4,1", help="select variants to compare (comma list)")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="write the results here (and a .md next to it)")
    args = parser.parse_args(argv)

    from pipeline.console import setup_logging
    from pipeline.core import d2
    from pipeline.job import run_job
    from pipeline.select.stage import select
    from pipeline.storage import Store
    from pipeline.testing import make_config, save_random_checkpoint, write_pool

    setup_logging()
    load_before = os.getloadavg()[0]
    base = args.dir or tempfile.mkdtemp(prefix="d2prune-bench-")
    os.makedirs(base, exist_ok=True)
    try:
        n_shards = -(-args.samples // args.per_shard)
        t0 = time.perf_counter()
        pool = write_pool(os.path.join(base, "pool"), n_shards=n_shards, per_shard=args.per_shard, seed=11,
                          broken=False)
        pool_seconds = time.perf_counter() - t0
        ckpt = save_random_checkpoint(os.path.join(base, "tiny.pt"), seed=1234)
        shards = os.path.join(base, "pool", f"{{00000..{n_shards - 1:05d}}}.tar")
        cfg = make_config(
            os.path.join(base, "work"), shards, os.path.join(base, "out"),
            embed={"pretrained": ckpt, "batch_size": 256, "num_actors": 1, "torch_threads": 1},
            graph={"k": args.k, "index": "ivfflat", "nlist": None, "nprobe": 16, "recall_sample": 1000},
            select={"prune_rate": args.prune_rate},  # partitions: the default (auto)
            overrides=["output.samples_per_shard=2000"],
            ray={"num_cpus": os.cpu_count(), "object_store_memory": 1_000_000_000},
        )
        config_path = os.path.join(base, "job.yaml")
        import yaml

        with open(config_path, "w") as fh:
            yaml.safe_dump(cfg.model_dump(), fh)
        t0 = time.perf_counter()
        summary = run_job(config_path)
        job_seconds = time.perf_counter() - t0
        store = Store()
        graph_stats = store.read_json(os.path.join(base, "work", "graph", "_stats.json"))
        select_stats = store.read_json(os.path.join(base, "work", "selection", "_stats.json"))

        variants = []
        specs = [(s.strip(), False) for s in args.partitions.split(",")] + [("cells", True)]
        for spec, use_ray in specs:
            partitions = spec if spec in ("auto", "cells") else int(spec)
            raw = cfg.model_dump()
            raw["select"]["partitions"] = partitions
            from pipeline.config import config_from_dict

            variant = config_from_dict(raw)
            t0 = time.perf_counter()
            _, stats = select(variant, store, use_ray=use_ray)
            variants.append({
                "partitions": spec, "ray_tasks": use_ray, "n_partitions": stats["partitions"],
                "seconds": round(time.perf_counter() - t0, 3),
                "seconds_by_step": stats["seconds"],
                "cross_partition_edge_fraction": round(stats["cross_partition_edge_fraction"], 4),
                "overlap_with_exact": round(stats["overlap_with_exact"], 4),
            })
        results = {
            "machine": machine(),
            "samples": pool.n_kept,
            "shards": n_shards,
            "budget": d2.budget_for(pool.n_kept, args.prune_rate),
            "k": args.k,
            "nlist": graph_stats.get("nlist"),
            "recall_at_k": graph_stats.get("recall_at_k"),
            "pool_generation_seconds": round(pool_seconds, 1),
            "job_seconds": round(job_seconds, 1),
            "stage_seconds": summary["seconds"],
            "kept": summary["kept"],
            "select_stage": {k: select_stats.get(k) for k in (
                "partitions", "cross_partition_edge_fraction", "overlap_with_exact", "seconds", "used_ray")},
            "select_variants": variants,
            "load_average_1min": {"start": round(load_before, 1), "end": round(os.getloadavg()[0], 1)},
        }
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as fh:
            fh.write(markdown(results))
    return results


def markdown(r: dict) -> str:
    lines = [
        "# pipeline_e2e: the whole job on a generated pool",
        "",
        f"Machine: {r['machine']}. Pool: {r['samples']} samples in {r['shards']} local shards (48 px images), "
        f"tiny open_clip model (random weights, CPU), IVF-Flat k={r['k']} (nlist {r['nlist']}, recall@k "
        f"{r['recall_at_k']}), D2 keeping {r['budget']} (30%). Command: `benchmarks/pipeline_e2e.py "
        f"--samples {r['samples']}`.",
        "",
        f"Load average (1 min) at start/end: {r['load_average_1min']['start']}/{r['load_average_1min']['end']} "
        "(other work was running concurrently on the 2 cores: timings are pessimistic).",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    for stage, seconds in r["stage_seconds"].items():
        lines.append(f"| {stage} | {seconds:.1f} |")
    lines += [f"| whole job | {r['job_seconds']:.1f} |", "",
              "Select stage alone on the same graph, partitioned vs the exact global greedy (same selection in process or in Ray tasks):", "",
              "| partitions | P | where | seconds | cross-partition edges | overlap with exact |",
              "|---|---|---|---|---|---|"]
    for v in r["select_variants"]:
        where = "Ray tasks" if v["ray_tasks"] else "in process"
        lines.append(f"| {v['partitions']} | {v['n_partitions']} | {where} | {v['seconds']:.2f} | "
                     f"{v['cross_partition_edge_fraction']:.3f} | {v['overlap_with_exact']:.4f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
