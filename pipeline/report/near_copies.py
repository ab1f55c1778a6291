"""The pairs of the report's "dropped as near-copy of …" gallery: pruned samples next to the
selected sample that suppressed them most (``blame_node`` of ``selection/nodes/part-*.parquet``),
the closest pairs in the kNN graph first.

The distance of a pair is on a graph edge (``graph/part-NNNNN.parquet``): in the pruned node's row
when the blame node is among its neighbours, else in the blame node's row (the graph D2 runs on is
symmetrised, so the edge may exist only in that direction).

Memory is bounded by one graph part and one batch per nodes file, whatever the pool: the nodes
files are each in node order and the graph parts cover consecutive node ranges, so one pass merges
them part by part and keeps only a heap of the best `n` pairs. A pair whose edge is only in the
blame node's row (a row already passed, or not reached yet) waits in a second, capped heap keyed by
a lower bound of its distance (its pruned node's farthest listed neighbour: the blame node is not
closer, or it would be listed); a second pass reads only the graph rows those need. Pairs the cap
drops are never closer than that bound; when the bound is below the gallery's farthest pair the
result may miss a closer pair, and the result says so (`exact`).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

import numpy as np

from ..formats.embeddings import EmbeddingPart
from ..formats.graph import read_part
from ..formats.selection import iter_node_batches, node_part_urls
from ..storage import Store, join

log = logging.getLogger(__name__)

GALLERY_PAIRS = 12
PENDING_CAP = 4096  # pairs waiting for the blame node's graph row (32 bytes each)


@dataclass(frozen=True)
class NearCopy:
    pruned: int  # node ids
    kept: int
    sq_distance: float

    @property
    def distance(self) -> float:
        return math.sqrt(max(self.sq_distance, 0.0))


@dataclass
class NearCopies:
    pairs: list[NearCopy]  # ascending distance (ties: lower pruned node first)
    exact: bool  # False when capped waiting pairs might have been closer than the farthest shown
    unmatched: int  # pairs whose edge is in neither row (none in a consistent workdir)


class _NodeCursor:
    """Reads one nodes file forward in node order, handing out its rows below a node id."""

    def __init__(self, store: Store, url: str):
        self.url = url
        self._batches = iter_node_batches(store, url, ["node", "blame_node"])
        self._node = np.zeros(0, np.int64)
        self._blame = np.zeros(0, np.int64)
        self._last = -1

    def take_below(self, hi: int) -> tuple[np.ndarray, np.ndarray]:
        nodes, blames = [], []
        while True:
            if not len(self._node):
                batch = next(self._batches, None)
                if batch is None:
                    break
                node = batch["node"].astype(np.int64)
                if len(node) and (node[0] <= self._last or (np.diff(node) <= 0).any()):
                    raise ValueError(f"{self.url}: nodes are not in ascending order")
                self._node, self._blame = node, batch["blame_node"].astype(np.int64)
                continue
            cut = int(np.searchsorted(self._node, hi))
            nodes.append(self._node[:cut])
            blames.append(self._blame[:cut])
            if cut:
                self._last = int(self._node[cut - 1])
            self._node, self._blame = self._node[cut:], self._blame[cut:]
            if len(self._node):  # the rest is at or above hi
                break
        if not nodes:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(nodes), np.concatenate(blames)


class _Best:
    """The `n` closest pairs seen so far (a max-heap on (distance, pruned node))."""

    def __init__(self, n: int):
        self.n = n
        self._heap: list[tuple[float, int, int]] = []  # (-sq, -pruned, kept)

    @property
    def threshold(self) -> float:
        """A pair must be closer than this to get in (inf until there are n)."""
        return -self._heap[0][0] if len(self._heap) == self.n else math.inf

    def push(self, sq: float, pruned: int, kept: int) -> None:
        item = (-sq, -pruned, kept)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:  # closer, or as close with a lower pruned id
            heapq.heapreplace(self._heap, item)

    def pairs(self) -> list[NearCopy]:
        return sorted((NearCopy(-p, k, -s) for s, p, k in self._heap), key=lambda c: (c.sq_distance, c.pruned))


def _rows_of(graph: dict[str, np.ndarray], nodes: np.ndarray, url: str) -> np.ndarray:
    """Row positions of `nodes` in a graph part (ValueError naming the part if one is missing)."""
    order = np.argsort(graph["node"], kind="stable")
    sorted_nodes = graph["node"][order]
    pos = np.minimum(np.searchsorted(sorted_nodes, nodes), max(len(order) - 1, 0))
    if not len(order) or (sorted_nodes[pos] != nodes).any():
        raise ValueError(f"{url} lacks the graph rows of some of its nodes")
    return order[pos]


def _edge(graph, rows: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, whether `other` is among its neighbours and the squared distance to it."""
    hit = graph["neighbors"][rows] == other[:, None]
    found = hit.any(axis=1)
    sq = graph["sq_distances"][rows, np.argmax(hit, axis=1)].astype(np.float64)
    return found, sq


