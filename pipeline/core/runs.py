"""Consecutive runs of items under a weight bound: how every stage cuts ordered work into tasks
(embedding parts into graph units and select range groups, IVF lists into search groups, input
shards into precomputed shard groups). Pure Python + numpy.

The rule (one rule, so a reader learns it once): items, in order, join the run in progress unless
that run already has weight and the item would take it past ``bound``; then the item opens the
next run. So a single item heavier than the bound gets a run without other weighted items, and
zero-weight items ride with the run in progress (at the start, with the first weighted item).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def run_ids(weights: Sequence[int] | np.ndarray, bound: int) -> np.ndarray:
    """Run id (int32, 0..R-1 in item order) of each item (module docstring)."""
    out = np.empty(len(weights), np.int32)
    run, used = 0, 0
    # a Python loop: the longest input is the IVF lists (~4*sqrt(N): 1.3e5 steps at N = 10^9)
    for i, w in enumerate(np.asarray(weights, dtype=np.int64).tolist()):
        if used > 0 and used + w > bound:
            run, used = run + 1, 0
        out[i] = run
        used += w
    return out


def consecutive_runs(weights: Sequence[int] | np.ndarray, bound: int) -> list[tuple[int, int]]:
    """``[start, end)`` item ranges of the runs of :func:`run_ids` (none for no items)."""
    ids = run_ids(weights, bound)
    if not len(ids):
        return []
    edges = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]]).tolist()
    return list(zip(edges[:-1], edges[1:]))


__all__ = ["consecutive_runs", "run_ids"]
