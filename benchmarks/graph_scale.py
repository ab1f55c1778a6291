"""The graph stage at pool scale on a local multi-node Ray, against bare FAISS IndexIVFFlat.

    python benchmarks/graph_scale.py --json benchmarks/results/graph_scale.json   # N = 10^6 and 3*10^6
    python benchmarks/graph_scale.py --quick                                       # N = 10^5, under 3 minutes
    python benchmarks/graph_scale.py --sizes 1000000 --faiss-search big_batch      # one FAISS search (list-major)
    python benchmarks/graph_scale.py --in-process --sizes 100000                   # no Ray: the stage's maths

Pool: 512-d CLIP-like unit vectors (pipeline.testing.clip_like_chunks), generated in chunks and written
as embedding parts of 10,000 rows in the embed stage's own format (float16, formats.embeddings;
the text column is a narrow placeholder, the graph is built on the image column), committed.

For each N, in the same run and on the same parts:
* the stage: ``run_one(cfg, store, "graph")`` in a driver process connected to a Ray cluster of
  ``--nodes`` nodes (``--cpus-per-node`` CPUs each) on 127.0.0.1 (pipeline.testing.local_cluster),
  default config (nlist = round(4*sqrt(N)), nprobe 16, k 10, graph.max_task_rows), timed end to end:
  planning, two-level training, assignment, shuffle, search, merge, nodes.parquet and the stage's own
  recall check (exact search of 1,000 seeded nodes);
* bare FAISS in another process with every CPU as OpenMP threads: IndexIVFFlat with the same nlist,
  nprobe and training sample (the stage's fine sample; one-level k-means, 10 iterations, no
  subsampling), train + add, then two searches of all N (k+1 neighbours, self removed) on that same
  trained index: FAISS's query-major ``IndexIVFFlat.search`` and its list-major
  ``faiss.contrib.big_batch_search.big_batch_search`` (``method="knn_function"``, ``threaded=1``: the
  next list is prefetched while one is scanned; its own coarse quantisation of the queries is timed
  with it), the queries given BBS_QUERIES at a time (float32; all N at once would double the
  process's memory at 3*10^6). ``--faiss-search`` picks one or both. Reading the parts and preparing
  the vectors is *not* counted for FAISS (it is for the stage);
* recall@10 of the stage and of each FAISS search on the stage's seeded recall sample against exact
  search, and how many of those nodes get the same neighbours from both FAISS searches;
* peak RSS of the stage's driver (ru_maxrss) and of every Ray worker process (psutil, sampled
  every 0.2 s; the search tasks also report their worker's ru_maxrss).

Then the largest worker's memory with 1, 2 and 3 nodes (``--memory-n``): graph.max_task_rows set
to ``--memory-rows`` / nodes, the per-node memory bound falling as nodes are added.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline.testing import clip_like_chunks  # noqa: E402

from pipeline.config import config_from_dict  # noqa: E402
from pipeline.storage import Store  # noqa: E402

PART_ROWS = 10_000
SEED = 0
K = 10
RECALL_SAMPLE = 1000
# Queries per big_batch_search call (3*10^6 float32 512-d queries would be 6 GB beside the 6 GB index).
BBS_QUERIES = 1_000_000


def progress(message: str) -> None:
    print(f"[graph_scale] {message}", file=sys.stderr, flush=True)


def config(root: str, n: int, **graph) -> dict:
    parts = -(-n // PART_ROWS)
    return {
        "workdir": f"{root}/work", "seed": SEED,
        "input": {"shards": [f"{root}/pool/{i:05d}.tar" for i in range(parts)]},
        "output": {"url": f"{root}/out"},
        "graph": dict({"k": K, "recall_sample": RECALL_SAMPLE}, **graph),
    }


def write_pool(root: str, n: int, dim: int) -> None:
    """The embedding parts of N vectors (float16, 10,000 rows each), committed as the embed stage would."""
    from pipeline.formats.embeddings import part_table
    from pipeline.testing import commit_stage
    from pipeline.workdir import EMBED, part_name, stage_dir

    cfg = config_from_dict(config(root, n))
    store = Store(cfg.storage)
    emb = stage_dir(cfg.workdir, EMBED)
    if store.exists(f"{emb}/_SUCCESS.json"):
        return
    index, buf = 0, []
    text = np.zeros((PART_ROWS, 8), np.float16)  # placeholder: the graph uses the image column

    def flush(rows: np.ndarray) -> None:
        nonlocal index
        uids = [f"{index:05d}-{r:05d}" for r in range(len(rows))]
        table = part_table(f"{root}/pool/{index:05d}.tar", uids, uids, np.zeros(len(rows), np.float32),
                           rows.astype(np.float16), text[: len(rows)], [""] * len(rows), [None] * len(rows),
                           [None] * len(rows))
        store.write_parquet(f"{emb}/{part_name(index)}.parquet", table)
        index += 1

    for chunk in clip_like_chunks(n, dim, seed=SEED, chunk=PART_ROWS):
        buf.append(chunk)
        if sum(len(b) for b in buf) >= PART_ROWS:
            rows = np.concatenate(buf)
            flush(rows[:PART_ROWS])
            buf = [rows[PART_ROWS:]] if len(rows) > PART_ROWS else []
    if buf and sum(len(b) for b in buf):
        flush(np.concatenate(buf))
    commit_stage(store, cfg, "embed", {"samples": n})


# ------------------------------------------------------------------------------------------------
# child processes
# ------------------------------------------------------------------------------------------------

class WorkerSampler(threading.Thread):
    """Peak RSS of every Ray worker process under this driver (the local cluster's raylets are its
    children, their workers theirs), per process and summed per node (raylet), every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.worker_peak = 0
        self.node_peak = 0

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            per_node: dict[int, int] = {}
            for proc in me.children(recursive=True):
                try:
                    cmd = " ".join(proc.cmdline())
                    if not (cmd.startswith("ray::") or "default_worker.py" in cmd):  # workers rename themselves
                        continue
                    rss = proc.memory_info().rss
                    per_node[proc.ppid()] = per_node.get(proc.ppid(), 0) + rss
                    self.worker_peak = max(self.worker_peak, rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.node_peak = max([self.node_peak, *per_node.values()])
            self.stop.wait(0.2)


def stage_child(cfg_json: str, nodes: int, cpus: int, out: str) -> None:
    from pipeline.job import run_one
    from pipeline.testing import local_cluster

    cfg = config_from_dict(json.loads(cfg_json))
    with local_cluster(nodes=nodes, cpus_per_node=cpus, object_store_memory=200 * 2**20):
        sampler = WorkerSampler()
        sampler.start()
        start = time.perf_counter()
        stats = run_one(cfg, Store(cfg.storage), "graph")
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
    result = {"wall_s": wall, "stats": stats, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "worker_peak_rss_mb": sampler.worker_peak / 2**20, "node_workers_peak_rss_mb": sampler.node_peak / 2**20}
    with open(out, "w") as fh:
        json.dump(result, fh)


def big_batch_neighbors(index, store: Store, parts: list, recall_ids: np.ndarray, timings: dict) -> np.ndarray:
    """FAISS's list-major search of all N (BBS_QUERIES per call) on the trained, filled `index`; the
    neighbours of `recall_ids` (self removed). Seconds in timings["big_batch_search_s"]."""
    from faiss.contrib.big_batch_search import big_batch_search

    from pipeline.core.knn import remove_self
    from pipeline.formats.embeddings import read_vectors

    found = np.full((len(recall_ids), K), -1, np.int64)
    timings["big_batch_search_s"] = 0.0
    start_part = 0
    while start_part < len(parts):
        batch, rows = [], 0
        while start_part < len(parts) and (not batch or rows + parts[start_part].rows <= BBS_QUERIES):
            batch.append(parts[start_part])
            rows += parts[start_part].rows
            start_part += 1
        xq = np.concatenate([read_vectors(store, part, "image") for part in batch])
        offset = batch[0].offset
        start = time.perf_counter()
        d, i = big_batch_search(index, xq, K + 1, method="knn_function", threaded=1, verbose=1)
        timings["big_batch_search_s"] += time.perf_counter() - start
        del xq
        mine = (recall_ids >= offset) & (recall_ids < offset + rows)
        found[mine] = remove_self(i[recall_ids[mine] - offset], d[recall_ids[mine] - offset], recall_ids[mine], K)[0]
    return found


def faiss_child(cfg_json: str, threads: int, searches: str, out: str) -> None:
    import faiss

    from pipeline.core import ivf
    from pipeline.core.knn import recall_sample_ids, remove_self
    from pipeline.formats.embeddings import list_parts, read_vectors, read_vectors_at
    from pipeline.workdir import EMBED, stage_dir

    faiss.omp_set_num_threads(threads)
    cfg = config_from_dict(json.loads(cfg_json))
    store = Store(cfg.storage)
    parts, dim = list_parts(store, stage_dir(cfg.workdir, EMBED), "image")
    n = parts[-1].offset + parts[-1].rows
    nlist = ivf.nlist_for(n)
    nprobe = cfg.graph.nprobe
    _, fine = ivf.training_sample_ids(n, nlist, SEED)
    sample = read_vectors_at(store, parts, "image", fine)
    timings = {}
    start = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    index.cp.niter = ivf.KMEANS_ITERATIONS
    index.cp.seed = SEED
    index.cp.max_points_per_centroid = max(256, -(-len(sample) // nlist))  # the whole sample, as the stage
    index.train(sample)
    timings["train_s"] = time.perf_counter() - start
    del sample
    timings["add_s"] = 0.0
    for part in parts:
        x = read_vectors(store, part, "image")
        start = time.perf_counter()
        index.add(x)
        timings["add_s"] += time.perf_counter() - start
    index.nprobe = nprobe
    recall_ids = recall_sample_ids(n, RECALL_SAMPLE, SEED)
    if searches in ("both", "big_batch"):
        np.save(out + ".big_batch.npy", big_batch_neighbors(index, store, parts, recall_ids, timings))
    if searches in ("both", "query_major"):
        found = np.full((len(recall_ids), K), -1, np.int64)
        timings["search_s"] = 0.0
        for part in parts:
            x = read_vectors(store, part, "image")
            ids = np.arange(part.offset, part.offset + part.rows)
            start = time.perf_counter()
            d, i = index.search(x, K + 1)
            nb, _ = remove_self(i, d, ids, K)
            timings["search_s"] += time.perf_counter() - start
            mine = (recall_ids >= part.offset) & (recall_ids < part.offset + part.rows)
            found[mine] = nb[recall_ids[mine] - part.offset]
        np.save(out + ".neighbors.npy", found)
    build = timings["train_s"] + timings["add_s"]
    result = dict(timings, nlist=nlist, nprobe=nprobe, threads=threads, train_size=int(len(fine)),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if "search_s" in timings:
        result["total_s"] = build + timings["search_s"]
    if "big_batch_search_s" in timings:
        result["big_batch_total_s"] = build + timings["big_batch_search_s"]
    with open(out, "w") as fh:
        json.dump(result, fh)


def run_child(args: list[str], log_name: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{log_name} failed with exit code {done.returncode}")


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------

def run_stage(root: str, n: int, nodes: int, cpus: int, **graph) -> dict:
    """The stage from scratch (its previous output removed), in a driver process on a local cluster."""
    from pipeline.workdir import GRAPH, stage_dir

    cfg = config(root, n, **graph)
    shutil.rmtree(stage_dir(cfg["workdir"], GRAPH), ignore_errors=True)
    out = os.path.join(root, f"stage-{nodes}.json")
    run_child(["--_stage", json.dumps(cfg), "--_nodes", str(nodes), "--_cpus", str(cpus), "--_out", out], "stage")
    with open(out) as fh:
        return json.load(fh)


def run_faiss(root: str, n: int, threads: int, searches: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Bare FAISS in a child process: its timings and, per search run, the recall sample's neighbours."""
    out = os.path.join(root, "faiss.json")
    for name in (out + ".neighbors.npy", out + ".big_batch.npy"):
        if os.path.exists(name):
            os.remove(name)
    run_child(["--_faiss", json.dumps(config(root, n)), "--_threads", str(threads), "--_searches", searches,
               "--_out", out], "faiss")
    with open(out) as fh:
        result = json.load(fh)
    neighbors = {name: np.load(path) for name, path in
                 (("query_major", out + ".neighbors.npy"), ("big_batch", out + ".big_batch.npy")) if os.path.exists(path)}
    return result, neighbors


def exact_neighbors(root: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest of the seeded recall sample (the stage's own sample), part by part."""
    from pipeline.core.knn import exact_topk_block, merge_topk, recall_sample_ids, remove_self
    from pipeline.formats.embeddings import list_parts, read_vectors, read_vectors_at
    from pipeline.workdir import EMBED, stage_dir

    cfg = config_from_dict(config(root, n))
    store = Store(cfg.storage)
    parts, _ = list_parts(store, stage_dir(cfg.workdir, EMBED), "image")
    ids = recall_sample_ids(n, RECALL_SAMPLE, SEED)
    queries = read_vectors_at(store, parts, "image", ids)
    best_d = np.full((len(ids), K + 1), np.inf, np.float32)
    best_i = np.full((len(ids), K + 1), -1, np.int64)
    for part in parts:
        d, i = exact_topk_block(queries, read_vectors(store, part, "image"),
                                np.arange(part.offset, part.offset + part.rows), K + 1)
        best_d, best_i = merge_topk(best_d, best_i, d, i, K + 1)
    return ids, remove_self(best_i, best_d, ids, K)[0]


def stage_neighbors(root: str, n: int, ids: np.ndarray) -> np.ndarray:
    from pipeline.formats.embeddings import list_parts, rows_by_part
    from pipeline.formats.graph import read_part
    from pipeline.workdir import EMBED, GRAPH, stage_dir

    cfg = config_from_dict(config(root, n))
    store = Store(cfg.storage)
    parts, _ = list_parts(store, stage_dir(cfg.workdir, EMBED))
    out = []
    for part, rows in rows_by_part(parts, ids):
        out.append(read_part(store, f"{stage_dir(cfg.workdir, GRAPH)}/{part.name}.parquet", rows)["neighbors"])
    return np.concatenate(out)


def measure_size(base: str, n: int, dim: int, nodes: int, cpus: int, searches: str = "both") -> dict:
    from pipeline.core.knn import recall_at_k

    root = os.path.join(base, f"n{n}")
    start = time.perf_counter()
    write_pool(root, n, dim)
    progress(f"N={n:,}: parts written in {time.perf_counter() - start:.0f} s")
    stage = run_stage(root, n, nodes, cpus)
    progress(f"N={n:,}: stage {stage['wall_s']:.0f} s, seconds {stage['stats']['seconds']}")
    ids, exact = exact_neighbors(root, n)
    stage_recall = recall_at_k(stage_neighbors(root, n, ids), exact)
    progress(f"N={n:,}: stage recall@{K} {stage_recall:.4f}")
    faiss_result, faiss_nb = run_faiss(root, n, nodes * cpus, searches)
    progress(f"N={n:,}: bare FAISS {faiss_result}")
    s = stage["stats"]
    steps = s["seconds"]
    anchors = {}
    if "query_major" in faiss_nb:
        anchors.update(faiss_seconds=faiss_result["total_s"], ratio_to_faiss=stage["wall_s"] / faiss_result["total_s"],
                       faiss_recall_at_10=recall_at_k(faiss_nb["query_major"], exact))
    if "big_batch" in faiss_nb:
        anchors.update(big_batch_seconds=faiss_result["big_batch_total_s"],
                       ratio_to_big_batch=stage["wall_s"] / faiss_result["big_batch_total_s"],
                       big_batch_recall_at_10=recall_at_k(faiss_nb["big_batch"], exact))
    if len(faiss_nb) == 2:
        anchors["faiss_searches_same_neighbors"] = float(
            (np.sort(faiss_nb["big_batch"], 1) == np.sort(faiss_nb["query_major"], 1)).all(axis=1).mean())
    return {
        "n": n, "dim": dim, "k": K, "nlist": s["nlist"], "nprobe": s["nprobe"], "nodes": nodes, "cpus_per_node": cpus,
        "stage_seconds": stage["wall_s"], "stage_step_seconds": steps, "stage_train": s["train"],
        "assign_over_search": steps["assign"] / steps["search"],
        **anchors, "faiss": faiss_result,
        "recall_at_10": stage_recall, "stage_reported_recall_at_10": s["recall_at_k"],
        "driver_peak_rss_mb": stage["driver_peak_rss_mb"], "worker_peak_rss_mb": stage["worker_peak_rss_mb"],
        "node_workers_peak_rss_mb": stage["node_workers_peak_rss_mb"],
        "search_task_peak_rss_mb": s["search"]["worker_peak_rss_mb"],
        "groups": s["groups"], "units": s["units"], "group_rows_max": s["group_rows_max"],
        "max_task_rows": s["max_task_rows"], "groups_per_query": s["groups_per_query"],
        "shuffled_gb": s["search"]["shuffled_bytes"] / 1e9,
        "faiss_peak_rss_mb": faiss_result["peak_rss_mb"],
    }


def measure_memory(base: str, n: int, dim: int, rows: int, node_counts: list[int]) -> list[dict]:
    root = os.path.join(base, f"n{n}")
    write_pool(root, n, dim)
    out = []
    for nodes in node_counts:
        bound = rows // nodes
        stage = run_stage(root, n, nodes, 1, max_task_rows=bound)
        s = stage["stats"]
        out.append({"nodes": nodes, "max_task_rows": bound, "groups": s["groups"], "group_rows_max": s["group_rows_max"],
                    "worker_peak_rss_mb": stage["worker_peak_rss_mb"],
                    "node_workers_peak_rss_mb": stage["node_workers_peak_rss_mb"],
                    "search_task_peak_rss_mb": s["search"]["worker_peak_rss_mb"],
                    "driver_peak_rss_mb": stage["driver_peak_rss_mb"], "stage_seconds": stage["wall_s"]})
        progress(f"memory N={n:,} nodes={nodes}: largest worker {stage['worker_peak_rss_mb']:.0f} MB")
    return out


def measure_in_process(n: int, dim: int, searches: str) -> dict:
    """The stage's maths in this process, no Ray and no files (what a machine too loaded to start a
    Ray cluster still allows): ``ivf.sharded_knn_graph`` on the same vectors with the probes found
    through the coarse level (the stage's rule) and by comparing every vector with every list, and
    bare FAISS (train + add + each search) on an index trained as in :func:`faiss_child`; FAISS and
    the graph on the process's OpenMP threads. Recall@10 on the stage's seeded sample, exact search."""
    import faiss

    from pipeline.core import ivf
    from pipeline.core.knn import exact_knn, recall_at_k, recall_sample_ids, remove_self
    from pipeline.testing import clip_like_vectors

    x = clip_like_vectors(n, dim, seed=SEED)
    sample = recall_sample_ids(n, RECALL_SAMPLE, SEED)
    exact, _ = exact_knn(x, K, sample)
    out: dict = {"n": n, "dim": dim, "k": K, "mode": "in_process", "threads": faiss.omp_get_max_threads()}
    for name, exhaustive in (("graph", False), ("graph_exhaustive_assign", True)):
        timings: dict = {}
        start = time.perf_counter()
        nb, _, _ = ivf.sharded_knn_graph(x, K, seed=SEED, timings=timings, exhaustive_assign=exhaustive)
        out[name] = {"seconds": time.perf_counter() - start, "train_s": timings["train"], "assign_s": timings["assign"],
                     "search_s": timings["search"], "assign_over_search": timings["assign"] / timings["search"],
                     "recall_at_10": recall_at_k(nb[sample], exact)}
        progress(f"in-process N={n:,} {name}: {out[name]}")
    nlist = ivf.nlist_for(n)
    out["nlist"], out["nprobe"] = nlist, 16
    _, fine = ivf.training_sample_ids(n, nlist, SEED)
    timings = {}
    start = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    index.cp.niter, index.cp.seed = ivf.KMEANS_ITERATIONS, SEED
    index.cp.max_points_per_centroid = max(256, -(-len(fine) // nlist))
    index.train(x[fine])
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    index.add(x)
    timings["add_s"] = time.perf_counter() - start
    index.nprobe = 16
    if searches in ("both", "big_batch"):
        from faiss.contrib.big_batch_search import big_batch_search

        start = time.perf_counter()
        d, i = big_batch_search(index, x, K + 1, method="knn_function", threaded=1, verbose=1)
        timings["big_batch_search_s"] = time.perf_counter() - start
        out["big_batch_recall_at_10"] = recall_at_k(remove_self(i[sample], d[sample], sample, K)[0], exact)
        out["big_batch_seconds"] = timings["train_s"] + timings["add_s"] + timings["big_batch_search_s"]
    if searches in ("both", "query_major"):
        start = time.perf_counter()
        d, i = index.search(x, K + 1)
        timings["search_s"] = time.perf_counter() - start
        out["faiss_recall_at_10"] = recall_at_k(remove_self(i[sample], d[sample], sample, K)[0], exact)
        out["faiss_seconds"] = timings["train_s"] + timings["add_s"] + timings["search_s"]
    out["faiss"] = timings
    for key in ("big_batch_seconds", "faiss_seconds"):
        if key in out:
            out[key.replace("seconds", "ratio")] = out["graph"]["seconds"] / out[key]
    progress(f"in-process N={n:,} FAISS: {timings}, recall@{K} big_batch {out.get('big_batch_recall_at_10')}, "
             f"query-major {out.get('faiss_recall_at_10')}")
    return out


def _cell(r: dict, key: str, fmt: str) -> str:
    return "-" if r.get(key) is None else format(r[key], fmt)


def markdown(result: dict) -> str:
    lines = [
        "| N | nlist | stage s | assign s | search s | assign/search | FAISS query-major s | ratio | "
        "FAISS big_batch s | ratio | recall@10 stage | recall@10 query-major | recall@10 big_batch | driver MB | "
        "largest worker MB | groups | shuffled GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        steps = r["stage_step_seconds"]
        lines.append(
            f"| {r['n']:,} | {r['nlist']} | {r['stage_seconds']:.0f} | {steps['assign']:.1f} | {steps['search']:.1f} | "
            f"{steps['assign'] / steps['search']:.2f} | {_cell(r, 'faiss_seconds', '.0f')} | {_cell(r, 'ratio_to_faiss', '.2f')} | "
            f"{_cell(r, 'big_batch_seconds', '.0f')} | {_cell(r, 'ratio_to_big_batch', '.2f')} | {r['recall_at_10']:.4f} | "
            f"{_cell(r, 'faiss_recall_at_10', '.4f')} | {_cell(r, 'big_batch_recall_at_10', '.4f')} | "
            f"{r['driver_peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | {r['groups']} | {r['shuffled_gb']:.2f} |")
    if result.get("exponent") is not None:
        faiss = "".join(f", {name} {result[key]:.2f}" for name, key in
                        (("FAISS query-major", "faiss_exponent"), ("FAISS big_batch", "big_batch_exponent")) if key in result)
        lines += ["", f"Total time exponent from N = {result['sizes'][0]['n']:,} to {result['sizes'][-1]['n']:,}: "
                  f"stage {result['exponent']:.2f}{faiss}."]
    if result.get("memory"):
        lines += ["", f"Largest worker with 1-3 nodes (N = {result['memory_n']:,}, graph.max_task_rows = "
                  f"{result['memory_rows']:,} / nodes):", "",
                  "| nodes | max_task_rows | groups | rows/group max | largest worker MB | largest node (workers) MB | "
                  "stage s |", "|---|---|---|---|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['nodes']} | {m['max_task_rows']:,} | {m['groups']} | {m['group_rows_max']:,} | "
                         f"{m['worker_peak_rss_mb']:.0f} | {m['node_workers_peak_rss_mb']:.0f} | {m['stage_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 3_000_000])
    parser.add_argument("--quick", action="store_true", help="N = 10^5 on 2 nodes, no memory series (under 3 minutes)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes on 127.0.0.1 for the timed runs")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--faiss-search", choices=["both", "big_batch", "query_major"], default="both",
                        help="which FAISS searches run on the trained index (query-major: 1,392 s at 3*10^6)")
    parser.add_argument("--memory-n", type=int, default=1_000_000, help="N of the 1/2/3-node memory series (0: none)")
    parser.add_argument("--memory-rows", type=int, default=3_000_000, help="graph.max_task_rows x nodes in that series")
    parser.add_argument("--in-process", action="store_true",
                        help="no Ray: the stage's maths (ivf.sharded_knn_graph) with both assignment rules against FAISS")
    parser.add_argument("--workdir", default=None, help="where the pools go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the pools (reused by a later run with the same --workdir)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None, help="write the tables as markdown to this file")
    parser.add_argument("--_stage"), parser.add_argument("--_faiss"), parser.add_argument("--_out")
    parser.add_argument("--_nodes", type=int), parser.add_argument("--_cpus", type=int)
    parser.add_argument("--_threads", type=int), parser.add_argument("--_searches")
    args = parser.parse_args(argv)
    if args._stage:
        return stage_child(args._stage, args._nodes, args._cpus, args._out)
    if args._faiss:
        return faiss_child(args._faiss, args._threads, args._searches, args._out)

    sizes = [100_000] if args.quick else args.sizes
    if args.in_process:
        result = {"benchmark": "graph_scale", "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), "
                  f"python {platform.python_version()}", "load_average_start": os.getloadavg(), "in_process": []}
        started = time.time()
        for n in sizes:
            result["in_process"].append(measure_in_process(n, args.dim, args.faiss_search))
        result["load_average_end"] = os.getloadavg()
        result["wall_minutes"] = (time.time() - started) / 60
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
        return result
    memory_n = 0 if args.quick else args.memory_n
    base = args.workdir or tempfile.mkdtemp(prefix="graph-scale-")
    load_start = os.getloadavg()
    started = time.time()
    result = {"benchmark": "graph_scale", "sizes": [], "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), "
              f"python {platform.python_version()}", "load_average_start": load_start}
    for n in sizes:
        result["sizes"].append(measure_size(base, n, args.dim, args.nodes, args.cpus_per_node, args.faiss_search))
    if len(sizes) >= 2:
        first, last = result["sizes"][0], result["sizes"][-1]
        ratio = math.log(last["n"] / first["n"])
        result["exponent"] = math.log(last["stage_seconds"] / first["stage_seconds"]) / ratio
        for key, seconds in (("faiss_exponent", "faiss_seconds"), ("big_batch_exponent", "big_batch_seconds")):
            if seconds in first:
                result[key] = math.log(last[seconds] / first[seconds]) / ratio
    if memory_n:
        result["memory_n"], result["memory_rows"] = memory_n, args.memory_rows
        result["memory"] = measure_memory(base, memory_n, args.dim, args.memory_rows, [1, 2, 3])
    result["load_average_end"] = os.getloadavg()
    result["wall_minutes"] = (time.time() - started) / 60
    if not args.keep:  # the pools (and the last run's graph) go; --workdir keeps them for a rerun with --keep
        for n in set(sizes) | ({memory_n} if memory_n else set()):
            shutil.rmtree(os.path.join(base, f"n{n}"), ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    table = markdown(result)
    print(table)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
