"""The select stage's plan, fixed before any work: which graph parts each range task reads, which
partition owns each IVF cell, which worker hosts each partition. O(parts + cells + partitions):
the driver never holds anything per node.

* **Range groups**: consecutive graph parts (= consecutive node ranges, the graph stage writes one
  part per embedding part) read together by one shuffle task, at most ``GROUP_MAX_NODES`` nodes.
* **Partitions**: groups of whole IVF cells balanced by node count
  (:func:`pipeline.core.partition.cell_partitions` on the per-cell counts, which Ray tasks count
  from the graph parts' ``cell`` column); ``select.partitions: auto`` is
  :func:`pipeline.core.partition.auto_partitions` of N, ``partition_max_nodes``, the cluster's CPUs
  and a worker's memory.
* **Hosts**: the partition workers (:mod:`.hosts`), min(P, ``select.workers`` or the cluster's
  CPUs); partitions are dealt to them largest first onto the least loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..config import JobConfig
from ..core.partition import auto_partitions, cell_partitions, pack_largest_first
from ..core.runs import consecutive_runs
from ..formats.embeddings import EmbeddingPart, list_parts
from ..storage import Store, basename, join
from ..workdir import EMBED, GRAPH, SELECT, committed_parts, stage_dir

# Most nodes one shuffle task reads: it holds their kNN entries and records, about 1 KB per node at
# k = 10, so ~500 MB.
GROUP_MAX_NODES = 500_000
# Shuffle tasks per CPU of the cluster, so that tasks of uneven size still keep every CPU busy.
GROUPS_PER_CPU = 2


@dataclass(frozen=True)
class GraphPart:
    url: str  # graph/part-NNNNN.parquet
    embedding: EmbeddingPart  # the embedding part whose rows are its nodes

    @property
    def lo(self) -> int:
        return self.embedding.offset

    @property
    def hi(self) -> int:
        return self.embedding.offset + self.embedding.rows


@dataclass(frozen=True)
class SelectPlan:
    n_nodes: int
    parts: tuple[GraphPart, ...]
    groups: tuple[tuple[int, int], ...]  # (first part, end part) of each range group
    n_partitions: int
    cell_partition: np.ndarray = field(repr=False)  # int32 partition of each cell (-1: empty)
    partition_sizes: tuple[int, ...]
    host_of: tuple[int, ...]  # worker of each partition
    work_dir: str  # selection/_work/<plan hash>: intermediate files of this plan

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_hosts(self) -> int:
        return max(self.host_of) + 1 if self.host_of else 1

    def group_range(self, g: int) -> tuple[int, int]:
        a, b = self.groups[g]
        return self.parts[a].lo, self.parts[b - 1].hi

    @property
    def group_starts(self) -> np.ndarray:
        return np.array([self.group_range(g)[0] for g in range(self.n_groups)], np.int64)

    @property
    def direct(self) -> bool:
        """One partition: its worker reads the graph parts itself (no shuffle files)."""
        return self.n_partitions == 1

    def partitions_of(self, host: int) -> list[int]:
        return [p for p, h in enumerate(self.host_of) if h == host]


def graph_parts(store: Store, cfg: JobConfig) -> tuple[GraphPart, ...]:
    """The committed graph parts with their embedding parts, checked to pair up by name."""
    emb, _ = list_parts(store, stage_dir(cfg.workdir, EMBED))
    by_name = {p.name: p for p in emb}
    urls = committed_parts(store, stage_dir(cfg.workdir, GRAPH))
    names = [basename(u)[: -len(".parquet")] for u in urls]
    if sorted(names) != sorted(by_name):
        missing = sorted(set(by_name) - set(names))[:5]
        extra = sorted(set(names) - set(by_name))[:5]
        raise ValueError(f"the graph parts in {stage_dir(cfg.workdir, GRAPH)} do not match the embedding parts "
                         f"(no graph part for {missing}, no embedding part for {extra}): rerun with --force-from graph")
    return tuple(GraphPart(u, by_name[n]) for u, n in zip(urls, names))


def range_groups(parts: tuple[GraphPart, ...], cpus: int, max_nodes: int = GROUP_MAX_NODES) -> tuple[tuple[int, int], ...]:
    """Consecutive runs of parts of about equal node count (:func:`~pipeline.core.runs.consecutive_runs`):
    enough for every CPU twice over, none above ``max_nodes`` nodes unless one part is."""
    rows = [p.embedding.rows for p in parts]
    n = sum(rows)
    want = max(1, min(len(parts), max(GROUPS_PER_CPU * max(1, cpus), -(-n // max_nodes))))
    return tuple(consecutive_runs(rows, min(max_nodes, max(1, -(-n // want)))))


def resolve_partitions(cfg: JobConfig, n_nodes: int, cpus: int, worker_bytes: float = 0) -> int | str:
    """``select.partitions`` with ``auto`` made a number (:func:`auto_partitions`)."""
    p = cfg.select.partitions
    if p == "auto":
        return auto_partitions(n_nodes, cfg.select.partition_max_nodes, cpus, worker_bytes)
    return p


def make_plan(cfg: JobConfig, parts: tuple[GraphPart, ...], cell_counts: np.ndarray | None, partitions: int | str,
              cpus: int, workers: int | None, inputs: str = "") -> SelectPlan:
    """The plan; ``cell_counts`` (nodes per cell) is needed unless ``partitions`` is 1. Its work
    directory is keyed by everything its intermediate files depend on (``inputs``: the identity
    of other input files, such as the score file), so a resumed stage reuses only valid ones."""
    n = sum(p.embedding.rows for p in parts)
    if partitions == 1 or n == 0:
        cell_partition, n_parts = np.zeros(0 if cell_counts is None else len(cell_counts), np.int32), 1
        sizes = (n,)
    else:
        cell_partition, n_parts = cell_partitions(cell_counts, partitions)
        sizes = tuple(int(x) for x in np.bincount(cell_partition[cell_partition >= 0],
                                                  weights=cell_counts[cell_partition >= 0], minlength=n_parts))
    n_hosts = max(1, min(n_parts, int(workers) if workers else max(1, cpus)))
    host_of = tuple(int(h) for h in pack_largest_first(np.asarray(sizes, np.int64), n_hosts))
    groups = range_groups(parts, cpus)
    key = json.dumps({"parts": [p.url for p in parts], "rows": [p.embedding.rows for p in parts], "groups": groups,
                      "cells": hashlib.sha256(np.ascontiguousarray(cell_partition).tobytes()).hexdigest(),
                      "P": n_parts, "inputs": inputs}, sort_keys=True)
    work = join(stage_dir(cfg.workdir, SELECT), "_work", hashlib.sha256(key.encode()).hexdigest()[:16])
    return SelectPlan(n, parts, groups, n_parts, cell_partition, sizes, host_of, work)
