"""What a selection method is to the select stage (:class:`Selector`), and the two shapes the
baselines take: a cut of the survivors ranked by a key (:class:`CutSelector`: score top-k, random,
CCS) and a selection made in one task on every survivor's vector (:class:`OneTaskSelector`:
moderate, k-center).

A selector never touches files or Ray: its ``pick`` drives the partition workers through the
``run`` it is given (:class:`pipeline.select.picking.MethodRun`: the workers' handle, the budgets,
the stats, the rank search, the one-task runner) and leaves each partition with its run of picks
in ranking order. Its in-memory form is a pure function of :mod:`pipeline.core` that is the same
maths (same keys, same tie-breaking): ``in_memory``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np


class Cut(NamedTuple):
    """A search kind: the survivors of ``group`` (None: all) ranked by ``method``'s cut keys."""

    method: str
    group: int | None = None


class Selector(ABC):
    """A ``select.method``: ``name`` is its config value; ``uses_graph``: it needs the kNN graph's
    edges (shuffled both ways, halo scores exchanged); ``max_nodes``: the most samples it handles
    (None: any), refused at stage start above it; ``in_memory``: its pure in-memory form."""

    name: ClassVar[str]
    uses_graph: ClassVar[bool] = False
    max_nodes: ClassVar[int | None] = None
    in_memory: ClassVar[Callable[..., np.ndarray]]

    @abstractmethod
    def pick(self, run: Any) -> None:
        """Leave each partition's run of picks (ranking order) for ``run.b_max`` picks."""

    def finish(self, run: Any, last) -> None:
        """After the merge (``last``: the key of the budget's last pick): the final scores, for a
        method whose scores depend on the whole selection (D2). Baselines keep their scores."""


class CutSelector(Selector):
    """The survivors ranked by :meth:`cut_keys` (major desc, node id asc); the first ``share`` of
    each group (:meth:`shares`) are picked, then ranked by :meth:`order_keys` for the outputs."""

    @abstractmethod
    def cut_keys(self, seed: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Major keys of the survivors ``ids`` (shifted ``scores``) in the cut's ranking."""

    def order_keys(self, seed: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The picks' ranking in ``selected.parquet``: the cut's own by default."""
        return self.cut_keys(seed, ids, scores)

    def shares(self, run: Any) -> list[tuple[int | None, int]]:
        """(group, picks from it): the whole budget from one group (all survivors) by default; a
        selector with groups labels the survivors first (the workers' ``set_groups`` calls its
        ``groups(scores, params) -> (label per survivor, survivors per label)``)."""
        return [(None, run.budget)]

    def pick(self, run: Any) -> None:
        for group, share in self.shares(run):
            if share:
                kind = Cut(self.name, group)
                run.hosts.cut_picks(kind, run.rank_key(kind, int(share) - 1))
        run.hosts.rank_cut(self.name)


class OneTaskSelector(Selector):
    """Needs every survivor's embedding in one process: one Ray task (``max_nodes`` survivors at
    most: 2e6 x 768 float32 = 6 GB); the workers adopt its order."""

    max_nodes: ClassVar[int | None] = 2_000_000

    @abstractmethod
    def on_vectors(self, vectors: np.ndarray, budget: int, seed: int) -> np.ndarray:
        """Positions (rows of ``vectors``) of the picks, in ranking order."""

    def pick(self, run: Any) -> None:
        run.in_one_task(self)


__all__ = ["Cut", "CutSelector", "OneTaskSelector", "Selector"]
