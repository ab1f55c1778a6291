"""The select stage at scale: exact D2 over P partitions on a local multi-node Ray cluster, against
the single-process exact greedy on the same graph.

Graph (written in the graph stage's own formats, ``pipeline.testing.write_graph_stages``): N points
in 2-D from a mixture of Gaussians; each point's k neighbours are the k nearest among the 2W points
next to it along a Z-order curve (an approximate kNN graph with the geometry of a real one: dense
clusters, transitivity, long chains through sparse regions); IVF cells are runs of N/nlist points
along the curve (nlist = 4 sqrt N, like the graph stage's default), so cells are compact regions
and most edges stay inside one, as in IVF graphs of clustered embeddings. Node ids are a random
permutation of the points (the pool's shard order has nothing to do with space). Scores: normal
(0.3, 0.05), like CLIP scores. The cross-cell edge fraction and each P's cross-partition fraction
are printed.

For each N, in separate processes (so each peak RSS is that process's own):

* ``reference``: the graph read whole (formats.graph.read_graph), ``symmetrize_knn`` +
  ``d2_select`` (the single-process exact greedy; its seconds exclude reading) and
  ``certified_rounds`` (the rounds the unpartitioned certification needs: the yardstick of the
  partitioned rounds), and the old approximation's overlap with the exact selection for each P
  (:func:`approximate_partitioned`: what ``select.approximate`` ran before the stage became exact);
* ``stage`` for each P: a ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes on 127.0.0.1, the
  select stage on it (this process is the driver), ``select.workers = P`` (one worker per
  partition) unless ``--workers``.

Small pools first (``--small-n``, default the demo's 3·10^3 and 10^5): the stage as a job runs it
below ``RAY_MIN_NODES``, in process (no Ray), in a fresh process each (so its time includes loading
the numba kernels from their on-disk cache, which :mod:`pipeline.warmup` fills first when it is
cold), for P = 1 and the demo's P = 4; against the same in-memory greedy.

Prints a table and writes ``--json`` (each run: ``identical`` to P=1 byte for byte, and against the
reference; ``driver_peak_rss_mb``; ``worker_peak_rss_mb``; ``x_greedy``: the stage's wall seconds
over the greedy's compute seconds, the faster of two runs; rounds; bytes; seconds) and ``--md``.

    python benchmarks/select_scale.py --small-only          # N = 3e3, 1e5 in process: seconds
    python benchmarks/select_scale.py --quick               # the small rows, then N = 1e5, P = 1, 8, 32 on Ray
    python benchmarks/select_scale.py --n 1000000 10000000 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

K = 10
PRUNE_RATE = 0.7
GAMMA = 1.0


def peak_rss_mb() -> float:
    from pipeline.runtime import peak_rss_bytes

    return peak_rss_bytes() / 2**20


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


def _z_order(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Morton key of 16-bit grid coordinates."""
    def spread(v):
        v = v.astype(np.uint64) & np.uint64(0xFFFF)
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    return spread(x) | (spread(y) << np.uint64(1))


