"""The select stage: D2 Pruning (or a baseline) over the committed kNN graph.

Reads ``WORKDIR/graph`` (nodes.parquet + part-*.parquet) and the importance scores, and writes
``WORKDIR/selection/selected.parquet`` and ``WORKDIR/selection/subset.npy``.

Steps (spec sections in brackets):

1. scores: the ``select.score`` column of the embedding parts (``clip_score`` by default; any
   numeric column), or of ``select.score_file`` joined by uid; every node must have one.
2. pre-filter [§1]: drop the ``round(beta*N)`` lowest scores; the budget ``B`` is computed from the
   full ``N``. Dropped nodes leave the graph (induced subgraph on the survivors).
3. shift to non-negative [§3-4]: ``select.score_offset`` or ``-min``; recorded in the stats.
4. distances: the graph stores squared L2; ``graph.distance: euclidean`` takes the square root.
5. forward pass [§3] over every edge among the survivors: in-process for small graphs, otherwise
   split by node ranges over Ray tasks (same arithmetic, same summation order, same result).
6. partitions [§7]: one per IVF cell (``partitions: cells``), or ``partitions: P`` balanced
   partitions made by greedy bin-packing of whole cells (largest cell first, into the lightest
   partition; ties by id), so most kNN edges stay inside a partition. ``partitions: 1`` is the
   exact global greedy.
7. budgets per partition [§6] (``selectors.balanced_budgets``), reverse greedy [§4] per partition
   on its induced subgraph, in parallel Ray tasks; gathered by partition id, never by completion.
8. global rank order of a partitioned run: each partition's greedy picks nodes in non-increasing
   order of their score at pick time (scores only ever decrease), so the k-way merge of the
   partitions by that score (``final_score`` of a selected node; ties by partition id, then the
   partition's own order) is the order a global greedy would follow if no edge crossed partitions.
   ``partitions: 1`` keeps the greedy's own order.

Baselines (``select.method``) see the same survivors of the pre-filter and the same budget ``B``
(so CCS's own hard cut is this pre-filter: the lowest scores, where noise sits for a quality
score such as CLIP score). For baselines ``forward_score`` and ``final_score`` both hold the
shifted score and ``partition`` is -1 (no partitioning); CCS's ids come in id order (it has none).

``subset.npy`` is what DataComp's resharder reads with ``--subset_file``: a 1-D numpy structured
array of dtype ``u8,u8`` (two little-endian uint64 fields: the upper and lower 64 bits of the
128-bit hex uid), sorted ascending (the resharder binary-searches it), saved with ``np.save``.
Only hex uids of at most 32 digits (DataComp's and our md5 default) can be written there; when a
selected uid is not hex, ``subset.npy`` is not written and the stats say why, naming examples
(``selected.parquet`` stays the complete record).
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
from typing import Any

import numba
import numpy as np

from . import workdir
from .config import ConfigError, JobConfig
from .storage import Store, fixed_list_to_numpy, join

log = logging.getLogger(__name__)

# Below this many nodes the forward pass and the per-partition reverse greedy run in the driver
# process: for small graphs shipping arrays to Ray workers costs more than the O(N·k) work itself.
RAY_MIN_NODES = 200_000
# Nodes per forward-pass Ray task (a contiguous node range of the CSR).
FORWARD_RANGE_NODES = 2_000_000
# Reverse-greedy tasks per CPU of the cluster (partitions are packed into tasks by size).
REVERSE_TASKS_PER_CPU = 2

SELECTED = "selected.parquet"
SUBSET = "subset.npy"
DATACOMP_UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])  # == np.dtype("u8,u8") on x86/ARM
_HEX_UID = re.compile(r"^[0-9a-fA-F]{1,32}$")


# ================================================================================================
# Pure helpers (numpy in, numpy out)
# ================================================================================================

def check_select_settings(cfg: JobConfig) -> None:
    """Settings that are valid one by one but not together: a ConfigError naming them."""
    s = cfg.select
    if s.beta > s.prune_rate + 1e-12:
        raise ConfigError(
            f"select.beta={s.beta} drops more samples than select.prune_rate={s.prune_rate} allows: the "
            f"budget round((1-prune_rate)*N) is computed from the full pool, so beta must be <= prune_rate"
        )


def pack_largest_first(sizes: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin (0..n_bins-1, int32) of every item: largest item first (ties: lowest item index), each
    into the bin holding the least so far (ties: lowest bin id). Deterministic."""
    import heapq

    sizes = np.asarray(sizes, np.int64)
    bins = np.empty(len(sizes), np.int32)
    heap = [(0, b) for b in range(n_bins)]
    for item in np.lexsort((np.arange(len(sizes)), -sizes)):
        load, b = heapq.heappop(heap)
        bins[item] = b
        heapq.heappush(heap, (load + int(sizes[item]), b))
    return bins


