"""The select stage's one pure call: scores + kNN lists in, the selection out (spec sections in brackets).

1. pre-filter [§1]: drop the ``round(beta*N)`` lowest scores; the budget ``B`` is computed from the
   full ``N``. Dropped nodes leave the graph (induced subgraph on the survivors).
2. shift to non-negative [§3-4]: ``score_offset`` or ``-min`` over the survivors; recorded.
3. distances: the graph holds squared L2; ``distance="euclidean"`` takes the square root.
4. forward pass [§3] over every edge among the survivors.
5. partitions [§7]: one per IVF cell (``partitions="cells"``), or P balanced partitions of whole
   cells; ``1`` (and ``"auto"`` below ``partition_max_nodes``) is the exact global greedy.
6. budgets per partition [§6], reverse greedy [§4] per partition on its induced subgraph; the
   partitions' orders merged by pick score (:func:`~.partition.merge_partition_orders`).
7. a partitioned run is compared with the exact greedy on the same graph (overlap), below
   ``exact_check_max_n`` nodes.

Baselines (``method``) see the same survivors of the pre-filter and the same budget ``B`` (so
CCS's own hard cut is this pre-filter: the lowest scores, where noise sits for a quality score
such as CLIP score). For baselines ``forward_score`` and ``final_score`` both hold the shifted
score and ``partition`` is -1; CCS's ids come in id order (it has none).

The forward pass and the per-partition greedies go through an :class:`Executor` (in-process by
default; the stage passes one that fans out over Ray: the same arithmetic, the same result).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from . import d2, selectors
from .partition import build_partitions, merge_partition_orders


class Executor(Protocol):
    def forward(self, graph: d2.CSRGraph, scores: np.ndarray, gamma: float, rounds: int) -> np.ndarray: ...

    def reverse(self, graph: d2.CSRGraph, forward: np.ndarray, jobs: list[tuple[int, np.ndarray, int]],
                gamma: float) -> list[tuple[int, np.ndarray, np.ndarray]]: ...


def reverse_jobs(graph: d2.CSRGraph, forward: np.ndarray, jobs: list[tuple[int, np.ndarray, int]],
                 gamma: float) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The reverse greedy of each (partition id, sorted node ids, budget) job on its induced
    subgraph: (partition id, selected ids in pick order, their pick scores)."""
    results = []
    for pid, ids, budget in jobs:
        sel = d2.reverse_select(d2.subgraph(graph, ids), forward[ids], int(budget), gamma)
        results.append((pid, ids[sel.order], sel.final_scores[sel.order]))
    return results


class InProcess:
    """Everything in the calling process."""

    def forward(self, graph, scores, gamma, rounds):
        return d2.forward_pass(graph, scores, gamma, rounds)

    def reverse(self, graph, forward, jobs, gamma):
        return reverse_jobs(graph, forward, jobs, gamma)


@dataclass(frozen=True)
class Selected:
    nodes: np.ndarray  # int64 node ids in selection order
    forward: np.ndarray  # float64 forward score of each
    final: np.ndarray  # float64 score when picked
    partition: np.ndarray  # int32 partition that picked it (-1: baselines)
    stats: dict[str, Any]