def find_near_copies(store: Store, selection_dir: str, graph_dir: str, parts: list[EmbeddingPart],
                     n: int = GALLERY_PAIRS, pending_cap: int = PENDING_CAP) -> NearCopies | None:
    """The `n` (pruned, blame) pairs closest in the graph (module docstring); None when the
    selection has no nodes files (older workdirs). `parts`: the embedding parts, whose names and
    node ranges the graph parts share."""
    urls = node_part_urls(store, selection_dir)
    if not urls:
        return None
    cursors = [_NodeCursor(store, url) for url in urls]
    best = _Best(n)
    pending: list[tuple[float, int, int]] = []  # max-heap on the lower bound: (-bound, pruned, blame)
    dropped_bound = math.inf
    for part in parts:
        taken = [c.take_below(part.offset + part.rows) for c in cursors]
        nodes = np.concatenate([t[0] for t in taken])
        blames = np.concatenate([t[1] for t in taken])
        mine = blames >= 0
        nodes, blames = nodes[mine], blames[mine]
        if not len(nodes):
            continue
        url = join(graph_dir, part.name + ".parquet")
        graph = read_part(store, url)
        rows = _rows_of(graph, nodes, url)
        found, sq = _edge(graph, rows, blames)
        # push only this part's n closest found pairs: no pair beyond them can make the gallery
        idx = np.flatnonzero(found)
        if len(idx) > n:
            idx = idx[np.lexsort((nodes[idx], sq[idx]))[:n]]
        for i in idx.tolist():
            best.push(float(sq[i]), int(nodes[i]), int(blames[i]))
        # the blame node is not in the pruned node's list, so it is at least as far as every listed one
        far = np.where(np.isfinite(graph["sq_distances"][rows]), graph["sq_distances"][rows], -np.inf).max(axis=1)
        for i in np.flatnonzero(~found).tolist():
            bound = max(float(far[i]), 0.0)
            if bound >= best.threshold:
                continue
            heapq.heappush(pending, (-bound, int(nodes[i]), int(blames[i])))
            if len(pending) > pending_cap:
                dropped_bound = min(dropped_bound, -heapq.heappop(pending)[0])
    for cursor in cursors:  # every nodes file must be used up: nodes beyond the graph are an error
        rest, _ = cursor.take_below(np.iinfo(np.int64).max)
        if len(rest):
            raise ValueError(f"{cursor.url} has node {int(rest[0])}, beyond the embedding parts")

    # second pass: the waiting pairs' edges from the blame nodes' rows, part by part
    unmatched = 0
    waiting = [(p, b) for bound, p, b in pending if -bound < best.threshold]
    if waiting:
        starts = np.array([p.offset for p in parts], np.int64)
        pruned = np.array([w[0] for w in waiting], np.int64)
        blame = np.array([w[1] for w in waiting], np.int64)
        where = np.searchsorted(starts, blame, side="right") - 1
        for idx in np.unique(where).tolist():
            sel = where == idx
            url = join(graph_dir, parts[idx].name + ".parquet")
            graph = read_part(store, url)
            found, sq = _edge(graph, _rows_of(graph, blame[sel], url), pruned[sel])
            unmatched += int((~found).sum())
            for p, b, s in zip(pruned[sel][found].tolist(), blame[sel][found].tolist(), sq[found].tolist()):
                best.push(float(s), p, b)
    pairs = best.pairs()
    exact = not (pairs and dropped_bound < pairs[-1].sq_distance) and not (len(pairs) < n and dropped_bound < math.inf)
    if unmatched:
        log.warning("report: %d pruned samples' blame node is not their graph neighbour either way", unmatched)
    return NearCopies(pairs, exact, unmatched)
