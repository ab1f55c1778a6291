"""Coreset selectors in memory, with the same budget semantics as :mod:`pipeline.core.d2`.

Pure numpy; no Ray, no I/O. Each is the in-memory form of a ``select.method``: the select stage
runs the same maths split over partitions (:mod:`pipeline.select.methods`), with the same keys,
so a selector here and the stage pick the same set for the same candidates and seed. Every
selector:

* takes a keep budget ``B`` (an integer >= 0; ``B >= N`` keeps everything, as in D2);
* returns an int64 array of distinct sample ids: in selection order where the method has one
  (random, score top-k, k-center), otherwise sorted ascending (CCS, moderate), as stated per
  function;
* is deterministic for a fixed ``seed``. Random draws are keyed (:func:`pipeline.core.coreset.
  random_keys`: a hash of the seed and the sample id), so a draw does not depend on how the pool
  is split or ordered; k-center's first centre is ``numpy.random.default_rng(seed)``'s.

Score convention (as in D2): higher = more worth keeping (CLIP score, or a training-dynamics
difficulty such as forgetting count / EL2N / negated AUM).

``groups`` (moderate): an int label per sample (class, cluster or partition). The budget is split
over groups with :func:`balanced_budgets` and each group is selected on its own.
"""

from __future__ import annotations

import numpy as np

from .coreset import ccs_strata, float_order_bits, random_keys, ranking_order
from .d2 import check_budget as _check_budget  # one budget rule for D2 and the baselines
from .d2 import check_finite_scores as _check_scores

__all__ = [
    "balanced_budgets",
    "ccs_hard_cut",
    "ccs_select",
    "kcenter_greedy",
    "moderate_select",
    "random_rank",
    "random_select",
    "score_rank",
    "score_topk",
]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_embeddings(embeddings) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    if x.size and x.dtype.kind != "f":
        raise ValueError(f"embeddings must be floating point, got dtype {x.dtype}")
    return x


def _check_groups(groups, n: int) -> np.ndarray:
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    if g.size and g.dtype.kind not in "iu":
        raise ValueError(f"groups must be integer labels, got dtype {g.dtype}")
    return g