def select_coreset(neighbors: np.ndarray, sq_distances: np.ndarray, cells: np.ndarray, raw_scores: np.ndarray,
                   select, distance: str, seed: int, k: int,
                   vectors_of: Callable[[np.ndarray], np.ndarray] | None = None,
                   executor: Executor | None = None) -> Selected:
    """The selection of ``select.method`` (module docstring). `select` is the job's select
    settings (``pipeline.config.SelectConfig``); `vectors_of(sorted node ids)` gives graph vectors
    for the embedding-based baselines (moderate, k-center)."""
    executor = executor or InProcess()
    s = select
    n = len(raw_scores)
    seconds: dict[str, float] = {}
    budget = d2.budget_for(n, s.prune_rate)
    keep_mask = d2.prefilter_mask(raw_scores, s.beta) if s.beta > 0 else np.ones(n, bool)
    kept = np.flatnonzero(keep_mask).astype(np.int64)
    if budget > len(kept):
        raise ValueError(f"select.beta={s.beta} leaves {len(kept)} samples, fewer than the budget {budget}")
    # the shift is taken over the survivors (the pre-filtered minimum is what D2 sees)
    scores, offset = d2.shift_nonnegative(raw_scores[kept], s.score_offset)
    stats: dict[str, Any] = {
        "method": s.method, "n_nodes": n, "budget": budget, "prune_rate": s.prune_rate,
        "score_offset": offset,
        "score_min": float(raw_scores.min()) if n else None, "score_max": float(raw_scores.max()) if n else None,
        "prefilter_beta": s.beta, "prefiltered": int(n - len(kept)),
        "distance": distance, "gamma_forward": s.gamma_forward, "gamma_reverse": s.gamma_reverse,
        "forward_rounds": s.forward_rounds,
    }
    if s.method != "d2":
        t0 = time.perf_counter()
        selected = _baseline(s.method, kept, scores, budget, seed, s.ccs_strata, vectors_of)
        seconds["baseline"] = time.perf_counter() - t0
        if len(selected) != budget or len(np.unique(selected)) != len(selected):
            raise RuntimeError(f"{s.method} selected {len(selected)} ({len(np.unique(selected))} distinct), "
                               f"budget {budget}")
        shifted = raw_scores[selected] + offset
        return Selected(selected, shifted, shifted, np.full(len(selected), -1, np.int32),
                        _finish(stats, selected, n, seconds))

    t0 = time.perf_counter()
    distances = np.sqrt(sq_distances) if distance == "euclidean" else sq_distances  # inf (missing) stays inf
    full = d2.symmetrize_knn(neighbors, distances)
    graph = d2.subgraph(full, kept) if len(kept) < n else full
    del full
    seconds["graph"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    forward = executor.forward(graph, scores, s.gamma_forward, s.forward_rounds) if graph.n_nodes else scores.copy()
    seconds["forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels, n_parts = build_partitions(cells[kept], s.partitions, s.partition_max_nodes)
    sizes = np.bincount(labels, minlength=n_parts) if n_parts else np.zeros(0, np.int64)
    if n_parts <= 1:
        sel = d2.reverse_select(graph, forward, budget, s.gamma_reverse)
        local_order, final = sel.order, sel.final_scores
        partition = np.zeros(len(local_order), np.int32)
    else:
        budgets = np.asarray(selectors.balanced_budgets(sizes, budget, mode=s.budget_mode, min_whole=k), np.int64)
        if budgets.sum() != budget:
            raise RuntimeError(f"partition budgets sum to {int(budgets.sum())}, not the budget {budget}")
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(n_parts + 1))
        jobs = [(pid, np.sort(order[bounds[pid]:bounds[pid + 1]]).astype(np.int64), int(budgets[pid]))
                for pid in range(n_parts) if budgets[pid] > 0]
        # gathered by partition id, never by completion order
        results = sorted(executor.reverse(graph, forward, jobs, s.gamma_reverse), key=lambda r: r[0])
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
    # the partitioned approximation against the exact global greedy on the same graph
    if n_parts <= 1:
        stats["overlap_with_exact"] = 1.0
    elif graph.n_nodes <= s.exact_check_max_n:
        t0 = time.perf_counter()
        exact = d2.reverse_select(graph, forward, budget, s.gamma_reverse)
        common = np.intersect1d(exact.order, local_order).size
        stats["overlap_with_exact"] = common / budget if budget else 1.0
        seconds["exact_check"] = time.perf_counter() - t0
    else:
        stats["overlap_with_exact"] = None
        stats["overlap_skipped"] = f"{graph.n_nodes} nodes > select.exact_check_max_n={s.exact_check_max_n}"
    selected = kept[local_order]
    return Selected(selected, forward[local_order], final[local_order], np.asarray(partition, np.int32),
                    _finish(stats, selected, n, seconds))


def _finish(stats: dict[str, Any], selected: np.ndarray, n: int, seconds: dict[str, float]) -> dict[str, Any]:
    stats["selected"] = int(len(selected))
    stats["pruned"] = int(n - len(selected) - stats["prefiltered"])
    stats["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return stats


def _baseline(method: str, kept: np.ndarray, scores: np.ndarray, budget: int, seed: int, ccs_strata: int,
              vectors_of: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """Selected node ids (global) of a baseline, in its selection order where it has one."""
    if method == "random":
        return kept[np.asarray(selectors.random_select(len(kept), budget, seed), np.int64)]
    if method == "score_topk":
        return kept[np.asarray(selectors.score_topk(scores, budget), np.int64)]
    if method == "ccs":  # its hard cut is the pre-filter above (beta=0 here)
        return kept[np.asarray(selectors.ccs_select(scores, budget, 0.0, ccs_strata, seed), np.int64)]
    if method in ("moderate", "kcenter"):
        if vectors_of is None:
            raise ValueError(f"select.method {method!r} needs the embeddings (vectors_of)")
        vectors = vectors_of(kept)
        if method == "moderate":
            return kept[np.asarray(selectors.moderate_select(vectors, budget), np.int64)]
        return kept[np.asarray(selectors.kcenter_greedy(vectors, budget, seed), np.int64)]
    raise ValueError(f"select.method {method!r} is not known")
