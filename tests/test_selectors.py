"""Baseline selectors: budgets exact, ids distinct, deterministic per seed, and each method's
defining behaviour checked against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import selectors as S


def assert_valid_ids(ids, n, budget):
    assert ids.dtype == np.int64
    assert ids.shape == (min(budget, n),)
    assert np.unique(ids).size == ids.size, "duplicate ids"
    if ids.size:
        assert ids.min() >= 0 and ids.max() < n


# --------------------------------------------------------------------------------------------
# balanced_budgets
# --------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=0, max_size=12),
    budget=st.integers(0, 800),
    mode=st.sampled_from(["proportional", "uniform"]),
    min_whole=st.integers(0, 6),
)
def test_balanced_budgets_invariants(sizes, budget, mode, min_whole):
    sizes_arr = np.array(sizes, dtype=np.int64)
    total = int(sizes_arr.sum())
    out = S.balanced_budgets(sizes_arr, budget, mode=mode, min_whole=min_whole)
    assert out.dtype == np.int64 and out.shape == sizes_arr.shape
    assert int(out.sum()) == min(budget, total)
    assert (out >= 0).all() and (out <= sizes_arr).all()
    b = min(budget, total)
    small = (sizes_arr > 0) & (sizes_arr <= min_whole)
    whole_rule = small.any() and int(sizes_arr[small].sum()) <= b
    if whole_rule:
        assert (out[small] == sizes_arr[small]).all(), "small groups must be taken whole"
    rest = ~small if whole_rule else np.ones_like(small)
    if mode == "proportional" and rest.any() and b < total:
        left = b - int(out[~rest].sum())
        quota = left * sizes_arr[rest] / sizes_arr[rest].sum()
        # Largest remainder: every group within one unit of its exact quota, floors honoured.
        assert (out[rest] >= np.floor(quota) - 1e-9).all() and (out[rest] <= np.ceil(quota) + 1e-9).all()
    if mode == "uniform" and b < total:
        # Water filling: groups not taken whole get equal shares (within 1: integer floors), and
        # a group taken whole is no larger than the rounded-up share of a group left partial.
        r = rest & (sizes_arr > 0)
        partial = r & (out < sizes_arr)
        if partial.any():
            assert out[partial].max() - out[partial].min() <= 1
            full = r & (out == sizes_arr)
            if full.any():
                assert sizes_arr[full].max() <= out[partial].max() + 1


def test_balanced_budgets_examples():
    # 10 of 19 proportionally: quotas 2.63, 0.53, 5.26, 0, 1.58 -> floors 2,0,5,0,1 (+2 by remainder).
    assert S.balanced_budgets([5, 1, 10, 0, 3], 10).tolist() == [3, 0, 5, 0, 2]
    # Uniform: the size-1 group is whole by min_whole, then 9 over sizes 3, 5, 10 -> 3, 3, 3.
    assert S.balanced_budgets([5, 1, 10, 0, 3], 10, "uniform", min_whole=1).tolist() == [3, 1, 3, 0, 3]
    # Uniform fills small groups whole and passes their unused share on.
    assert S.balanced_budgets([2, 100, 50], 60, "uniform").tolist() == [2, 29, 29]
    # Equal remainders go to the lower group index.
    assert S.balanced_budgets([1, 1, 1], 1).tolist() == [1, 0, 0]
    assert S.balanced_budgets([4, 4], 100).tolist() == [4, 4]
    # Small groups that alone exceed the budget cannot all be whole: the rule is dropped.
    assert S.balanced_budgets([2, 2, 2, 100], 3, min_whole=2).sum() == 3
    # Huge sizes: exact integer arithmetic, no overflow.
    big = S.balanced_budgets([10**12, 3 * 10**12], 2 * 10**12)
    assert big.tolist() == [5 * 10**11, 15 * 10**11]


def test_balanced_budgets_errors():
    with pytest.raises(ValueError, match=r"group_sizes\[1\] = -1"):
        S.balanced_budgets([3, -1], 2)
    with pytest.raises(ValueError, match="mode"):
        S.balanced_budgets([3], 2, mode="equal")
    with pytest.raises(ValueError, match="budget must be >= 0"):
        S.balanced_budgets([3], -2)
    with pytest.raises(ValueError, match="integers"):
        S.balanced_budgets([3.5], 2)


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------


def test_random_select_budget_determinism_and_prefixes():
    a = S.random_select(1000, 300, seed=5)
    assert_valid_ids(a, 1000, 300)
    np.testing.assert_array_equal(a, S.random_select(1000, 300, seed=5))
    assert not np.array_equal(a, S.random_select(1000, 300, seed=6))
    # Draw order: a smaller budget with the same seed is a prefix.
    np.testing.assert_array_equal(S.random_select(1000, 100, seed=5), a[:100])
    assert_valid_ids(S.random_select(10, 50, seed=0), 10, 50)
    assert S.random_select(10, 0, seed=0).shape == (0,)
    assert S.random_select(0, 5, seed=0).shape == (0,)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        S.random_select(10, -1, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        S.random_select([3, 3, 4], 1, seed=0)


def test_random_select_is_keyed_by_id():
    """A candidate's draw depends only on the seed and its id (what lets the select stage draw
    the same subset over any partitioning): the smallest coreset.random_keys, ties by id, and
    any subset of candidates keeps its members' relative order."""
    from pipeline.core.coreset import random_keys

    ids = np.random.default_rng(0).permutation(5000)[:800]
    got = S.random_select(ids, 200, seed=9)
    keys = random_keys(9, ids)
    np.testing.assert_array_equal(got, ids[np.argsort(keys, kind="stable")[:200]])
    sub = np.sort(ids[:400])
    assert [i for i in S.random_select(ids, 800, seed=9) if i in set(sub.tolist())] == \
        S.random_select(sub, 400, seed=9).tolist()