def build_partitions(cells: np.ndarray, partitions: int | str,
                     max_nodes: int | None = None) -> tuple[np.ndarray, int]:
    """Partition label (0..P-1, int32) of every node, and P.

    ``"auto"``: P = ceil(N / max_nodes), so pools the exact greedy handles in one process get the
    exact global greedy (partitioning only approximates it: pipeline_e2e.md measures the loss),
    and larger pools get as few balanced partitions as fit.
    ``"cells"``: one partition per distinct cell, numbered in increasing cell id. An integer P:
    whole cells are packed into P partitions, largest cell first, each into the partition holding
    the fewest nodes so far (ties: lowest partition id); deterministic. Asking for more partitions
    than there are non-empty cells gives one partition per cell.
    """
    cells = np.asarray(cells)
    n = cells.shape[0]
    if n == 0:
        return np.zeros(0, np.int32), 0
    if partitions == "auto":
        if not max_nodes or max_nodes < 1:
            raise ConfigError("select.partition_max_nodes must be >= 1 with partitions: auto")
        partitions = -(-n // max_nodes)
    uniq, inverse, sizes = np.unique(cells, return_inverse=True, return_counts=True)
    if partitions == "cells":
        return inverse.astype(np.int32), int(len(uniq))
    p = int(partitions)
    if p < 1:
        raise ConfigError(f"select.partitions must be 'auto', 'cells' or an integer >= 1, got {partitions!r}")
    if p >= len(uniq):
        return inverse.astype(np.int32), int(len(uniq))
    # uniq is sorted, so ties between equal-sized cells go by cell id
    return pack_largest_first(sizes, p)[inverse], p


@numba.njit(cache=True, nogil=True)
def _forward_rows_kernel(indptr, indices, distances, lo, hi, self_scores, prev, gamma):
    # Same arithmetic and summation order as d2.forward_pass's kernel, so a forward pass split
    # into node ranges gives bit-identical scores.
    out = np.empty(hi - lo, np.float64)
    for i in range(lo, hi):
        total = self_scores[i - lo]
        for e in range(indptr[i], indptr[i + 1]):
            total += math.exp(-gamma * np.float64(distances[e])) * prev[indices[e]]
        out[i - lo] = total
    return out


def forward_rows(graph, lo: int, hi: int, self_scores: np.ndarray, prev: np.ndarray, gamma: float) -> np.ndarray:
    """One forward round for nodes lo..hi-1: ``self_i + sum_j exp(-gamma d_ij) prev_j``."""
    return _forward_rows_kernel(graph.indptr, graph.indices, graph.distances, int(lo), int(hi),
                                np.ascontiguousarray(self_scores, np.float64),
                                np.ascontiguousarray(prev, np.float64), float(gamma))


def merge_partition_orders(results: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Global selection order of a partitioned run: (node ids, partition of each), merged by pick
    score descending, ties by partition id then the partition's own order (see module doc).

    ``results``: (partition id, selected ids in that partition's order, their pick scores).
    """
    if not results:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    ids = np.concatenate([r[1] for r in results]).astype(np.int64)
    scores = np.concatenate([r[2] for r in results]).astype(np.float64)
    parts = np.concatenate([np.full(len(r[1]), r[0], np.int32) for r in results])
    local = np.concatenate([np.arange(len(r[1]), dtype=np.int64) for r in results])
    order = np.lexsort((local, parts, -scores))
    return ids[order], parts[order]


def datacomp_subset(uids: list[str] | np.ndarray) -> np.ndarray:
    """uids as DataComp's resharder reads them: dtype ``u8,u8`` (upper, lower 64 bits), sorted.

    Raises ValueError naming up to five uids that are not hex strings of at most 32 digits.
    """
    uids = [str(u) for u in uids]
    bad = [u for u in uids if not _HEX_UID.match(u)]
    if bad:
        raise ValueError(
            f"{len(bad)} uids are not 128-bit hex strings (DataComp subset files hold only those), "
            f"e.g. {', '.join(repr(u) for u in bad[:5])}"
        )
    out = np.empty(len(uids), DATACOMP_UID_DTYPE)
    for i, u in enumerate(uids):
        value = int(u, 16)
        out[i] = (value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF)
    out.sort()
    return out


def subset_npy_bytes(subset: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, subset, allow_pickle=False)
    return buf.getvalue()


# ================================================================================================
# Reading the graph and the scores
# ================================================================================================

def read_graph(store: Store, cfg: JobConfig) -> dict[str, Any]:
    """nodes.parquet + the graph parts, as arrays in node order: uids, neighbors, sq_distances, cells."""
    graph_dir = workdir.stage_dir(cfg, "graph")
    nodes = store.read_parquet(join(graph_dir, "nodes.parquet"), columns=["node", "uid"])
    n = nodes.num_rows
    node_ids = nodes.column("node").to_numpy()
    if not np.array_equal(node_ids, np.arange(n)):
        raise ValueError(f"{graph_dir}/nodes.parquet: node ids are not 0..{n - 1} in order")
    uids = nodes.column("uid").to_numpy(zero_copy_only=False).astype(object)

    urls = workdir.committed_parts(store, cfg, "graph")
    neighbors = sq = cells = None
    seen = np.zeros(n, bool)
    for url in urls:
        table = store.read_parquet(url, columns=["node", "neighbors", "sq_distances", "cell"])
        part_nodes = table.column("node").to_numpy()
        nb = fixed_list_to_numpy(table.column("neighbors"), "neighbors", url)
        dd = fixed_list_to_numpy(table.column("sq_distances"), "sq_distances", url)
        if neighbors is None:
            k = nb.shape[1]
            neighbors = np.full((n, k), -1, np.int64)
            sq = np.full((n, k), np.inf, np.float32)
            cells = np.zeros(n, np.int32)
        if nb.shape[1] != neighbors.shape[1]:
            raise ValueError(f"{url}: {nb.shape[1]} neighbours per node, earlier parts {neighbors.shape[1]}")
        if part_nodes.size and (part_nodes.min() < 0 or part_nodes.max() >= n):
            raise ValueError(f"{url}: node ids outside 0..{n - 1}")
        if seen[part_nodes].any():
            raise ValueError(f"{url}: node {int(part_nodes[seen[part_nodes]][0])} appears in two graph parts")
        seen[part_nodes] = True
        neighbors[part_nodes] = nb
        sq[part_nodes] = dd
        cells[part_nodes] = table.column("cell").to_numpy()
    if neighbors is None or not seen.all():
        missing = np.flatnonzero(~seen)
        raise ValueError(
            f"{graph_dir}: {len(missing)} of {n} nodes have no graph row (e.g. nodes {missing[:5].tolist()})"
        )
    return {"uids": uids, "neighbors": neighbors, "sq_distances": sq, "cells": cells}


def _numeric(column, what: str) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_decimal(column.type)):
        raise ValueError(f"{what} must be numeric, got {column.type}")
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def read_scores(store: Store, cfg: JobConfig, uids: np.ndarray) -> tuple[np.ndarray, str]:
    """The raw ``select.score`` value of every node (float64, node order) and where it came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = cfg.select.score
    if cfg.select.score_file:
        url = cfg.select.score_file
        if not store.exists(url):
            raise FileNotFoundError(f"select.score_file {url} does not exist")
        with store.open(url, "rb") as fh:  # one open: check the schema, then read from the same file
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            for needed in ("uid", column):
                if needed not in names:
                    raise ValueError(f"select.score_file {url} has no column {needed!r} (columns: {names})")
            table = pf.read(columns=["uid", column])
        import pandas as pd

        file_uids = pd.Index(table.column("uid").to_numpy(zero_copy_only=False).astype(str))
        values = _numeric(table.column(column), f"{url} column {column!r}")
        if not file_uids.is_unique:
            dup = file_uids[file_uids.duplicated()].unique()[:5].tolist()
            raise ValueError(f"select.score_file {url}: uids appear more than once, e.g. {dup}")
        where = file_uids.get_indexer(pd.Index(uids.astype(str)))
        missing = np.flatnonzero(where < 0)
        if missing.size:
            raise ValueError(
                f"select.score_file {url} has no {column!r} for {missing.size} of {len(uids)} samples, "
                f"e.g. uids {[str(uids[i]) for i in missing[:5]]}"
            )
        scores, source = values[where], f"{url}:{column}"
    else:
        pieces, part_uids = [], []
        for url in workdir.committed_parts(store, cfg, "embed"):
            with store.open(url, "rb") as fh:  # one open: check the schema, then read from the same file
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                if column not in schema.names:
                    numeric = [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
                    raise ValueError(
                        f"select.score={column!r} is not a column of the embedding parts ({url}); numeric columns "
                        f"there: {numeric}; or give select.score_file"
                    )
                table = pf.read(columns=["uid", column])
            pieces.append(_numeric(table.column(column), f"{url} column {column!r}"))
            part_uids.append(table.column("uid").to_numpy(zero_copy_only=False))
        scores = np.concatenate(pieces) if pieces else np.zeros(0)
        emb_uids = np.concatenate(part_uids).astype(object) if part_uids else np.zeros(0, object)
        # The graph's node order is the embedding parts' row order; check it rather than trust it
        # (a mismatch would silently give every node another sample's score).
        if len(emb_uids) != len(uids) or not np.array_equal(emb_uids, uids):
            raise ValueError(
                f"the embedding parts in {workdir.stage_dir(cfg, 'embed')} do not match the graph's nodes.parquet "
                f"({len(emb_uids)} vs {len(uids)} rows or another order): rerun with --force-from graph"
            )
        source = f"embeddings:{column}"
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} samples have a non-finite {column!r} score ({source}), "
            f"e.g. uids {[str(uids[i]) for i in np.flatnonzero(bad)[:5]]}"
        )
    return scores.astype(np.float64), source


def read_embeddings(store: Store, cfg: JobConfig, rows: np.ndarray) -> np.ndarray:
    """Graph vectors (L2-normalised, per ``graph.vector``) of the given node ids, for moderate/kcenter."""
    from .graph import list_embedding_parts, read_part_vectors

    parts, dim = list_embedding_parts(store, cfg)
    out = np.empty((len(rows), dim), np.float32)
    rows = np.asarray(rows, np.int64)
    for part in parts:
        lo, hi = np.searchsorted(rows, [part.offset, part.offset + part.rows])
        if hi > lo:
            out[lo:hi] = read_part_vectors(store, part.url, cfg.graph.vector, rows[lo:hi] - part.offset)
    return out


# ================================================================================================
# Forward and reverse passes, in process or over Ray
# ================================================================================================

def _forward_range_task(graph, lo, hi, scores, prev, gamma):
    return lo, forward_rows(graph, lo, hi, scores[lo:hi], prev, gamma)


def forward_pass_distributed(graph, scores: np.ndarray, gamma: float, rounds: int,
                             range_nodes: int = FORWARD_RANGE_NODES) -> np.ndarray:
    """The forward pass split into node ranges over Ray tasks (one set of tasks per round)."""
    import ray

    n = graph.n_nodes
    scores = np.ascontiguousarray(scores, np.float64)
    graph_ref = ray.put(graph)
    scores_ref = ray.put(scores)
    task = ray.remote(num_cpus=1)(_forward_range_task)
    prev = scores
    for _ in range(rounds):
        prev_ref = scores_ref if prev is scores else ray.put(prev)
        refs = [task.remote(graph_ref, lo, min(n, lo + range_nodes), scores_ref, prev_ref, gamma)
                for lo in range(0, n, range_nodes)]
        out = np.empty(n, np.float64)
        for lo, values in ray.get(refs):  # placed by range start, whatever the completion order
            out[lo:lo + len(values)] = values
        prev = out
    return prev


def _reverse_task(graph, forward, jobs, gamma):
    from .d2 import reverse_select, subgraph

    results = []
    for pid, ids, budget in jobs:
        sub = subgraph(graph, ids)
        sel = reverse_select(sub, forward[ids], int(budget), gamma)
        results.append((pid, ids[sel.order], sel.final_scores[sel.order]))
    return results


def _pack_jobs(jobs: list[tuple[int, np.ndarray, int]], n_tasks: int) -> list[list]:
    """Partitions into at most n_tasks groups of similar node totals (largest first into the lightest)."""
    n_tasks = max(1, min(n_tasks, len(jobs)))
    jobs = sorted(jobs, key=lambda j: j[0])  # ties between equal sizes go by partition id
    task_of = pack_largest_first(np.array([len(j[1]) for j in jobs], np.int64), n_tasks)
    groups: list[list] = [[] for _ in range(n_tasks)]
    for job, t in zip(jobs, task_of):
        groups[t].append(job)
    return [g for g in groups if g]


def reverse_partitions(graph, forward: np.ndarray, labels: np.ndarray, budgets: np.ndarray, gamma: float,
                       use_ray: bool) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Reverse greedy in every partition on its induced subgraph; results sorted by partition id."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(budgets) + 1))
    jobs = [(pid, np.sort(order[bounds[pid]:bounds[pid + 1]]).astype(np.int64), int(budgets[pid]))
            for pid in range(len(budgets)) if budgets[pid] > 0]
    if not use_ray:
        results = _reverse_task(graph, forward, jobs, gamma)
    else:
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        task = ray.remote(num_cpus=1)(_reverse_task)
        graph_ref, forward_ref = ray.put(graph), ray.put(forward)
        refs = [task.remote(graph_ref, forward_ref, group, gamma)
                for group in _pack_jobs(jobs, cpus * REVERSE_TASKS_PER_CPU)]
        results = [r for batch in ray.get(refs) for r in batch]
    # gathered by partition id, never by completion order
    return sorted(results, key=lambda r: r[0])


# ================================================================================================
# The stage
# ================================================================================================

def _baseline(cfg: JobConfig, store: Store, method: str, kept: np.ndarray, scores: np.ndarray,
              budget: int) -> np.ndarray:
    """Selected node ids (global) of a baseline, in its selection order where it has one."""
    from . import selectors

    s = cfg.select
    if method == "random":
        return kept[np.asarray(selectors.random_select(len(kept), budget, cfg.seed), np.int64)]
    if method == "score_topk":
        return kept[np.asarray(selectors.score_topk(scores, budget), np.int64)]
    if method == "ccs":  # its hard cut is the pre-filter above (beta=0 here)
        return kept[np.asarray(selectors.ccs_select(scores, budget, 0.0, s.ccs_strata, cfg.seed), np.int64)]
    vectors = read_embeddings(store, cfg, kept)
    if method == "moderate":
        return kept[np.asarray(selectors.moderate_select(vectors, budget), np.int64)]
    if method == "kcenter":
        return kept[np.asarray(selectors.kcenter_greedy(vectors, budget, cfg.seed), np.int64)]
    raise ConfigError(f"select.method {method!r} is not known")


def select(cfg: JobConfig, store: Store, use_ray: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Compute the selection (no writing): (pyarrow table of selected.parquet, stats).

    ``use_ray``: None = Ray tasks when N >= RAY_MIN_NODES; True/False force either path (the
    result is the same).
    """
    import pandas as pd
    import pyarrow as pa

    from . import d2

    check_select_settings(cfg)
    s = cfg.select
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    g = read_graph(store, cfg)
    uids = g["uids"]
    n = len(uids)
    index = pd.Index(uids)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"the graph's nodes.parquet lists uids more than once, e.g. {dup}: uids must be unique")
    raw_scores, source = read_scores(store, cfg, uids)
    seconds["read"] = time.perf_counter() - t0
    if use_ray is None:
        use_ray = n >= RAY_MIN_NODES
    if use_ray:
        from .runtime import init_ray

        init_ray(cfg.ray)

    budget = d2.budget_for(n, s.prune_rate)
    # 1. pre-filter
    if s.beta > 0:
        keep_mask = d2.prefilter_mask(raw_scores, s.beta)
    else:
        keep_mask = np.ones(n, bool)
    kept = np.flatnonzero(keep_mask).astype(np.int64)
    if budget > len(kept):
        raise ConfigError(f"select.beta={s.beta} leaves {len(kept)} samples, fewer than the budget {budget}")
    # 2. shift to non-negative, over the survivors (the pre-filtered minimum is what D2 sees)
    scores, offset = d2.shift_nonnegative(raw_scores[kept], s.score_offset)
    stats: dict[str, Any] = {
        "method": s.method, "n_nodes": n, "budget": budget, "prune_rate": s.prune_rate,
        "score_source": source, "score_offset": offset,
        "score_min": float(raw_scores.min()) if n else None, "score_max": float(raw_scores.max()) if n else None,
        "prefilter_beta": s.beta,
        "prefiltered": int(n - len(kept)),
        "distance": cfg.graph.distance, "gamma_forward": s.gamma_forward, "gamma_reverse": s.gamma_reverse,
        "forward_rounds": s.forward_rounds, "used_ray": bool(use_ray),
    }

    partition = None
    forward = final = None
    if s.method == "d2":
        t0 = time.perf_counter()
        distances = g["sq_distances"]
        if cfg.graph.distance == "euclidean":
            distances = np.sqrt(distances)  # inf (missing) stays inf and is ignored with its -1 id
        full = d2.symmetrize_knn(g["neighbors"], distances)
        graph = d2.subgraph(full, kept) if len(kept) < n else full
        del full
        seconds["graph"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if use_ray and graph.n_nodes > 0:
            forward = forward_pass_distributed(graph, scores, s.gamma_forward, s.forward_rounds)
        else:
            forward = d2.forward_pass(graph, scores, s.gamma_forward, s.forward_rounds)
        seconds["forward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        labels, n_parts = build_partitions(g["cells"][kept], s.partitions, s.partition_max_nodes)
        sizes = np.bincount(labels, minlength=n_parts) if n_parts else np.zeros(0, np.int64)
        if n_parts <= 1:
            sel = d2.reverse_select(graph, forward, budget, s.gamma_reverse)
            local_order = sel.order
            final = sel.final_scores
            partition = np.zeros(len(local_order), np.int32)
        else:
            from .selectors import balanced_budgets

            budgets = np.asarray(balanced_budgets(sizes, budget, mode=s.budget_mode, min_whole=cfg.graph.k),
                                 np.int64)
            if budgets.sum() != budget:
                raise RuntimeError(f"partition budgets sum to {int(budgets.sum())}, not the budget {budget}")
            results = reverse_partitions(graph, forward, labels, budgets, s.gamma_reverse, use_ray)
            local_order, partition = merge_partition_orders(results)
            final = np.zeros(graph.n_nodes)
            for _, ids, picked in results:
                final[ids] = picked
        seconds["reverse"] = time.perf_counter() - t0
        stats.update({
            "partitions": int(max(n_parts, 1)),
            "partitions_requested": s.partitions,
            "partition_sizes": {"min": int(sizes.min()) if n_parts else 0,
                                "median": float(np.median(sizes)) if n_parts else 0.0,
                                "max": int(sizes.max()) if n_parts else 0},
            "budget_mode": s.budget_mode,
            "graph_edges": int(graph.n_edges),
            "cross_partition_edge_fraction": float(d2.cross_edge_fraction(graph, labels)) if n_parts > 1 else 0.0,
            "rank_order": "greedy order" if n_parts <= 1 else
            "partitions merged by pick score (desc), ties by partition id then partition order",
        })
        # 3. the partitioned approximation against the exact global greedy on the same graph
        if n_parts <= 1:
            stats["overlap_with_exact"] = 1.0
        elif graph.n_nodes <= cfg.select.exact_check_max_n:
            t0 = time.perf_counter()
            exact = d2.reverse_select(graph, forward, budget, s.gamma_reverse)
            common = np.intersect1d(exact.order, local_order).size
            stats["overlap_with_exact"] = common / budget if budget else 1.0
            seconds["exact_check"] = time.perf_counter() - t0
        else:
            stats["overlap_with_exact"] = None
            stats["overlap_skipped"] = f"{graph.n_nodes} nodes > select.exact_check_max_n={s.exact_check_max_n}"
        selected = kept[local_order]
        forward_sel = forward[local_order]
        final_sel = final[local_order]
    else:
        t0 = time.perf_counter()
        selected = _baseline(cfg, store, s.method, kept, scores, budget)
        seconds["baseline"] = time.perf_counter() - t0
        if len(selected) != budget or len(np.unique(selected)) != len(selected):
            raise RuntimeError(f"{s.method} selected {len(selected)} ({len(np.unique(selected))} distinct), "
                               f"budget {budget}")
        forward_sel = final_sel = raw_scores[selected] + offset
        partition = np.full(len(selected), -1, np.int32)

    table = pa.table({
        "uid": pa.array(uids[selected].astype(str) if len(selected) else np.zeros(0, str), pa.string()),
        "rank": pa.array(np.arange(len(selected), dtype=np.int64)),
        "forward_score": pa.array(np.asarray(forward_sel, np.float64)),
        "final_score": pa.array(np.asarray(final_sel, np.float64)),
        "partition": pa.array(np.asarray(partition, np.int32)),
    })
    stats["selected"] = int(len(selected))
    stats["pruned"] = int(n - len(selected) - stats["prefiltered"])
    stats["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return table, stats


def run_select_stage(cfg: JobConfig, store: Store) -> dict[str, Any]:
    """Select the coreset from the committed graph; commit selected.parquet + subset.npy."""
    sel_dir = workdir.stage_dir(cfg, "select")
    if workdir.is_committed(store, cfg, "select"):
        log.info("select stage already committed in %s", sel_dir)
        return store.read_json(join(sel_dir, "_stats.json"))
    if not workdir.is_committed(store, cfg, "graph"):
        raise RuntimeError(f"the select stage needs the committed graph stage: no {workdir.SUCCESS} in "
                           f"{workdir.stage_dir(cfg, 'graph')}")
    workdir.claim_stage_dir(store, cfg, "select")
    started = time.perf_counter()
    table, stats = select(cfg, store)

    # both files are whole-file atomic writes; the stage is committed only after both
    store.write_parquet(join(sel_dir, SELECTED), table)
    try:
        subset = datacomp_subset(table.column("uid").to_pylist())
        store.write_bytes(join(sel_dir, SUBSET), subset_npy_bytes(subset))
        stats["subset_file"] = join(sel_dir, SUBSET)
    except ValueError as err:
        store.rm(join(sel_dir, SUBSET))
        stats["subset_file"] = None
        stats["subset_file_skipped"] = str(err)
        log.warning("select: subset.npy not written: %s", err)
    stats["seconds"]["total"] = round(time.perf_counter() - started, 3)
    workdir.commit_stage(store, cfg, "select", stats)
    log.info("select stage committed: %d of %d samples selected (%s)", stats["selected"], stats["n_nodes"],
             stats["method"])
    return stats
