"""Exact duplicates and evaluation-set decontamination (``select.prefilter.exact_duplicates``,
``select.prefilter.decontaminate``) on a contaminated demo pool: recall and precision of the
planted evaluation copies against the cosine threshold, per transform, and the pre-filters' extra
seconds against the graph stage's on the same pool.

    python benchmarks/decontaminate.py --json benchmarks/results/decontaminate.json    # >= 30,000 pairs
    python benchmarks/decontaminate.py --quick                                           # CI size

The pool (:mod:`pipeline.demo.contamination`): the demo's pictures, an evaluation set of other
pictures of which a known share is put into the pool transformed (JPEG quality 25-50, resized to
50-80%, a 10% crop, flipped, grey-scaled: one transform each, in turn) and another share has a
look-alike in the pool (same shape and colour, another picture: not a copy), plus byte-identical
copies of pool samples under other keys and uids in other shards. The whole job runs (embed with
the demo's shipped tiny CLIP, graph, select with both pre-filters at the default threshold) on an
embedded Ray with 2 CPUs. The curve: every pool sample's best evaluation match at or above a
floor (``--floor``), by the stage's own search over the committed vectors (its decisions at the
default are checked to be the curve's point there); a threshold t flags the samples whose
similarity is >= t, and a flag is right when the sample is a planted copy of the evaluation
picture it names. F1 is of the mild copies (at most a 10% crop, no flip or grey-scale).

Extra seconds: the select stage's laps ``exact_duplicates`` (hash buckets), ``prefilter_combine``,
``eval_embed`` (the evaluation shards embedded with the job's model, one
task per shard, on CPU) and ``decontaminate`` (the search of every embedding part), against the
graph stage's seconds (its committed stats: the same when ``--keep`` reuses the stage).
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

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import DEFAULT_DECONTAMINATE_THRESHOLD, config_from_dict  # noqa: E402
from pipeline.demo.contamination import TRANSFORMS, ContaminationSpec, generate  # noqa: E402
from pipeline.demo.run import demo_config  # noqa: E402
from pipeline.job import run_one  # noqa: E402
from pipeline.storage import Store  # noqa: E402

THRESHOLDS = tuple(round(float(t), 4) for t in list(np.arange(0.80, 0.99, 0.01)) + [0.99, 0.995, 0.998, 0.9985, 0.999,
                                                                                   0.9993, 0.9995, 0.9997, 0.9999])
TARGET_RECALL, TARGET_PRECISION, TARGET_EXTRA = 0.95, 0.99, 0.20
MILD = ("jpeg_quality", "resize", "crop10")  # copies with at most a 10% crop, and no flip or colour change


def best_matches(cfg, floor: float) -> dict:
    """Each pool sample's best evaluation match at or above ``floor`` (uid -> (eval id, cosine)), by
    the stage's own search (:func:`pipeline.core.decontaminate.nearest_evaluation`) over the
    committed image vectors and the evaluation vectors the stage embedded."""
    from pipeline.core.decontaminate import nearest_evaluation
    from pipeline.formats.embeddings import list_parts, read_raw_vectors
    from pipeline.select.eval_sets import load_set, sources

    store = Store()
    ids, evals, _ = load_set(store, sources(cfg)[0])
    parts, _ = list_parts(store, os.path.join(cfg.workdir, "embeddings"))
    out = {}
    for part in parts:
        uids = store.read_parquet(part.url, columns=["uid"]).column("uid").to_pylist()
        best, sim = nearest_evaluation(read_raw_vectors(store, part, "image"), evals, floor)
        out.update({u: (ids[b], s) for u, b, s in zip(uids, best.tolist(), sim.tolist()) if b >= 0})
    return out


def curve(truth, matches: dict, thresholds) -> list[dict]:
    """Recall (overall, mild transforms, per transform), precision and F1 (mild) of the planted
    copies at each threshold: a flag is right when it names the evaluation picture the sample copies."""
    rows = []
    copies = [(u, e, t) for u, r, e, t in zip(truth["uid"], truth["role"], truth["eval_id"], truth["transform"])
              if r == "eval_copy"]
    lookalikes = [u for u, r in zip(truth["uid"], truth["role"]) if r == "lookalike"]
    for th in thresholds:
        flagged = {u: e for u, (e, s) in matches.items() if s >= th}
        right = {u for u, e, _ in copies if flagged.get(u) == e}
        row = {"threshold": th, "flagged": len(flagged),
               "precision": round(len(right) / len(flagged), 4) if flagged else 1.0,
               "lookalikes_flagged": sum(u in flagged for u in lookalikes)}
        for group, names in [("all", TRANSFORMS), ("mild", MILD)] + [(n, (n,)) for n in TRANSFORMS]:
            planted = [u for u, _, t in copies if t in names]
            row[f"recall_{group}"] = round(sum(u in right for u in planted) / len(planted), 4) if planted else None
        p, r = row["precision"], row["recall_mild"]
        row["f1_mild"] = round(2 * p * r / (p + r), 4) if p + r else 0.0
        rows.append(row)
    return rows


def run(spec: ContaminationSpec, floor: float, keep: str | None) -> dict:
    import pyarrow.parquet as pq

    root = keep or tempfile.mkdtemp(prefix="decontaminate-")
    t0 = time.perf_counter()
    made = os.path.join(root, "data", "contamination.json")
    if keep and os.path.exists(made) and json.load(open(made))["spec"] == spec.__dict__:
        manifest = json.load(open(made))  # --keep: the pool of an earlier run (committed stages are reused too)
    else:
        manifest = generate(os.path.join(root, "data"), spec)
    generate_s = time.perf_counter() - t0
    raw = demo_config(root, manifest["pool"], quick=False)
    raw["select"]["prefilter"] = {"exact_duplicates": True, "decontaminate": {
        "threshold": DEFAULT_DECONTAMINATE_THRESHOLD, "sets": [{"name": "eval", "shards": manifest["eval"]}]}}
    cfg = config_from_dict(raw, source="benchmark")
    store = Store()
    stats = {}
    for stage in ("embed", "graph", "select"):
        t = time.perf_counter()
        stats[stage] = run_one(cfg, store, stage)
        stats[stage]["wall_s"] = round(time.perf_counter() - t, 2)
    decisions = pq.read_table(os.path.join(cfg.workdir, "selection", "decisions.parquet"),
                              columns=["uid", "reason", "blame_uid", "eval_id", "eval_similarity"]).to_pydict()
    truth = pq.read_table(manifest["ground_truth"]).to_pydict()
    # exact duplicates: found exactly, each naming the earliest sample with its bytes
    found = {u: b for u, r, b in zip(decisions["uid"], decisions["reason"], decisions["blame_uid"])
             if r == "exact_duplicate"}
    planted = {u: c for u, c in zip(truth["uid"], truth["copy_of"]) if c}
    t = time.perf_counter()
    matches = best_matches(cfg, floor)
    search_s = time.perf_counter() - t
    # the stage's own decisions at the default are the curve's point there (rows not dropped earlier)
    flagged = {u: e for u, r, e in zip(decisions["uid"], decisions["reason"], decisions["eval_id"])
               if r == "eval_duplicate"}
    at_default = {u: e for u, (e, s) in matches.items() if s >= DEFAULT_DECONTAMINATE_THRESHOLD and u not in found}
    sel = stats["select"]
    laps = sel["seconds"]
    extra = sum(laps.get(k, 0.0) for k in ("exact_duplicates", "eval_embed", "decontaminate", "prefilter_combine"))
    search = extra - laps.get("eval_embed", 0.0)
    # the stages' own seconds (committed stats: the same whether this run computed or reused them)
    graph_s = round(sum(stats["graph"]["seconds"].values()), 2)
    embed_s = stats["embed"]["seconds"]
    result = {
        "spec": spec.__dict__, "floor": floor, "pool_samples": stats["embed"]["samples"],
        "eval_pictures": spec.n_eval, "generate_s": round(generate_s, 1),
        "exact": {"planted": len(planted), "found": len(found), "same": found == planted,
                  "stats": sel.get("exact_duplicates")},
        "decontaminate_stats": sel.get("decontaminate"),
        "stage_agrees_with_curve": flagged == at_default,
        "seconds": {"embed": embed_s, "graph": graph_s,
                    "exact_duplicates": laps.get("exact_duplicates"), "eval_embed": laps.get("eval_embed"),
                    "decontaminate": laps.get("decontaminate"),
                    "prefilter_combine": laps.get("prefilter_combine"), "extra": round(extra, 2),
                    "extra_share_of_graph": round(extra / graph_s, 3) if graph_s else None,
                    "extra_without_eval_embed": round(search, 2),
                    "extra_without_eval_embed_share_of_graph": round(search / graph_s, 3) if graph_s else None,
                    "eval_embed_per_picture_vs_pool": round((laps.get("eval_embed", 0.0) / spec.n_eval)
                                                            / (embed_s / stats["embed"]["samples"]), 2),
                    "select_total": laps.get("total"), "curve_search": round(search_s, 2)},
        "curve": curve(truth, matches, [th for th in THRESHOLDS if th >= floor]),
    }
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def table(result: dict, default: float) -> str:
    best = max(result["curve"], key=lambda r: (r["f1_mild"], r["threshold"]))
    lines = [f"pool {result['pool_samples']:,} samples, evaluation set {result['eval_pictures']:,} pictures, "
             f"{result['spec']['planted_share']:.0%} planted transformed, {result['spec']['lookalike_share']:.0%} "
             "with a look-alike", "",
             "| threshold | flagged | precision | recall (all) | recall (≤10% crop, no flip/grey) | F1 (mild) | "
             + " | ".join(TRANSFORMS) + " | look-alikes flagged |",
             "|---" * (7 + len(TRANSFORMS)) + "|"]
    for r in result["curve"]:
        mark = " **(default)**" if abs(r["threshold"] - default) < 1e-9 else ""
        lines.append(f"| {r['threshold']:g}{mark} | {r['flagged']} | {r['precision']:.4f} | {r['recall_all']:.3f} | "
                     f"{r['recall_mild']:.3f} | {r['f1_mild']:.3f} | " + " | ".join(f"{r['recall_' + t]:.3f}" for t in TRANSFORMS)
                     + f" | {r['lookalikes_flagged']} |")
    s = result["seconds"]
    e = result["exact"]
    lines += ["", f"highest F1 (mild copies): threshold {best['threshold']:g}, precision {best['precision']:.4f}, "
              f"recall {best['recall_mild']:.3f}; the stage's decisions at the default equal the curve's point there: "
              f"{result['stage_agrees_with_curve']}",
              "", f"exact duplicates: {e['found']} found, {e['planted']} planted, same samples and kept sample: "
              f"{e['same']}", "",
              f"seconds: embed stage {s['embed']}, graph stage {s['graph']}; pre-filters {s['extra']} = "
              f"{s['extra_share_of_graph']:.1%} of the graph stage: exact duplicates {s['exact_duplicates']}, "
              f"embedding the evaluation set {s['eval_embed']} ({s['eval_embed_per_picture_vs_pool']}x the embed "
              f"stage's seconds per sample), search {s['decontaminate']}, combine {s['prefilter_combine']}; without "
              f"the evaluation set's embedding {s['extra_without_eval_embed']} = "
              f"{s['extra_without_eval_embed_share_of_graph']:.1%} of the graph stage"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 pairs, 300 evaluation pictures")
    parser.add_argument("--json", default=None, help="write the result here (and a .md beside it)")
    parser.add_argument("--floor", type=float, default=0.80, help="the lowest threshold of the curve")
    parser.add_argument("--keep", default=None, help="a directory to keep the pool and workdir in")
    args = parser.parse_args()
    spec = ContaminationSpec(n_pool=2000, n_eval=300, exact_copies=40) if args.quick else \
        ContaminationSpec(n_pool=30_000, n_eval=2_000, exact_copies=300)
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = run(spec, args.floor, args.keep)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "loadavg_before": [round(x, 2) for x in load_before],
                         "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    default = DEFAULT_DECONTAMINATE_THRESHOLD
    point = next((r for r in result["curve"] if abs(r["threshold"] - default) < 1e-9), None)
    result["default"] = {"threshold": default, "point": point,
                         "targets": {"recall_mild": TARGET_RECALL, "precision": TARGET_PRECISION,
                                     "extra_share_of_graph": TARGET_EXTRA}}
    text = table(result, default)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as fh:
            fh.write(f"# benchmarks/decontaminate.py\n\n{text}\n\nmachine: {result['machine']}, wall {result['wall_s']} s\n")


if __name__ == "__main__":
    main()