def test_random_select_is_uniform():
    counts = np.zeros(50)
    for seed in range(400):
        counts[S.random_select(50, 10, seed=seed)] += 1
    # Each id expected 400 * 10/50 = 80 times; binomial sd ~8.
    assert counts.min() > 50 and counts.max() < 110


# --------------------------------------------------------------------------------------------
# score top-k
# --------------------------------------------------------------------------------------------


def test_score_topk_order_and_ties():
    scores = np.array([0.3, 0.9, 0.3, 0.1, 0.9, 0.5])
    assert S.score_topk(scores, 4).tolist() == [1, 4, 5, 0]
    assert S.score_topk(scores, 100).tolist() == [1, 4, 5, 0, 2, 3]
    assert S.score_topk(scores, 0).tolist() == []
    rng = np.random.default_rng(0)
    s = rng.random(1000)
    top = S.score_topk(s, 100)
    assert_valid_ids(top, 1000, 100)
    assert s[top].min() >= np.sort(s)[-100]
    assert np.all(np.diff(s[top]) <= 0)
    with pytest.raises(ValueError, match=r"scores\[2\] = nan"):
        S.score_topk(np.array([1.0, 2.0, np.nan]), 1)


# --------------------------------------------------------------------------------------------
# CCS
# --------------------------------------------------------------------------------------------


def skewed_scores(rng, n=2000):
    # Most mass in a narrow low band, a thin tail up to 1: the case CCS is built for.
    return np.concatenate([rng.random(int(n * 0.9)) * 0.1, 0.1 + rng.random(n - int(n * 0.9)) * 0.9])


def strata_of(scores, strata):
    lo, hi = scores.min(), scores.max()
    return np.minimum(((scores - lo) / (hi - lo) * strata).astype(int), strata - 1)


def test_ccs_budget_determinism_and_hard_cut():
    rng = np.random.default_rng(0)
    s = skewed_scores(rng)
    survivors = S.ccs_hard_cut(s, 0.1)
    ids = S.ccs_select(s[survivors], 300, strata=20, seed=3, ids=survivors)
    assert_valid_ids(ids, 2000, 300)
    assert np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, S.ccs_select(s[survivors], 300, strata=20, seed=3, ids=survivors))
    assert not np.array_equal(ids, S.ccs_select(s[survivors], 300, strata=20, seed=4, ids=survivors))
    # "highest": the 200 highest scores are gone; "lowest": the 200 lowest are.
    ranking = np.argsort(-s, kind="stable")
    assert not set(ids.tolist()) & set(ranking[:200].tolist())
    assert set(S.ccs_hard_cut(s, 0.1, "lowest").tolist()) == set(ranking[:-200].tolist())
    with pytest.raises(ValueError, match="cutoff"):
        S.ccs_hard_cut(s, 0.1, "middle")
    with pytest.raises(ValueError, match="strata"):
        S.ccs_select(s, 10, strata=0)
    with pytest.raises(ValueError, match="ids has 3 entries for 2000 scores"):
        S.ccs_select(s, 10, ids=[1, 2, 3])


def test_ccs_covers_strata_by_water_filling():
    rng = np.random.default_rng(1)
    s = skewed_scores(rng)
    strata = 20
    ids = S.ccs_select(s, 300, strata=strata, seed=0)
    which = strata_of(s, strata)
    sizes = np.bincount(which, minlength=strata)
    got = np.bincount(which[ids], minlength=strata)
    nonempty = sizes > 0
    assert (got[nonempty] > 0).all(), "every non-empty stratum is represented"
    partial = nonempty & (got < sizes)
    full = nonempty & (got == sizes)
    assert full.any() and partial.any()
    assert got[partial].max() - got[partial].min() <= 1  # equal shares where not exhausted
    assert sizes[full].max() <= got[partial].max() + 1  # only strata within the share are whole
    # The sparse tail (scores > 0.1 are 10% of the data) is far better covered than by random.
    tail_ccs = (s[ids] > 0.1).mean()
    tail_random = (s[S.random_select(2000, 300, seed=0)] > 0.1).mean()
    assert tail_ccs > 0.6 and tail_random < 0.2


