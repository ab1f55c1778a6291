"""The graph stage: the kNN graph of the committed embedding parts, built with a sharded IVF FAISS
index on Ray (the maths is :mod:`pipeline.core.knn`; the task bodies :mod:`.tasks`).

Steps, each committed and skipped on re-run (a resumed run searches only missing graph parts):

1. ``nodes.parquet`` (node → uid), streamed part by part;
2. train the IVF quantiser on one worker from a seeded sample gathered in parallel;
3. add groups of parts into copies of the trained index (``index/shard-*``), merge them into one
   index with on-disk inverted lists;
4. search k+1 neighbours of every node, drop self by id, commit one graph part per embedding part;
5. recall@k of the written graph on a seeded sample against exact search (in ``_stats.json``).

The stage always writes squared L2 distances; ``graph.distance`` is applied by the select stage
(and fingerprinted with it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..config import JobConfig
from ..core.knn import merge_topk, recall_at_k, recall_sample_ids, remove_self, resolve_nlist, training_ids
from ..errors import StaleStageError
from ..formats.embeddings import EmbeddingPart, list_parts, rows_by_part
from ..formats.graph import NODES, read_part, write_nodes
from ..runtime import as_completed, init_ray, resources
from ..stage import Stage, StageContext
from ..storage import Store, clear_node_cache, join
from ..workdir import stage_dir
from . import tasks
from .tasks import INDEX_DIR, MERGED, MERGED_DATA, PLAN, TRAINED

log = logging.getLogger(__name__)


def settings(cfg: JobConfig) -> dict[str, Any]:
    # parts_per_task and recall_sample change how the graph is computed and checked, not the graph;
    # distance is applied (and fingerprinted) by the select stage
    return {"graph": cfg.graph.model_dump(exclude={"parts_per_task", "recall_sample", "distance"}), "seed": cfg.seed}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _plan(store: Store, cfg: JobConfig, parts: list[EmbeddingPart], dim: int, nlist: int,
          index_dir: str) -> dict[str, Any]:
    """The add groups and sizes, fixed on the first run; a resumed run must see the same parts."""
    current = {
        "parts": [p.name for p in parts], "rows": [p.rows for p in parts], "dim": dim, "nlist": nlist,
        "index": cfg.graph.index,
    }
    url = join(index_dir, PLAN)
    if store.exists(url):
        plan = store.read_json(url)
        for key, value in current.items():
            if plan.get(key) != value:
                raise StaleStageError(
                    f"{url} was made for other embedding parts or settings ({key} differs); the embedding "
                    "stage changed under a partial graph stage: rerun with --force-from graph"
                )
        return plan
    groups = _chunks(list(range(len(parts))), cfg.graph.parts_per_task)
    plan = dict(current, groups=groups, shards=[f"shard-{g:05d}" for g in range(len(groups))])
    store.write_json(url, plan)
    return plan


def _gather(store: Store, vector: str, parts: list[EmbeddingPart], ids: np.ndarray, parts_per_task: int) -> list:
    """Ray tasks gathering the vectors of the sorted global `ids`, `parts_per_task` parts each."""
    import ray

    gather = ray.remote(num_cpus=1)(tasks.gather_rows)
    return [gather.remote(store, vector, chunk) for chunk in _chunks(rows_by_part(parts, ids), parts_per_task)]


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Build the kNN graph of the committed embedding parts (module docstring)."""
    import ray

    graph_dir = stage_dir(cfg.workdir, "graph")
    g = cfg.graph
    index_dir = join(graph_dir, INDEX_DIR)
    seconds = {"layout": 0.0, "nodes": 0.0, "train": 0.0, "add": 0.0, "merge": 0.0, "search": 0.0, "recall": 0.0}

    t0 = time.perf_counter()
    parts, dim = list_parts(store, stage_dir(cfg.workdir, "embed"), g.vector)
    n_nodes = parts[-1].offset + parts[-1].rows
    if n_nodes == 0:
        raise ValueError(f"the embedding parts in {stage_dir(cfg.workdir, 'embed')} hold no rows")
    train_ids = training_ids(n_nodes, g.train_size, cfg.seed)
    nlist = resolve_nlist(g.index, n_nodes, len(train_ids), g.nlist)
    plan = _plan(store, cfg, parts, dim, nlist, index_dir)
    seconds["layout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    nodes_url = join(graph_dir, NODES)
    if not store.exists(nodes_url):
        write_nodes(store, nodes_url, parts)
    seconds["nodes"] = time.perf_counter() - t0

    init_ray(cfg.ray)
    node_cpus = resources().max_node_cpus
    steps_run = []

    # 1. train on one worker, from a seeded sample gathered in parallel
    if not store.exists(join(index_dir, TRAINED)) and not store.exists(join(index_dir, MERGED)):
        t0 = time.perf_counter()
        piece_refs = _gather(store, g.vector, parts, train_ids, g.parts_per_task)
        train = ray.remote(num_cpus=node_cpus)(tasks.train_task)
        ray.get(train.remote(store, index_dir, dim, g.index, nlist, g.pq_m, g.pq_bits, cfg.seed, *piece_refs))
        seconds["train"] = time.perf_counter() - t0
        steps_run.append("train")

    # 2. add: one shard per group of parts, each into its own copy of the trained index
    if not store.exists(join(index_dir, MERGED)):
        t0 = time.perf_counter()
        add = ray.remote(num_cpus=1)(tasks.add_task)
        refs = [add.remote(store, index_dir, shard, g.vector, [parts[i] for i in group])
                for shard, group in zip(plan["shards"], plan["groups"])
                if not store.exists(join(index_dir, f"{shard}.faissindex"))]
        for shard, total, _ in as_completed(refs):
            log.info("graph: %s holds %d vectors", shard, total)
        seconds["add"] = time.perf_counter() - t0
        steps_run.append("add")

        # 3. merge into one index with on-disk inverted lists
        t0 = time.perf_counter()
        merge = ray.remote(num_cpus=node_cpus)(tasks.merge_task)
        ray.get(merge.remote(store, index_dir, plan["shards"], n_nodes))
        seconds["merge"] = time.perf_counter() - t0
        steps_run.append("merge")
    for shard in plan["shards"]:  # the merged index replaces them (also after a kill right after merging)
        store.rm(join(index_dir, f"{shard}.faissindex"))

    # 4. search k+1 per node; one committed graph part per embedding part
    t0 = time.perf_counter()
    missing = [p for p in parts if not store.exists(join(graph_dir, f"{p.name}.parquet"))]
    search = ray.remote(num_cpus=1)(tasks.search_task)
    refs = [search.remote(store, index_dir, graph_dir, g.vector, g.k, g.nprobe, chunk)
            for chunk in _chunks(missing, g.parts_per_task)]
    searched_rows = 0
    for done in as_completed(refs):
        searched_rows += sum(rows for _, rows, _ in done)
    seconds["search"] = time.perf_counter() - t0

    # 5. recall@k on a seeded sample against exact search over all parts
    t0 = time.perf_counter()
    recall, sample_size = _measure_recall(store, cfg, parts, graph_dir, n_nodes)
    seconds["recall"] = time.perf_counter() - t0
    clear_node_cache(tasks.cache_namespace(index_dir))  # this node's copy of the merged index (remote workdirs)

    index_size = store.size(join(index_dir, MERGED)) + store.size(join(index_dir, MERGED_DATA))
    stats = {
        "n_nodes": n_nodes,
        "k": g.k,
        "vector": g.vector,
        "dim": dim,
        "index": g.index,
        "nlist": nlist,
        "nprobe": min(g.nprobe, nlist),
        "train_size": int(len(train_ids)),
        "parts": len(parts),
        "shards": len(plan["shards"]),
        "parts_searched": len(missing),
        "parts_reused": len(parts) - len(missing),
        "rows_searched": searched_rows,
        "steps_run": steps_run,
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
        "recall_at_k": recall,
        "recall_sample": sample_size,
        "index_bytes": index_size,
        "float32_vector_bytes": n_nodes * dim * 4,
        "sq_distances": "squared L2 always; the select stage takes sqrt when graph.distance is 'euclidean'",
    }
    log.info("graph stage: %s", stats)
    return stats


def _measure_recall(store: Store, cfg: JobConfig, parts: list[EmbeddingPart], graph_dir: str,
                    n_nodes: int) -> tuple[float | None, int]:
    """recall@k of the written graph on `graph.recall_sample` seeded nodes, against exact search."""
    import ray

    g = cfg.graph
    sample = recall_sample_ids(n_nodes, g.recall_sample, cfg.seed)
    if len(sample) == 0:
        return None, 0
    pieces = ray.get(_gather(store, g.vector, parts, sample, g.parts_per_task))
    ids = np.concatenate([p[0] for p in pieces])
    vecs = np.concatenate([p[1] for p in pieces])
    order = np.argsort(ids)
    ids, vecs = ids[order], vecs[order]
    if not np.array_equal(ids, sample):
        raise RuntimeError("recall sample rows were not all gathered")

    exact = ray.remote(num_cpus=1)(tasks.exact_task)
    queries = ray.put(vecs)
    best_d = np.full((len(ids), g.k + 1), np.inf, np.float32)
    best_i = np.full((len(ids), g.k + 1), -1, np.int64)
    for d, i in as_completed([exact.remote(store, g.vector, g.k + 1, queries, chunk)
                              for chunk in _chunks(parts, g.parts_per_task)]):
        best_d, best_i = merge_topk(best_d, best_i, d, i, g.k + 1)
    exact_neighbors, _ = remove_self(best_i, best_d, ids, g.k)

    approx = np.full((len(ids), g.k), -1, np.int64)
    for part, rows in rows_by_part(parts, sample):
        got = read_part(store, join(graph_dir, f"{part.name}.parquet"), rows)
        if not np.array_equal(got["node"], rows + part.offset):
            raise RuntimeError(f"graph part {part.name} rows are not in node order")
        approx[np.searchsorted(ids, got["node"])] = got["neighbors"]
    return recall_at_k(approx, exact_neighbors), int(len(ids))


STAGE = Stage(name="graph", upstream="embed", settings=settings, run=run)
