"""Baseline coreset selectors with the same budget semantics as :mod:`pipeline.d2`.

Pure numpy; no Ray, no I/O. Every selector:

* takes a keep budget ``B`` (an integer >= 0; ``B >= N`` keeps everything, as in D2);
* returns an int64 array of distinct sample ids: in selection order where the method has one
  (random, score top-k, k-center), otherwise sorted ascending (CCS, moderate, any grouped
  selection), as stated per function;
* is deterministic for a fixed ``seed`` (``numpy.random.default_rng(seed)``).

Score convention (as in D2): higher = more worth keeping (CLIP score, or a training-dynamics
difficulty such as forgetting count / EL2N / negated AUM).

``groups`` (random, CCS, moderate): an int label per sample (class, cluster or partition). The
budget is split over groups with :func:`balanced_budgets` and each group is selected on its own.
"""

from __future__ import annotations

import numpy as np

from .d2 import check_budget as _check_budget  # one budget rule for D2 and the baselines
from .d2 import check_finite_scores as _check_scores

__all__ = [
    "balanced_budgets",
    "ccs_select",
    "kcenter_greedy",
    "moderate_select",
    "random_select",
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
# Budgets over groups (spec §6)
# --------------------------------------------------------------------------------------------


def balanced_budgets(group_sizes, budget: int, mode: str = "proportional", min_whole: int = 0) -> np.ndarray:
    """Split a keep budget over groups (classes or partitions), spec §6.

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


def random_select(
    n: int, budget: int, seed: int = 0, groups=None, group_mode: str = "proportional", min_whole: int = 0
) -> np.ndarray:
    """Uniform random subset of ``min(budget, n)`` ids.

    Without groups the result is in draw order (every prefix is itself a uniform random subset).
    With ``groups`` each group gets its :func:`balanced_budgets` share (``group_mode``,
    ``min_whole``), drawn uniformly inside the group; the result is sorted ascending.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    b = _check_budget(budget, n)
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(n)[:b].astype(np.int64)
    _, members, budgets = _split_by_groups(groups, n, b, group_mode, min_whole)
    picked = [rng.permutation(m)[:bg] for m, bg in zip(members, budgets)]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


def score_topk(scores, budget: int) -> np.ndarray:
    """The ``budget`` highest scores (DataComp's CLIP-score filter), best first, ties to the lower id."""
    s = _check_scores(scores)
    b = _check_budget(budget, s.shape[0])
    return _rank_desc(s)[:b]


def _ccs_one(scores: np.ndarray, ids: np.ndarray, budget: int, strata: int, rng) -> np.ndarray:
    """CCS inside one group: equal-width strata, smallest first, equal share of what is left."""
    if budget == 0 or ids.size == 0:
        return np.zeros(0, np.int64)
    s = scores[ids]
    lo, hi = float(s.min()), float(s.max())
    if hi > lo:
        # Equal-width bins over [lo, hi]; the maximum falls in the last bin.
        which = np.minimum(((s - lo) / (hi - lo) * strata).astype(np.int64), strata - 1)
    else:
        which = np.zeros(s.shape[0], np.int64)
    by_stratum = ids[np.argsort(which, kind="stable")]
    counts = np.bincount(which, minlength=strata)
    bins = [m for m in np.split(by_stratum, np.cumsum(counts)[:-1]) if m.size]
    # Smallest stratum first (ties: lower score range first), each taking an equal share of the
    # remaining budget capped at its size, so what a sparse stratum cannot use flows to denser
    # ones: exactly balanced_budgets' "uniform" mode over the strata sizes.
    shares = balanced_budgets(np.array([m.size for m in bins], np.int64), budget, mode="uniform")
    picked = [rng.choice(m, size=int(k), replace=False) for m, k in zip(bins, shares)]
    return np.concatenate(picked).astype(np.int64)


def ccs_select(
    scores,
    budget: int,
    beta: float = 0.0,
    strata: int = 50,
    seed: int = 0,
    groups=None,
    hard_cutoff: str = "highest",
    group_mode: str = "proportional",
    min_whole: int = 0,
) -> np.ndarray:
    """Coverage-centric coreset selection (CCS; Zheng et al., ICLR 2023).

    1. Hard cut: drop ``round(beta * N)`` samples. With ``hard_cutoff="highest"`` (the original
       method, meant for difficulty scores such as forgetting count, EL2N or negated AUM) those
       are the *highest* scores: the very hardest training examples are mostly mislabeled or
       ambiguous, and at high pruning rates they hurt more than they teach. With a quality score
       where noise sits at the low end (CLIP score), pass ``hard_cutoff="lowest"``. Ties: ids
       ranked by (score desc, id asc); "highest" drops the head of that ranking, "lowest" the tail.
    2. Cut the surviving score range into ``strata`` equal-width strata.
    3. Visit non-empty strata from smallest to largest; each takes ``min(size, left // strata_left)``
       samples uniformly at random, so sparse score regions are kept whole and coverage of the
       whole score range is preserved.

    With ``groups`` the hard cut is global, the budget is split over the groups' surviving
    members with :func:`balanced_budgets`, and steps 2–3 run inside each group.

    Returns:
        int64 ids sorted ascending (CCS has no meaningful order).

    Raises:
        ValueError: bad scores/budget/beta/strata, or the hard cut leaves fewer samples than the
            budget (the numbers are named: lower ``beta``).
    """
    s = _check_scores(scores)
    n = s.shape[0]
    b = _check_budget(budget, n)
    if not (0.0 <= float(beta) < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if int(strata) < 1:
        raise ValueError(f"strata must be >= 1, got {strata!r}")
    if hard_cutoff not in ("highest", "lowest"):
        raise ValueError(f"hard_cutoff must be 'highest' or 'lowest', got {hard_cutoff!r}")
    n_drop = int(round(float(beta) * n))
    ranking = _rank_desc(s)
    survivors = ranking[n_drop:] if hard_cutoff == "highest" else ranking[: n - n_drop]
    survivors = np.sort(survivors)
    if survivors.shape[0] < b:
        raise ValueError(
            f"ccs_select: beta={beta} drops {n_drop} of {n} samples, leaving {survivors.shape[0]} "
            f"< budget {b}; lower beta"
        )
    rng = np.random.default_rng(seed)
    if groups is None:
        return np.sort(_ccs_one(s, survivors, b, int(strata), rng))
    g = _check_groups(groups, n)
    labels, members = _group_members(g[survivors])
    members = [survivors[m] for m in members]
    budgets = balanced_budgets(np.array([m.size for m in members], np.int64), b, group_mode, min_whole)
    picked = [_ccs_one(s, m, int(bg), int(strata), rng) for m, bg in zip(members, budgets)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


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