def geometric_graph(n: int, k: int = K, seed: int = 0, window: int = 16, chunk: int = 500_000):
    """(neighbors int64 [n, k], sq_distances float32 [n, k], cells int32 [n], scores float64 [n])
    in node order (module docstring)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(4, int(np.sqrt(n) / 4))
    centers = rng.uniform(0, 1, (n_clusters, 2))
    spread = rng.uniform(0.005, 0.05, n_clusters)
    which = rng.integers(0, n_clusters, n)
    pts = (centers[which] + rng.normal(size=(n, 2)) * spread[which, None]).astype(np.float32)
    del which
    lo, hi = pts.min(0), pts.max(0)
    grid = ((pts - lo) / (hi - lo + 1e-9) * 65535).astype(np.uint32)
    order = np.argsort(_z_order(grid[:, 0], grid[:, 1]), kind="stable")  # curve position -> point
    del grid
    pts = pts[order]  # points in curve order from here on
    nlist = max(1, int(4 * np.sqrt(n)))
    cells_curve = (np.arange(n) * nlist // n).astype(np.int32)
    nb_curve = np.empty((n, k), np.int64)
    sq_curve = np.empty((n, k), np.float32)
    offsets = np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)])
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        cand = np.clip(np.arange(a, b)[:, None] + offsets[None, :], 0, n - 1)
        d = ((pts[cand] - pts[a:b, None, :]) ** 2).sum(-1)
        d[cand == np.arange(a, b)[:, None]] = np.inf  # clipped onto itself at the ends
        best = np.argpartition(d, k, axis=1)[:, :k]
        bd = np.take_along_axis(d, best, 1)
        srt = np.argsort(bd, axis=1)
        nb_curve[a:b] = np.take_along_axis(cand, best, 1)[np.arange(b - a)[:, None], srt]
        sq_curve[a:b] = np.take_along_axis(bd, srt, 1)
    del pts
    # node ids: a random permutation of the curve positions
    node_of = rng.permutation(n)
    curve_of = np.empty(n, np.int64)
    curve_of[node_of] = np.arange(n)
    neighbors = node_of[nb_curve[curve_of]]
    del nb_curve
    # scale like CLIP neighbours (squared L2 of unit vectors): the k-th neighbour at 0.5 (median),
    # so weights exp(-d) lie in about (0.4, 1)
    sq = sq_curve[curve_of] * np.float32(0.5 / max(float(np.median(sq_curve[:, -1])), 1e-12))
    del sq_curve
    cells = cells_curve[curve_of]
    scores = rng.normal(0.3, 0.05, n)
    cross = float(np.mean(cells[neighbors] != cells[:, None]))
    return neighbors, sq, cells, scores, {"nlist": nlist, "cross_cell_edge_fraction": round(cross, 4)}


def write_workdir(base: str, n: int, seed: int) -> dict:
    """The embed + graph stages for N (reused when present)."""
    from pipeline.config import config_from_dict
    from pipeline.storage import Store
    from pipeline.testing import write_graph_stages

    marker = os.path.join(base, "graph_info.json")
    if os.path.exists(marker):
        return json.load(open(marker))
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t0 = time.perf_counter()
    neighbors, sq, cells, scores, info = geometric_graph(n, K, seed)
    raw = config_raw(base)
    cfg = config_from_dict(raw)
    n_parts = max(1, n // 100_000)
    write_graph_stages(Store(), cfg, neighbors, sq, cells, scores, None, n_parts, return_uids=False)
    info.update(n=n, parts=n_parts, seconds=round(time.perf_counter() - t0, 1))
    json.dump(info, open(marker, "w"))
    return info


def config_raw(base: str) -> dict:
    return {"workdir": os.path.join(base, "work"), "input": {"shards": os.path.join(base, "pool/{00000..00001}.tar")},
            "output": {"url": os.path.join(base, "out")}, "graph": {"k": K},
            "select": {"score": "score", "prune_rate": PRUNE_RATE, "gamma_forward": GAMMA, "gamma_reverse": GAMMA}}


# --------------------------------------------------------------------------------------------
# The runs (each in its own process)
# --------------------------------------------------------------------------------------------


def run_reference(base: str, partitions: list[int]) -> dict:
    from pipeline.core import d2, d2_exact
    from pipeline.formats.embeddings import list_parts, read_column
    from pipeline.formats.graph import read_graph
    from pipeline.storage import Store
    from pipeline.workdir import stage_dir

    store = Store()
    work = os.path.join(base, "work")
    t0 = time.perf_counter()
    g = read_graph(store, stage_dir(work, "graph"))
    parts, _ = list_parts(store, stage_dir(work, "embed"))
    scores = read_column(store, parts, "score").astype(np.float64)
    read_s = time.perf_counter() - t0
    n = len(scores)
    budget = d2.budget_for(n, PRUNE_RATE)
    runs, graph, sel = timed_greedy(g["neighbors"], g["sq_distances"], scores, budget, GAMMA)
    greedy_s = min(runs)
    cells = g["cells"]
    del g
    rss = peak_rss_mb()
    t0 = time.perf_counter()
    rounds = d2_exact.certified_rounds(graph, sel.forward_scores, budget, GAMMA)
    np.save(os.path.join(base, "reference_order.npy"), sel.order)
    np.save(os.path.join(base, "reference_final.npy"), sel.final_scores[sel.order])
    certified_s = time.perf_counter() - t0
    overlaps = approximate_overlaps(graph, sel.forward_scores, sel.order, cells, budget, partitions)
    return {"n": n, "budget": budget, "read_s": round(read_s, 2), "greedy_s": round(greedy_s, 4),
            "greedy_runs_s": [round(r, 4) for r in runs],
            "peak_rss_mb": round(rss, 1), "certified_rounds": int(rounds),
            "certified_rounds_s": round(certified_s, 2), "edges": int(graph.n_edges),
            "approximate_overlap_with_exact": overlaps}


def timed_greedy(neighbors: np.ndarray, lengths: np.ndarray, scores: np.ndarray, budget: int, gamma: float):
    """The in-memory greedy (symmetrize_knn + shift_nonnegative + d2_select, γ both ways), after a
    numba warm-up, run twice: (both runs' seconds, the graph, the selection). The yardstick is the
    faster run (one run's seconds varied 2.4-3.9 s at 10^6 on an idle machine; the faster one makes
    every "x greedy" the more demanding)."""
    from pipeline.core import d2

    d2.d2_select(d2.symmetrize_knn(neighbors[:1000] % 1000, lengths[:1000]), np.ones(1000), 10)  # warm
    runs = []
    for _ in range(2):
        graph = sel = None  # the first run's memory freed before the second (peak RSS: one run's)
        t0 = time.perf_counter()
        graph = d2.symmetrize_knn(neighbors, lengths)
        shifted, _ = d2.shift_nonnegative(scores)
        sel = d2.d2_select(graph, shifted, budget, gamma, gamma)
        runs.append(time.perf_counter() - t0)
    return runs, graph, sel


def approximate_partitioned(graph, forward: np.ndarray, labels: np.ndarray, budget: int, gamma: float = GAMMA,
                            min_whole: int = K) -> np.ndarray:
    """The approximate partitioned greedy the select stage ran before it became exact (the removed
    ``select.approximate``): each partition (``labels``) its own reverse greedy on its internal
    edges with its proportional share of the budget (partitions of at most ``min_whole`` nodes
    whole), from the whole graph's forward scores; node ids merged by pick score (desc), ties by
    partition, then the partition's own order."""
    from pipeline.core import d2
    from pipeline.core.selectors import balanced_budgets

    shares = balanced_budgets(np.bincount(labels), budget, mode="proportional", min_whole=min_whole)
    nodes, score, part, pos = [], [], [], []
    for p, share in enumerate(shares):
        ids = np.flatnonzero(labels == p)
        sel = d2.reverse_select(d2.subgraph(graph, ids), forward[ids], int(share), gamma)
        nodes.append(ids[sel.order])
        score.append(sel.final_scores[sel.order])
        part.append(np.full(sel.order.size, p))
        pos.append(np.arange(sel.order.size))
    nodes, score, part, pos = (np.concatenate(x) for x in (nodes, score, part, pos))
    return nodes[np.lexsort((pos, part, -score))]


def approximate_overlaps(graph, forward, exact: np.ndarray, cells: np.ndarray, budget: int,
                         partitions: list[int]) -> dict[str, float]:
    """|approximate ∩ exact| / budget per P (partitions of whole cells, as the stage makes them)."""
    from pipeline.core.partition import cell_partitions

    out = {}
    for p in partitions:
        of_cell, _ = cell_partitions(np.bincount(cells), p)
        picked = approximate_partitioned(graph, forward, of_cell[cells], budget)
        out[str(p)] = round(np.intersect1d(picked, exact).size / budget, 4) if budget else 1.0
    return out


def run_stage(base: str, partitions: int, nodes: int, cpus_per_node: int, workers: int | None) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import config_from_dict
    from pipeline.select import stage
    from pipeline.stage import StageContext
    from pipeline.storage import Store
    from pipeline.workdir import stage_dir

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False,
                                                            "object_store_memory": 150_000_000})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node, object_store_memory=150_000_000)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        raw = config_raw(base)
        raw["select"].update(partitions=partitions, workers=workers or partitions)
        cfg = config_from_dict(raw)
        store = Store()
        shutil.rmtree(stage_dir(cfg.workdir, "select"), ignore_errors=True)
        t0 = time.perf_counter()
        stats = stage.run(cfg, store, StageContext("bench", {}), use_ray=True)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    sel = stage_dir(os.path.join(base, "work"), "select")
    keep = os.path.join(base, f"selection-P{partitions}")
    shutil.rmtree(keep, ignore_errors=True)
    os.rename(sel, keep)
    return {"wall_s": round(wall, 2), "stats": stats}


