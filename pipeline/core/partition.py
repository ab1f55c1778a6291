"""Partitions of the dataset graph built from IVF cells (spec section 7), and packing by size.

Pure numpy. A partition is a group of whole IVF cells (most kNN edges stay inside a cell), balanced
by node count; the select stage runs one greedy per partition.
"""

from __future__ import annotations

import heapq

import numpy as np


def pack_largest_first(sizes: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin (0..n_bins-1, int32) of every item: largest item first (ties: lowest item index), each
    into the bin holding the least so far (ties: lowest bin id). Deterministic."""
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
            raise ValueError(f"partitions='auto' needs max_nodes >= 1, got {max_nodes!r}")
        partitions = -(-n // max_nodes)
    uniq, inverse, sizes = np.unique(cells, return_inverse=True, return_counts=True)
    if partitions == "cells":
        return inverse.astype(np.int32), int(len(uniq))
    p = int(partitions)
    if p < 1:
        raise ValueError(f"partitions must be 'auto', 'cells' or an integer >= 1, got {partitions!r}")
    if p >= len(uniq):
        return inverse.astype(np.int32), int(len(uniq))
    # uniq is sorted, so ties between equal-sized cells go by cell id
    return pack_largest_first(sizes, p)[inverse], p


def merge_partition_orders(results: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Global selection order of independently selected partitions: (node ids, partition of
    each), merged by pick score descending, ties by partition id then the partition's own order.

    Each partition's greedy picks nodes in non-increasing order of their score at pick time, so
    this k-way merge is the order a global greedy would follow if no edge crossed partitions.
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


def pack_jobs(sizes: list[int], n_tasks: int) -> list[list[int]]:
    """Indices of jobs grouped into at most `n_tasks` groups of similar total size (largest first
    into the lightest group; ties by job index)."""
    n_tasks = max(1, min(n_tasks, len(sizes)))
    task_of = pack_largest_first(np.asarray(sizes, np.int64), n_tasks)
    groups: list[list[int]] = [[] for _ in range(n_tasks)]
    for job, t in enumerate(task_of):
        groups[int(t)].append(job)
    return [g for g in groups if g]
