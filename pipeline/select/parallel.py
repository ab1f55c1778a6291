"""The select stage's Ray fan-out: the forward pass by node ranges and the per-partition greedies
as Ray tasks (:class:`RayExecutor`), with exactly the in-process arithmetic, so the result is
identical whichever executor runs it."""

from __future__ import annotations

import numpy as np

from ..core import d2
from ..core.coreset import reverse_jobs
from ..core.partition import pack_jobs
from ..runtime import resources

# Nodes per forward-pass Ray task (a contiguous node range of the CSR).
FORWARD_RANGE_NODES = 2_000_000
# Reverse-greedy tasks per CPU of the cluster (partitions are packed into tasks by size).
REVERSE_TASKS_PER_CPU = 2


def _forward_range(graph, lo, hi, scores, prev, gamma):
    return lo, d2.forward_rows(graph, lo, hi, scores[lo:hi], prev, gamma)


class RayExecutor:
    def __init__(self, range_nodes: int | None = None):
        self.range_nodes = range_nodes or FORWARD_RANGE_NODES

    def forward(self, graph, scores, gamma, rounds):
        import ray

        n = graph.n_nodes
        scores = np.ascontiguousarray(scores, np.float64)
        graph_ref, scores_ref = ray.put(graph), ray.put(scores)
        task = ray.remote(num_cpus=1)(_forward_range)
        prev = scores
        for _ in range(rounds):
            prev_ref = scores_ref if prev is scores else ray.put(prev)
            refs = [task.remote(graph_ref, lo, min(n, lo + self.range_nodes), scores_ref, prev_ref, gamma)
                    for lo in range(0, n, self.range_nodes)]
            out = np.empty(n, np.float64)
            for lo, values in ray.get(refs):  # placed by range start, whatever the completion order
                out[lo:lo + len(values)] = values
            prev = out
        return prev

    def reverse(self, graph, forward, jobs, gamma):
        import ray

        task = ray.remote(num_cpus=1)(reverse_jobs)
        graph_ref, forward_ref = ray.put(graph), ray.put(forward)
        groups = pack_jobs([len(j[1]) for j in jobs], int(resources().cpus or 1) * REVERSE_TASKS_PER_CPU)
        refs = [task.remote(graph_ref, forward_ref, [jobs[i] for i in group], gamma) for group in groups]
        return [r for batch in ray.get(refs) for r in batch]