def run_small(base: str, partitions: int) -> dict:
    """The stage as a job runs it on a small pool: in this process, no Ray (``use_ray`` left to the
    stage: below ``RAY_MIN_NODES``)."""
    from pipeline.config import config_from_dict
    from pipeline.select import stage
    from pipeline.stage import StageContext
    from pipeline.storage import Store
    from pipeline.workdir import stage_dir

    raw = config_raw(base)
    raw["select"].update(partitions=partitions)
    cfg = config_from_dict(raw)
    store = Store()
    shutil.rmtree(stage_dir(cfg.workdir, "select"), ignore_errors=True)
    t0 = time.perf_counter()
    stats = stage.run(cfg, store, StageContext("bench", {}))
    wall = time.perf_counter() - t0
    keep = os.path.join(base, f"selection-local-P{partitions}")
    shutil.rmtree(keep, ignore_errors=True)
    os.rename(stage_dir(cfg.workdir, "select"), keep)
    return {"wall_s": round(wall, 3), "stats": stats}


def warm_cache() -> dict:
    """The numba cache warmed (:mod:`pipeline.warmup`) unless it is: whether it was, and seconds."""
    from pipeline import warmup

    if warmup.is_warm():
        return {"was_warm": True, "seconds": 0.0}
    t0 = time.perf_counter()
    warmup.main([])
    return {"was_warm": False, "seconds": round(time.perf_counter() - t0, 1)}


