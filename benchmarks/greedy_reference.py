"""The in-memory D2 greedy on a committed graph: the yardstick of the select stage's ``x greedy``
on a job's own work directory (``benchmarks/select_scale.py`` makes its own graphs).

    python benchmarks/greedy_reference.py WORKDIR [--json PATH]

Reads the graph stage's output whole (``formats.graph.read_graph``) and the score column of the
embedding parts (``select.score``, ``clip_score`` by default), then, timed, in this one process:
``symmetrize_knn`` + ``shift_nonnegative`` + ``d2_select`` with the job's defaults (prune_rate
0.7, γ = 1 both ways, one forward round; edge lengths as the select stage takes them:
squared L2 or its root, ``--distance``), twice, the faster run kept (as ``select_scale.py``). It
then compares the greedy's selection with the stage's ``selected.parquet`` (the same uids, in the
same order) when the stage has run with the same settings. Needs the whole graph in memory: about
0.5 KB per node at k = 10 (peak RSS printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from select_scale import timed_greedy  # noqa: E402  (this file's folder is on sys.path when run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--score", default="clip_score")
    ap.add_argument("--prune-rate", type=float, default=0.7)
    ap.add_argument("--distance", choices=["sqeuclidean", "euclidean"], default="sqeuclidean")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from pipeline.core import d2
    from pipeline.formats.embeddings import list_parts, read_column
    from pipeline.formats.graph import read_graph
    from pipeline.storage import Store
    from pipeline.workdir import stage_dir

    store = Store()
    t0 = time.perf_counter()
    g = read_graph(store, stage_dir(args.workdir, "graph"))
    parts, _ = list_parts(store, stage_dir(args.workdir, "embed"))
    scores = read_column(store, parts, args.score).astype(np.float64)
    read_s = time.perf_counter() - t0
    n = len(scores)
    budget = d2.budget_for(n, args.prune_rate)
    neighbors, uids = g["neighbors"], g["uids"]
    lengths = g["sq_distances"] if args.distance == "sqeuclidean" else np.sqrt(g["sq_distances"])
    del g
    runs, _, sel = timed_greedy(neighbors, lengths, scores, budget, 1.0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"workdir": args.workdir, "n": n, "budget": budget, "read_s": round(read_s, 2),
           "greedy_s": round(min(runs), 3), "greedy_runs_s": [round(r, 3) for r in runs],
           "peak_rss_mb": round(peak_mb, 1), "load_average": [round(x, 2) for x in os.getloadavg()]}
    selected = os.path.join(stage_dir(args.workdir, "select"), "selected.parquet")
    if os.path.exists(selected):
        table = pq.read_table(selected, columns=["uid", "selected"])
        stage_uids = np.asarray(table.column("uid").to_pylist(), dtype=object)[np.asarray(table.column("selected"))]
        greedy_uids = np.asarray(uids, dtype=object)[sel.order[:budget]]
        out["same_selection_as_stage"] = bool(len(stage_uids) == budget and (stage_uids == greedy_uids).all())
        stats = json.load(open(os.path.join(stage_dir(args.workdir, "select"), "_stats.json")))
        stage_s = (stats.get("seconds") or {}).get("total")
        out["stage_s"] = stage_s
        out["x_greedy"] = round(stage_s / out["greedy_s"], 2) if stage_s else None
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