def _group_members(groups: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted distinct labels, member ids of each label in ascending order)."""
    order = np.argsort(groups, kind="stable")
    labels, starts = np.unique(groups[order], return_index=True)
    members = np.split(order, starts[1:]) if order.size else []
    return labels, [m.astype(np.int64) for m in members]


def _rank_desc(scores: np.ndarray) -> np.ndarray:
    """Ids by score descending, ties by id ascending (the D2 greedy's tie rule)."""
    return np.lexsort((np.arange(scores.shape[0]), -scores)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Budgets over groups (docs/d2.md#9-budgets-over-groups)
# --------------------------------------------------------------------------------------------


def balanced_budgets(group_sizes, budget: int, mode: str = "proportional", min_whole: int = 0) -> np.ndarray:
    """Split a keep budget over groups (classes or partitions), docs/d2.md#9-budgets-over-groups.

    Args:
        group_sizes: int[G] members per group (>= 0).
        budget: total keep budget; clamped to ``sum(group_sizes)``.
        mode: ``"proportional"``: each group gets ``budget * size / total`` rounded by the
            largest-remainder method (floors first, then one extra unit to the largest
            fractional parts, ties to the lower group index). ``"uniform"``: groups are visited
            from smallest to largest (ties by index) and each gets an equal share of what is
            left, ``min(size, remaining // groups_left)``, so small groups are filled whole and
            their unused share flows to the larger ones (the reference code's class mode).
        min_whole: a group with ``0 < size <= min_whole`` members is taken whole (too small to
            prune meaningfully: e.g. a partition with no more than ``k`` nodes has no kNN
            graph of its own). If those groups together exceed the budget the rule cannot hold
            with an exact budget, so it is dropped and every group is split by ``mode``.

    Returns:
        int64[G] per-group budgets with ``0 <= b_g <= size_g`` and ``sum == min(budget, total)``.
        A group whose share covers it is thereby taken whole.

    Raises:
        ValueError: negative sizes, non-integer or negative budget, unknown mode.
    """
    sizes = np.asarray(group_sizes)
    if sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D, got shape {sizes.shape}")
    if sizes.size and sizes.dtype.kind not in "iu":
        raise ValueError(f"group_sizes must be integers, got dtype {sizes.dtype}")
    sizes = sizes.astype(np.int64)
    if (sizes < 0).any():
        g = int(np.argmax(sizes < 0))
        raise ValueError(f"group_sizes[{g}] = {int(sizes[g])} is negative")
    if mode not in ("proportional", "uniform"):
        raise ValueError(f"mode must be 'proportional' or 'uniform', got {mode!r}")
    if int(min_whole) < 0:
        raise ValueError(f"min_whole must be >= 0, got {min_whole}")
    total = int(sizes.sum())
    b = _check_budget(budget, total)
    out = np.zeros(sizes.shape[0], dtype=np.int64)
    if b == 0:
        return out
    if b == total:
        return sizes.copy()

    free = sizes > 0
    small = (sizes > 0) & (sizes <= int(min_whole))
    if small.any() and int(sizes[small].sum()) <= b:
        out[small] = sizes[small]
        free &= ~small
    remaining = b - int(out.sum())
    ids = np.nonzero(free)[0]
    if mode == "proportional":
        sub = [int(x) for x in sizes[ids]]
        sub_total = sum(sub)
        if sub_total:
            # Exact integer arithmetic (Python ints): no float rounding, no int64 overflow.
            floors = [remaining * s // sub_total for s in sub]
            rems = [remaining * s % sub_total for s in sub]
            left = remaining - sum(floors)
            # Largest remainder first, ties to the lower group index.
            for pos in sorted(range(len(sub)), key=lambda a: (-rems[a], a))[:left]:
                floors[pos] += 1
            out[ids] = floors
    else:
        visit = ids[np.lexsort((ids, sizes[ids]))]
        for n_left, g in zip(range(visit.shape[0], 0, -1), visit):
            take = min(int(sizes[g]), remaining // n_left)
            out[g] = take
            remaining -= take
        # Visiting in ascending size guarantees the largest group can absorb the rest; this
        # loop only matters when several groups tie for largest and floors left units over.
        for g in visit[::-1]:
            if remaining == 0:
                break
            extra = min(int(sizes[g] - out[g]), remaining)
            out[g] += extra
            remaining -= extra
    assert int(out.sum()) == b and (out <= sizes).all() and (out >= 0).all()
    return out


def _split_by_groups(groups, n, budget, mode, min_whole):
    groups = _check_groups(groups, n)
    labels, members = _group_members(groups)
    sizes = np.array([m.shape[0] for m in members], dtype=np.int64)
    budgets = balanced_budgets(sizes, budget, mode=mode, min_whole=min_whole)
    return labels, members, budgets


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------


def random_rank(seed: int, ids) -> np.ndarray:
    """Random's ranking keys (major; ties by id): the smallest :func:`random_keys` first."""
    return -random_keys(seed, ids)


def score_rank(scores) -> np.ndarray:
    """Score top-k's ranking keys (major; ties by id): the highest score first."""
    return float_order_bits(scores)


def _first(ids: np.ndarray, major: np.ndarray, budget: int) -> np.ndarray:
    """The ``budget`` first ids of the ranking (major desc, id asc), in that order."""
    return ids[ranking_order(major, ids)[:budget]]


def _ids(ids, n: int | None = None) -> np.ndarray:
    out = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
    if out.ndim != 1 or (out.size and out.dtype.kind not in "iu"):
        raise ValueError(f"ids must be a 1-D integer array, got shape {out.shape} dtype {out.dtype}")
    out = out.astype(np.int64, copy=False)
    if out.size and (out.min() < 0 or np.unique(out).size != out.size):
        raise ValueError("ids must be distinct and >= 0")
    return out


def random_select(ids, budget: int, seed: int = 0) -> np.ndarray:
    """A uniform random subset of ``min(budget, len(ids))`` of the candidate ``ids`` (an int giving
    ``range(ids)``): the ids with the smallest :func:`random_keys` for ``seed``, in that order
    (every prefix is itself a uniform random subset). A candidate's key depends only on the seed and
    its id, so a larger pool keeps the relative order of these candidates."""
    cand = _ids(None, int(ids)) if isinstance(ids, (int, np.integer)) else _ids(ids)
    b = _check_budget(budget, cand.size)
    return _first(cand, random_rank(seed, cand), b)


def score_topk(scores, budget: int) -> np.ndarray:
    """The ``budget`` highest scores (DataComp's CLIP-score filter), best first, ties to the lower id."""
    s = _check_scores(scores)
    b = _check_budget(budget, s.shape[0])
    return _first(np.arange(s.shape[0], dtype=np.int64), score_rank(s), b)


def ccs_hard_cut(scores, beta: float, cutoff: str = "highest") -> np.ndarray:
    """CCS's hard cut: the ids (ascending) left after dropping ``round(beta * N)`` samples.

    With ``cutoff="highest"`` (the original method, meant for difficulty scores such as forgetting
    count, EL2N or negated AUM) those are the *highest* scores: the very hardest training examples
    are mostly mislabeled or ambiguous, and at high pruning rates they hurt more than they teach.
    ``"lowest"`` drops the lowest, as the select stage's ``select.beta`` does for a quality score
    where noise sits at the low end (CLIP score). Ties: ids ranked by (score desc, id asc);
    "highest" drops the head of that ranking, "lowest" the tail.
    """
    s = _check_scores(scores)
    n = s.shape[0]
    if not (0.0 <= float(beta) < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if cutoff not in ("highest", "lowest"):
        raise ValueError(f"cutoff must be 'highest' or 'lowest', got {cutoff!r}")
    n_drop = int(round(float(beta) * n))
    ranking = _rank_desc(s)
    return np.sort(ranking[n_drop:] if cutoff == "highest" else ranking[: n - n_drop])


def ccs_select(scores, budget: int, strata: int = 50, seed: int = 0, ids=None) -> np.ndarray:
    """Coverage-centric coreset selection (CCS; Zheng et al., ICLR 2023) over the candidates
    (``ids``, default ``range(len(scores))``; ``scores[i]`` is ``ids[i]``'s), after the hard cut
    (:func:`ccs_hard_cut`, or the stage's β pre-filter):

    1. cut the candidates' score range [min, max] into ``strata`` equal-width strata
       (:func:`pipeline.core.coreset.ccs_strata`: the maximum falls in the last one);
    2. visit the non-empty strata from smallest to largest; each takes ``min(size, left //
       strata_left)`` samples (:func:`balanced_budgets`' "uniform" mode), so sparse score regions
       are kept whole and the whole score range stays covered;
    3. inside a stratum the samples are :func:`random_select`'s: the smallest keyed random keys.

    Returns:
        int64 ids sorted ascending (CCS has no meaningful order).

    Raises:
        ValueError: bad scores/budget/strata/ids; the budget is capped at the candidates.
    """
    s = _check_scores(scores)
    cand = _ids(ids, s.shape[0])
    if cand.size != s.shape[0]:
        raise ValueError(f"ids has {cand.size} entries for {s.shape[0]} scores")
    if int(strata) < 1:
        raise ValueError(f"strata must be >= 1, got {strata!r}")
    b = _check_budget(budget, cand.size)
    if b == 0:
        return np.zeros(0, np.int64)
    which = ccs_strata(s, float(s.min()), float(s.max()), int(strata))
    counts = np.bincount(which, minlength=int(strata))
    nonempty = np.flatnonzero(counts)
    picked = [random_select(cand[which == stratum], int(share), seed)
              for stratum, share in zip(nonempty, balanced_budgets(counts[nonempty], b, mode="uniform")) if share]
    return np.sort(np.concatenate(picked))


def _moderate_one(x: np.ndarray, ids: np.ndarray, budget: int, chunk: int) -> np.ndarray:
    if budget == 0:
        return np.zeros(0, np.int64)
    # Coordinate-wise median of the group's features as its prototype (Xia et al.).
    center = np.median(x[ids].astype(np.float32), axis=0)
    dist = np.empty(ids.shape[0], np.float64)
    for lo in range(0, ids.shape[0], chunk):
        block = x[ids[lo : lo + chunk]].astype(np.float32) - center
        dist[lo : lo + chunk] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    # Rank by distance (ties by id) and keep the contiguous middle window of the ranking.
    rank = np.lexsort((ids, dist))
    start = (ids.shape[0] - budget) // 2
    return ids[rank[start : start + budget]]


def moderate_select(
    embeddings, budget: int, groups=None, group_mode: str = "proportional", min_whole: int = 0, chunk: int = 65536
) -> np.ndarray:
    """Moderate coreset (Xia et al., ICLR 2023), the original method.

    Per group (class, cluster or partition; the whole set when ``groups`` is None): the
    prototype is the coordinate-wise median of the group's embeddings; each member's score is its
    Euclidean distance to the prototype; the members are ranked by that distance and the
    contiguous middle band of the ranking is kept: ``b_g`` samples starting at rank
    ``(n_g - b_g) // 2``, i.e. samples of *moderate* distance, dropping both the easiest (closest)
    and the hardest/outlying (farthest) ones. (The D2 authors' code keeps the two ends instead;
    we implement the published method.) Group budgets come from :func:`balanced_budgets`.

    Returns:
        int64 ids sorted ascending (a band has no selection order).
    """
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    b = _check_budget(budget, n)
    if groups is None:
        members, budgets = [np.arange(n, dtype=np.int64)], np.array([b])
    else:
        _, members, budgets = _split_by_groups(groups, n, b, group_mode, min_whole)
    picked = [_moderate_one(x, m, int(bg), int(chunk)) for m, bg in zip(members, budgets) if m.size]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


def kcenter_greedy(embeddings, budget: int, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """k-center greedy (farthest-point traversal, Sener & Savarese 2018).

    The first centre is drawn uniformly with ``seed``; each next centre is the point farthest
    (Euclidean) from all centres so far, ties to the lowest id. Returns ids in selection order.

    Cost: O(N·B·D) time (one distance pass over all N per centre, numpy, in ``chunk``-row blocks)
    and O(N·D) memory for a float32 copy of the embeddings: fine up to ~10^5–10^6 points × a few
    thousand centres; it is a baseline, not meant for the full pool.
    """
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    b = _check_budget(budget, n)
    if b == 0:
        return np.zeros(0, np.int64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    order = np.empty(b, np.int64)
    min_dist = np.full(n, np.inf, dtype=np.float64)
    centre = int(rng.integers(n))
    for t in range(b):
        order[t] = centre
        c = x[centre]
        for lo in range(0, n, chunk):
            block = x[lo : lo + chunk] - c
            d = np.einsum("ij,ij->i", block, block, dtype=np.float64)
            np.minimum(min_dist[lo : lo + chunk], d, out=min_dist[lo : lo + chunk])
        min_dist[centre] = -1.0  # never again, even when duplicates leave every distance at 0
        centre = int(np.argmax(min_dist))  # first maximum: lowest id
    return order
