"""Pure pieces of the distributed select stage (docs/d2.md sections 2, 9, 10): orders, searches and merges that
need O(partitions) state in the driver and a partition's share in a worker.

Rankings. Every order the stage produces is a *ranking* of (major, minor) int64 keys: major
descending, then minor ascending (keys are unique: minor is a node id or includes one):

* D2's greedy: (q at pick, node id), the reverse pass's own priority;
* the β pre-filter and score top-k: (:func:`float_order_bits` of the score, node id), the order of
  :func:`pipeline.core.d2.prefilter_mask` and :func:`pipeline.core.selectors.score_topk`;
* random (and CCS inside a stratum): (``-random_keys``, node id).

:class:`RankSearch` finds the key of a given rank when the keys are split over sorted runs held by
workers (the pre-filter's threshold, a budget's last pick), asking each worker for counts and a few
samples per step; :func:`count_at_or_before` and :func:`run_samples` are the worker's side.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "RankSearch",
    "ccs_strata",
    "count_at_or_before",
    "float_order_bits",
    "random_keys",
    "ranking_order",
    "run_samples",
]

_LOW63 = np.int64(0x7FFF_FFFF_FFFF_FFFF)


def float_order_bits(x) -> np.ndarray:
    """int64 keys ordered exactly like the float64 values (``-0.0`` counts as ``0.0``; no NaN)."""
    v = np.asarray(x, np.float64) + 0.0  # -0.0 + 0.0 = +0.0: equal scores get equal keys
    if np.isnan(v).any():
        raise ValueError("float_order_bits: NaN has no order")
    bits = v.view(np.int64)
    return np.where(bits < 0, bits ^ _LOW63, bits)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_keys(seed: int, ids) -> np.ndarray:
    """A seeded pseudo-random int64 key in [0, 2**63) per node id (splitmix64 of the seed mixed
    with the id): the same for a node wherever it is computed, so the nodes with the smallest keys
    are a uniform random subset that any split of the pool reproduces."""
    with np.errstate(over="ignore"):
        mix = _splitmix64(np.array([int(seed) & (2**64 - 1)], np.uint64))[0]
        keys = _splitmix64(np.asarray(ids, np.int64).astype(np.uint64) ^ mix)
    return (keys >> np.uint64(1)).astype(np.int64)


def ranking_order(major, minor) -> np.ndarray:
    """Positions of the keys in ranking order (major desc, minor asc)."""
    return np.lexsort((np.asarray(minor, np.int64), ~np.asarray(major, np.int64)))  # ~x = -x-1, no overflow


@numba.njit(cache=True, nogil=True)
def _count_at_or_before(major, minor, qmaj, qmin):
    """How many keys of a ranking-sorted run are at or before each query key (binary search)."""
    n = major.shape[0]
    out = np.empty(qmaj.shape[0], np.int64)
    for i in range(qmaj.shape[0]):
        a, b = qmaj[i], qmin[i]
        lo = 0
        hi = n
        while lo < hi:
            mid = (lo + hi) >> 1
            if major[mid] > a or (major[mid] == a and minor[mid] <= b):
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo
    return out


def count_at_or_before(major, minor, keys) -> np.ndarray:
    """For each (major, minor) in ``keys`` (two arrays), the number of keys of the sorted run
    (``major``, ``minor``: ranking order) at or before it."""
    qmaj, qmin = keys
    return _count_at_or_before(np.ascontiguousarray(major, np.int64), np.ascontiguousarray(minor, np.int64),
                               np.ascontiguousarray(qmaj, np.int64), np.ascontiguousarray(qmin, np.int64))


def run_samples(major, minor, after, upto, points: int):
    """A worker's reply to one :class:`RankSearch` step for one sorted run: (number of keys
    strictly after ``after`` and at or before ``upto`` (None: open ends), and up to ``points``
    of them evenly spaced by rank, the last included; all of them when there are no more)."""
    n = len(major)
    lo = 0 if after is None else int(count_at_or_before(major, minor, ([after[0]], [after[1]]))[0])
    hi = n if upto is None else int(count_at_or_before(major, minor, ([upto[0]], [upto[1]]))[0])
    count = max(0, hi - lo)
    if count <= points:
        idx = np.arange(lo, lo + count)
    else:
        idx = lo + np.unique(-((-np.arange(1, points + 1, dtype=np.int64) * count) // points)) - 1
    return count, (np.asarray(major, np.int64)[idx], np.asarray(minor, np.int64)[idx])


class RankSearch:
    """The key of 0-based ``rank`` r in the ranking of keys split over sorted runs, found with
    O(runs × points) numbers per step (the driver's side; the workers answer with
    :func:`run_samples` and :func:`count_at_or_before`).

    Each step narrows an interval (after, upto] known to hold the answer: the workers send how
    many of their keys lie in it and ``points`` evenly spaced samples; when every worker sent all
    of its keys the answer is read off, otherwise the driver asks how many keys lie at or before
    each sample and keeps the two samples around rank r. Each step shrinks the interval by about
    ``points``, so a search over N keys takes about log(N) / log(points) steps.

    Use::

        search = RankSearch(r)
        while not search.done:
            replies = [run_samples(*run, search.after, search.upto, search.points) for run in runs]
            queries = search.samples(replies)
            if queries is not None:
                search.counts(sum(count_at_or_before(*run, queries) for run in runs))
        search.key  # (major, minor)
    """

    def __init__(self, rank: int, points: int = 64):
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = int(rank)
        self.points = int(points)
        self.after: tuple[int, int] | None = None
        self.upto: tuple[int, int] | None = None
        self.before = 0  # keys at or before `after`
        self.key: tuple[int, int] | None = None
        self.done = False
        self.steps = 0
        self._queries: tuple[np.ndarray, np.ndarray] | None = None

    def samples(self, replies) -> tuple[np.ndarray, np.ndarray] | None:
        """Take the workers' :func:`run_samples` replies; returns the keys whose counts are needed
        next, or None when the answer is known (``key``)."""
        self.steps += 1
        counts = [int(c) for c, _ in replies]
        total = sum(counts)
        want = self.rank - self.before
        if want >= total:
            raise ValueError(f"rank {self.rank} is beyond the {self.before + total} keys")
        maj = np.concatenate([s[0] for _, s in replies]) if replies else np.zeros(0, np.int64)
        mnr = np.concatenate([s[1] for _, s in replies]) if replies else np.zeros(0, np.int64)
        order = ranking_order(maj, mnr)
        if all(c == len(s[0]) for c, s in replies):  # every key of the interval is here
            i = order[want]
            self.key = (int(maj[i]), int(mnr[i]))
            self.done = True
            return None
        self._queries = (maj[order], mnr[order])
        return self._queries

    def counts(self, at_or_before) -> None:
        """Take the total count of keys at or before each query key (summed over the workers)."""
        maj, mnr = self._queries
        c = np.asarray(at_or_before, np.int64)
        hit = np.flatnonzero(c >= self.rank + 1)
        if hit.size:
            i = int(hit[0])
            if c[i] == self.rank + 1:  # the query key itself has rank r
                self.key = (int(maj[i]), int(mnr[i]))
                self.done = True
                return
            self.upto = (int(maj[i]), int(mnr[i]))
        below = np.flatnonzero(c < self.rank + 1)
        if below.size:
            j = int(below[-1])
            self.after = (int(maj[j]), int(mnr[j]))
            self.before = int(c[j])


def ccs_strata(scores, lo: float, hi: float, strata: int) -> np.ndarray:
    """CCS's stratum of each score (equal-width over [lo, hi], the maximum in the last one), as
    :func:`pipeline.core.selectors.ccs_select` computes it."""
    s = np.asarray(scores, np.float64)
    if hi > lo:
        return np.minimum(((s - lo) / (hi - lo) * strata).astype(np.int64), strata - 1)
    return np.zeros(s.shape[0], np.int64)
