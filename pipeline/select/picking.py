"""What a selector (:mod:`.methods`) is given to drive the partition workers: :class:`MethodRun`
(the workers' handle, the budgets, the stats, the rank search, the one-task runner)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..config import JobConfig
from ..core import coreset
from ..storage import join
from . import outputs
from .hosts import Hosts
from .methods import OneTaskSelector, selector
from .plan import SelectPlan
from .shuffle import ShuffleJob

SEARCH_POINTS = 64


def rank_key(hosts: Hosts, kind, rank: int, stats: dict) -> tuple[int, int]:
    """The key of 0-based ``rank`` in the ranking of search ``kind`` over every partition's sorted
    run (:class:`pipeline.core.coreset.RankSearch`); the runs are dropped after."""
    search = coreset.RankSearch(rank, SEARCH_POINTS)
    while not search.done:
        queries = search.samples(list(hosts.search_samples(kind, search.after, search.upto, SEARCH_POINTS).values()))
        if queries is not None:
            search.counts(sum(hosts.search_counts(kind, queries).values()))
    hosts.drop_runs(kind)
    stats["search_steps"] = stats.get("search_steps", 0) + search.steps
    return search.key


@dataclass
class MethodRun:
    """One selection over the shifted survivors (``n_kept`` of them): ``budget`` is the
    configured one, ``b_max`` the largest with the keep rates (the picks each run must rank).
    ``run_task(fn, args)`` runs one stage task that takes no CPU (the workers hold them)."""

    cfg: JobConfig
    plan: SelectPlan
    job: ShuffleJob
    hosts: Hosts
    stats: dict[str, Any]
    budget: int
    b_max: int
    n_kept: int
    run_task: Callable[..., Any]
    lap: Callable[[str], None]
    shift: int | None = None  # D2: the fixed-point shift of its reverse pass

    def rank_key(self, kind, rank: int) -> tuple[int, int]:
        return rank_key(self.hosts, kind, rank, self.stats)

    def in_one_task(self, chosen: OneTaskSelector) -> None:
        """Every survivor's vector in one task, ``chosen.on_vectors`` there; the workers adopt
        its order (``chosen.max_nodes`` is checked at stage start)."""
        template = join(self.plan.work_dir, "survivors-{:05d}.col")
        self.hosts.survivors_file(template)
        url = join(self.plan.work_dir, "single-run.col")
        self.run_task(one_task_picks, (self.job, self.cfg.graph.vector, chosen.name, self.budget, self.cfg.seed,
                                       [template.format(p) for p in range(self.plan.n_partitions)], url))
        self.hosts.adopt_picks(url)


def one_task_picks(job: ShuffleJob, vector: str, method: str, budget: int, seed: int, survivor_urls: list[str],
                   url: str) -> int:
    """A one-task selector on every survivor's graph vector: its order as a run the workers adopt."""
    from ..formats.embeddings import read_vectors_at
    from ..formats.shuffle import read_buckets

    got = read_buckets(job.store, survivor_urls, 0, ["node", "owner"])
    order = np.argsort(got["node"], kind="stable")
    nodes, owners = got["node"][order], got["owner"][order]
    vectors = read_vectors_at(job.store, [p.embedding for p in job.plan.parts], vector, nodes)
    picked = selector(method).on_vectors(vectors, budget, seed)
    outputs.write_single_run(job.store, url, nodes[picked], owners[picked])
    return int(picked.size)


__all__ = ["MethodRun", "SEARCH_POINTS", "one_task_picks", "rank_key"]
