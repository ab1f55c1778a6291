"""``d2prune demo``: a generated pool, the whole job on an embedded Ray, scored against ground truth.

:func:`run_demo` does what a newcomer's first command should show:

1. writes a small image–text pool (:mod:`pipeline.demo.pool`) with planted mismatched captions,
   near-duplicates and rare kinds, whose ground truth is kept apart from the shards;
2. writes a job config (``demo.yaml`` with the demo's own directories and the shipped tiny
   CLIP, ``assets/tiny_clip.{json,pt}``, loaded exactly like a user's checkpoint) and runs it
   through :func:`pipeline.job.run_job`, the code behind ``d2prune run``;
3. recomputes the CLIP-score top-k and random baselines at the same budget on the same committed
   embeddings and graph (:func:`pipeline.select.stage.select` with ``select.method`` changed),
   scores all three against the ground truth (:mod:`pipeline.demo.evaluate`), prints the table and
   writes it to ``WORKDIR/demo_ground_truth.json``;
4. builds ``WORKDIR/report.html`` (:func:`pipeline.report.build_report`, with the demo's
   ground-truth section from :mod:`.report_section`) and returns its path.

Re-running resumes: a pool already generated with the same spec is reused and committed stages
are skipped. ``quick`` uses a smaller pool in ``*-quick`` directories, so both modes can share
``out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..report import build_report
from .report_section import GROUND_TRUTH_FILE, demo_extras

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_CONFIG = ASSETS / "tiny_clip.json"
CHECKPOINT = ASSETS / "tiny_clip.pt"
MODEL_NAME = "tiny_clip"  # open_clip registers a config JSON under its file stem
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # the one demo config (configs/demo.yaml links here)

# What the demo compares D2 with, at the same budget on the same committed embeddings and graph:
# D2 without its pre-filter (what beta contributes), and the two classic baselines.
BASELINES = {
    "d2_no_prefilter": "D2, beta=0",
    "score_topk": "CLIP-score top-k",
    "random": "random",
}


def demo_config(out_dir: str, shards: str, quick: bool) -> dict[str, Any]:
    """The job config of the demo as a dict: demo.yaml with the demo's directories and the
    package's own model files (wherever the package is installed)."""
    import yaml

    with open(DEMO_CONFIG) as fh:
        raw = yaml.safe_load(fh)
    suffix = "-quick" if quick else ""
    raw["workdir"] = os.path.join(out_dir, f"work{suffix}")
    raw["input"]["shards"] = shards
    raw["output"]["url"] = os.path.join(out_dir, f"filtered{suffix}")
    raw["embed"].update(model=MODEL_NAME, model_config_path=str(MODEL_CONFIG), pretrained=str(CHECKPOINT))
    return raw


def _ensure_pool(pool_dir: str, spec) -> dict[str, Any]:
    from .pool import generate_pool

    manifest_path = os.path.join(pool_dir, "pool.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        if manifest.get("spec") == spec.__dict__ and os.path.exists(manifest.get("ground_truth", "")):
            log.info("demo pool already in %s, reusing it", pool_dir)
            return manifest
        raise ValueError(f"{pool_dir} holds a demo pool made with other settings ({manifest.get('spec')}); "
                         "use another --out directory or delete it")
    log.info("generating the demo pool in %s", pool_dir)
    return generate_pool(pool_dir, spec)


def evaluate_job(cfg, store, ground_truth_path: str) -> dict[str, Any]:
    """D2's committed selection and the baselines at the same budget, against the ground truth."""
    import pyarrow.parquet as pq

    from ..formats.selection import read_selected
    from ..select.stage import select
    from ..workdir import SELECT, read_stats, stage_dir
    from .evaluate import evaluate_selection

    ground_truth = pq.read_table(ground_truth_path)
    sel_dir = stage_dir(cfg.workdir, SELECT)
    d2_uids = read_selected(store, sel_dir, columns=["uid"]).column("uid").to_pylist()
    select_stats = read_stats(store, sel_dir)
    results = {"d2": evaluate_selection(ground_truth, d2_uids)}
    selections = {"d2": d2_uids}
    for name in BASELINES:
        variant = cfg.model_copy(deep=True)
        # the baselines as published (plain top-k, plain random) and D2 without its pre-filter
        variant.select.method = "d2" if name == "d2_no_prefilter" else name
        variant.select.beta = 0.0
        table, _ = select(variant, store, use_ray=False)
        selections[name] = table.column("uid").to_pylist()
        results[name] = evaluate_selection(ground_truth, selections[name])
    return {"results": results, "selections": selections, "select_stats": select_stats}


def run_demo(out_dir: str = "d2prune-demo", quick: bool = False) -> str:
    """Generate the pool, run the job, evaluate it, build the report; returns the report's path."""
    import ray

    from ..config import config_from_dict
    from ..console import print_summary, setup_logging
    from ..job import run_job
    from ..storage import Store
    from .evaluate import format_table
    from .pool import PoolSpec, quick_spec
    from .scenes import RARE_COLOURS, RARE_SHAPES

    setup_logging()
    started = time.perf_counter()
    # the select stage's numba kernels compiled on the CPU the pool's generation leaves idle (a
    # no-op once they are cached; the job runner would start it otherwise, behind Ray and the embed stage)
    from ..warmup import start as start_warmup

    start_warmup()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    suffix = "-quick" if quick else ""
    spec = quick_spec() if quick else PoolSpec()
    manifest = _ensure_pool(os.path.join(out_dir, f"pool{suffix}"), spec)

    raw = demo_config(out_dir, manifest["shards"], quick)
    cfg = config_from_dict(raw, source="demo config")  # validate before writing it down
    config_path = os.path.join(out_dir, f"demo{suffix}.yaml")
    import yaml

    with open(config_path, "w") as fh:
        fh.write("# written by `d2prune demo`; rerun the job with: d2prune run " + config_path + "\n")
        yaml.safe_dump(raw, fh, sort_keys=False)

    ray_was_running = ray.is_initialized()
    try:
        summary = run_job(config_path, report=False)  # its own report, with the ground truth, below
        store = Store(cfg.storage)
        evaluation = evaluate_job(cfg, store, manifest["ground_truth"])
    finally:
        if not ray_was_running and ray.is_initialized():
            ray.shutdown()

    results = evaluation["results"]
    titles = {"d2": "D2", **BASELINES}
    context = {
        "pool_mismatch_share": manifest["planted"]["mismatched"] / manifest["samples"],
        "rare_shape": ", ".join(RARE_SHAPES), "rare_colour": ", ".join(RARE_COLOURS),
    }
    table = format_table(results, titles, context)
    record = {
        "pool": {k: manifest[k] for k in ("samples", "planted", "seed", "shards", "ground_truth")},
        "budget": evaluation["select_stats"].get("budget"),
        "settings": {"select": cfg.select.model_dump(), "graph": cfg.graph.model_dump(),
                     "embed_model": cfg.embed.model,
                     "baselines": "same budget and graph; select.beta=0 (no pre-filter)"},
        "methods": list(results),  # display order (the JSON file itself has sorted keys)
        "titles": titles,
        "context": context,
        "results": results,
        "table": table,
    }
    from ..storage import join

    store.write_json(join(cfg.workdir, GROUND_TRUTH_FILE), record)
    report = build_report(cfg.workdir, store, demo_extras(store, cfg.workdir), input_cfg=cfg.input)
    print_summary(summary)
    print()
    print(f"ground truth ({manifest['samples']} samples; budget {record['budget']}):")
    print(table)
    print()
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    print(f"report: {report}")
    return report