SMALL_PARTITIONS = (1, 4)


def small_rows(sizes: list[int], directory: str, seed: int) -> list[dict]:
    out = []
    for n in sizes:
        base = os.path.join(directory, f"n{n}")
        info = write_workdir(base, n, seed)
        print(f"N={n:,} (in process): graph {info}", flush=True)
        ref = child(["_reference", base, ""])
        print(f"  reference: {ref}", flush=True)
        runs = []
        for p in SMALL_PARTITIONS:
            run = child(["_small", base, str(p)])
            s = run["stats"]
            run.update(partitions=p, identical=identical(base, p, "selection-local-P"),
                       driver_peak_rss_mb=s["driver_peak_rss_mb"], worker_peak_rss_mb=s["worker_peak_rss_mb"],
                       x_greedy=round(run["wall_s"] / max(ref["greedy_s"], 1e-3), 1))
            print(f"  P={p} in process: wall {run['wall_s']} s ({run['x_greedy']}x greedy), identical "
                  f"{run['identical']}, seconds {s['seconds']}", flush=True)
            runs.append(run)
        out.append({"n": n, "graph": info, "reference": ref,
                    "reference_identical": matches_reference(base, "selection-local-P1"), "runs": runs})
    return out


def small_table(results: list[dict]) -> str:
    lines = ["| N | P | in process | identical to P=1 | stage wall s | greedy s | x greedy | driver RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for run in r["runs"]:
            lines.append(f"| {r['n']:,} | {run['partitions']} | yes | {'yes' if run['identical'] else 'NO'} | "
                         f"{run['wall_s']:.2f} | {r['reference']['greedy_s']:.3f} | {run['x_greedy']:.1f} | "
                         f"{run['driver_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": ""})
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def identical(base: str, partitions: int, prefix: str = "selection-P") -> bool:
    a = os.path.join(base, f"{prefix}1", "selected.parquet")
    b = os.path.join(base, f"{prefix}{partitions}", "selected.parquet")
    return open(a, "rb").read() == open(b, "rb").read()