def test_ccs_constant_scores_and_draws_inside_strata():
    ids = S.ccs_select(np.ones(50), 20, strata=5, seed=0)
    assert_valid_ids(ids, 50, 20)
    # one stratum: the draw is random_select's
    np.testing.assert_array_equal(ids, np.sort(S.random_select(50, 20, seed=0)))
    rng = np.random.default_rng(2)
    s = rng.random(600)
    ids = S.ccs_select(s, 120, strata=10, seed=0)
    which = strata_of(s, 10)
    for stratum in range(10):
        members = np.flatnonzero(which == stratum)
        got = ids[which[ids] == stratum]
        np.testing.assert_array_equal(got, np.sort(S.random_select(members, got.size, seed=0)))


# --------------------------------------------------------------------------------------------
# Moderate
# --------------------------------------------------------------------------------------------


def test_moderate_keeps_middle_band_of_distance_to_median():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(501, 16)).astype(np.float32)
    ids = S.moderate_select(x, 101)
    assert_valid_ids(ids, 501, 101)
    dist = np.linalg.norm(x - np.median(x, axis=0), axis=1)
    rank = np.argsort(dist)
    expected = np.sort(rank[200:301])  # (501 - 101) // 2 = 200 closest and 200 farthest dropped
    np.testing.assert_array_equal(ids, expected)
    kept = dist[ids]
    dropped = np.delete(dist, ids)
    assert (dropped < kept.min()).sum() == 200 and (dropped > kept.max()).sum() == 200
    np.testing.assert_array_equal(S.moderate_select(x, 101, chunk=37), ids)  # chunking is exact
    np.testing.assert_array_equal(S.moderate_select(x.astype(np.float16), 0), [])
    assert S.moderate_select(x, 10_000).shape == (501,)


def test_moderate_per_group_median():
    rng = np.random.default_rng(1)
    # Two classes far apart: a global median would sit between them; per-class medians don't.
    x = np.concatenate([rng.normal(0, 1, (200, 8)), rng.normal(20, 1, (100, 8))]).astype(np.float32)
    groups = np.repeat([3, 9], [200, 100])
    ids = S.moderate_select(x, 60, groups=groups)
    assert_valid_ids(ids, 300, 60)
    assert np.bincount(groups[ids])[[3, 9]].tolist() == [40, 20]
    for g, n_g, b_g in ((3, 200, 40), (9, 100, 20)):
        members = np.nonzero(groups == g)[0]
        d = np.linalg.norm(x[members] - np.median(x[members], axis=0), axis=1)
        start = (n_g - b_g) // 2
        expected = np.sort(members[np.argsort(d)[start : start + b_g]])
        np.testing.assert_array_equal(ids[groups[ids] == g], expected)
    with pytest.raises(ValueError, match="2-D"):
        S.moderate_select(np.zeros(5), 2)


# --------------------------------------------------------------------------------------------
# k-center greedy
# --------------------------------------------------------------------------------------------


def test_kcenter_is_farthest_point_traversal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    ids = S.kcenter_greedy(x, 25, seed=4)
    assert_valid_ids(ids, 300, 25)
    np.testing.assert_array_equal(ids, S.kcenter_greedy(x, 25, seed=4, chunk=17))
    assert ids[0] == np.random.default_rng(4).integers(300)  # seeded random first centre
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    for t in range(1, 25):
        nearest = d2[:, ids[:t]].min(axis=1)
        nearest[ids[:t]] = -1
        assert ids[t] == int(np.argmax(nearest))
    firsts = {int(S.kcenter_greedy(x, 1, seed=s)[0]) for s in range(10)}
    assert len(firsts) > 5


def test_kcenter_covers_clusters_better_than_random():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 50, size=(10, 4))
    sizes = [910] + [10] * 9  # one dominant cluster, nine small ones
    x = np.concatenate([c + rng.normal(0, 0.5, (s, 4)) for c, s in zip(centres, sizes)]).astype(np.float32)
    label = np.repeat(np.arange(10), sizes)
    kc = S.kcenter_greedy(x, 10, seed=0)
    assert np.unique(label[kc]).size == 10
    covered_random = [np.unique(label[S.random_select(1000, 10, seed=s)]).size for s in range(20)]
    assert max(covered_random) < 10


def test_kcenter_duplicates_and_budgets():
    x = np.zeros((20, 3), dtype=np.float16)  # every distance is 0
    ids = S.kcenter_greedy(x, 20, seed=0)
    assert_valid_ids(ids, 20, 20)
    assert S.kcenter_greedy(x, 0, seed=0).shape == (0,)
    assert S.kcenter_greedy(x, 50, seed=0).shape == (20,)
    with pytest.raises(ValueError, match="floating point"):
        S.kcenter_greedy(np.zeros((3, 2), dtype=np.int64), 1)