def matches_reference(base: str, selection: str = "selection-P1") -> bool:
    import pyarrow.parquet as pq

    got = pq.read_table(os.path.join(base, selection, "selected.parquet"), columns=["uid", "final_score"])
    nodes = np.array([int(u, 16) for u in got.column("uid").to_pylist()], np.int64)
    return bool(np.array_equal(nodes, np.load(os.path.join(base, "reference_order.npy")))
                and np.array_equal(got.column("final_score").to_numpy(), np.load(os.path.join(base, "reference_final.npy"))))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine() -> str:
    mem = next((int(line.split()[1]) / 2**20 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    return f"{os.cpu_count()}-core {platform.machine()} VM ({cpu}), {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def table(results: list[dict]) -> str:
    lines = ["| N | P | workers | identical to P=1 | wall s | x greedy | rounds (certified) | cross-part. edges | "
             "reverse MB | all MB exchanged | driver RSS MB | largest worker RSS MB (target) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = r["reference"]
        for run in r["runs"]:
            s = run["stats"]
            lines.append(
                f"| {r['n']:,} | {run['partitions']} | {s['workers']} | {'yes' if run['identical'] else 'NO'} | "
                f"{run['wall_s']:.1f} | {run['wall_s'] / ref['greedy_s']:.2f} | {s.get('rounds', 0)} "
                f"({ref['certified_rounds']}) | {s.get('cross_partition_edge_fraction', 0):.3f} | "
                f"{s.get('bytes_exchanged', 0) / 2**20:.1f} | {run['exchanged_mb']:.1f} | "
                f"{s['driver_peak_rss_mb']:.0f} | {s['worker_peak_rss_mb']:.0f} ({run['worker_target_mb']:.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_reference":
        print(json.dumps(run_reference(argv[1], [int(p) for p in argv[2].split(",") if p])))
        return 0
    if argv and argv[0] == "_stage":
        workers = int(argv[5]) if argv[5] != "0" else None
        print(json.dumps(run_stage(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), workers), default=str))
        return 0
    if argv and argv[0] == "_small":
        print(json.dumps(run_small(argv[1], int(argv[2])), default=str))
        return 0
    if argv and argv[0] == "_warm":
        print(json.dumps(warm_cache()))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--quick", action="store_true", help="the small rows, then N = 1e5 only")
    parser.add_argument("--small-n", type=int, nargs="*", default=[3_000, 100_000],
                        help="small pools run in process (none: skip them)")
    parser.add_argument("--small-only", action="store_true", help="only the small rows")
    parser.add_argument("--nodes", type=int, default=4, help="Ray nodes of the local cluster")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per node")
    parser.add_argument("--workers", type=int, default=0, help="partition workers (0: one per partition)")
    parser.add_argument("--dir", default="/tmp/d2prune-select-scale", help="where the graphs are written (reused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    sizes = [] if args.small_only else [100_000] if args.quick else args.n
    load = os.getloadavg()
    cache = child(["_warm"]) if args.small_n else None
    small = small_rows(args.small_n, args.dir, args.seed)
    results = []
    for n in sizes:
        base = os.path.join(args.dir, f"n{n}")
        info = write_workdir(base, n, args.seed)
        print(f"N={n:,}: graph {info}", flush=True)
        ref = child(["_reference", base, ",".join(str(p) for p in args.partitions if p > 1)])
        print(f"  reference: {ref}", flush=True)
        runs = []
        for p in sorted(set([1] + args.partitions)):
            run = child(["_stage", base, str(p), str(args.nodes), str(args.cpus_per_node), str(args.workers)])
            run["partitions"] = p
            runs.append(run)
        s1 = next(r for r in runs if r["partitions"] == 1)["stats"]["worker_peak_rss_mb"]
        for run in runs:
            s = run["stats"]
            run["identical"] = identical(base, run["partitions"])
            run["driver_peak_rss_mb"] = s["driver_peak_rss_mb"]
            run["worker_peak_rss_mb"] = s["worker_peak_rss_mb"]
            run["worker_target_mb"] = 2 * s1 / run["partitions"] + 300
            run["exchanged_mb"] = (s.get("bytes_exchanged", 0) + s.get("forward_bytes", 0)
                                   + s.get("final_bytes", 0)) / 2**20
            run["x_greedy"] = round(run["wall_s"] / max(ref["greedy_s"], 1e-3), 2)
            print(f"  P={run['partitions']}: wall {run['wall_s']} s, identical {run['identical']}, rounds "
                  f"{s.get('rounds')}, workers {s['workers']}, worker RSS {s['worker_peak_rss_mb']} MB, driver RSS "
                  f"{s['driver_peak_rss_mb']} MB, seconds {s['seconds']}", flush=True)
        results.append({"n": n, "graph": info, "reference": ref, "reference_identical": matches_reference(base),
                        "runs": runs})
    report = {"machine": machine(), "load_average_start": [round(x, 1) for x in load],
              "load_average_end": [round(x, 1) for x in os.getloadavg()], "k": K, "prune_rate": PRUNE_RATE,
              "gamma": GAMMA, "cluster": {"nodes": args.nodes, "cpus_per_node": args.cpus_per_node},
              "numba_cache": cache, "small": small, "results": results}
    text = "\n\n".join(t for t in (small_table(small) if small else "", table(results) if results else "") if t)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
