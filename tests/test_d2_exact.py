"""Partitioned exact D2 (pipeline.d2_exact) against the sequential d2.d2_select, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import d2, d2_exact
from pipeline.core.d2 import CSRGraph

FLOOR = -(2**52 - 1)


def random_knn(rng, n, k, p_missing=0.1, distance_values=None):
    nb = rng.integers(0, max(n, 1), size=(n, k))
    nb[rng.random((n, k)) < p_missing] = -1
    if distance_values is None:
        dist = rng.random((n, k)).astype(np.float32) * 2
    else:
        dist = rng.choice(np.asarray(distance_values, dtype=np.float32), size=(n, k))
    return nb, dist


def assert_same(graph, scores, labels, budget, gf, gr, rounds, n_partitions=None):
    ref = d2.d2_select(graph, scores, budget, gf, gr, rounds)
    sel, info = d2_exact.partitioned_d2_select(
        graph, scores, labels, budget, gf, gr, rounds, n_partitions=n_partitions
    )
    np.testing.assert_array_equal(sel.order, ref.order)
    assert sel.order.dtype == np.int64
    np.testing.assert_array_equal(sel.forward_scores, ref.forward_scores)
    np.testing.assert_array_equal(sel.final_scores, ref.final_scores)
    check_info(info, min(budget, graph.n_nodes), graph.n_nodes, rounds)
    return sel, info


def check_info(info, b, n, forward_rounds):
    """The round counters are consistent with each other and with the stopping rule."""
    assert info["forward_exchanges"] == forward_rounds
    if n == 0 or b == 0:
        assert info["rounds"] == 0
        return
    r = info["rounds"]
    assert 1 <= r <= n + 2
    for key in ("picks_per_round", "settled_per_round", "messages_per_round", "bytes_per_round"):
        assert len(info[key]) == r
    settled = info["settled_per_round"]
    assert settled[-1] >= b and all(x < b for x in settled[:-1])
    assert all(a <= c for a, c in zip(settled, settled[1:]))  # settled picks stay settled
    assert sum(info["picks_per_round"]) == info["total_picks"] >= b
    if info["n_partitions"] == 1:
        # One partition certifies the exact greedy order to its cap in one round, no messages;
        # its heap top is never blocked.
        assert r == 1 and info["total_picks"] == b and info["bytes_per_round"] == [0]
        assert info["total_parks"] == 0


# --------------------------------------------------------------------------------------------
# Random graphs
# --------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(0, 60),
    k=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
    n_parts=st.integers(1, 16),
    contiguous=st.booleans(),
    extra_parts=st.integers(0, 3),
    tied=st.booleans(),
    gf=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    gr=st.sampled_from([0.0, 0.1, 1.0, 4.0]),
    rounds=st.integers(0, 3),
    budget_kind=st.sampled_from(["zero", "one", "third", "random", "all", "more"]),
)
def test_partitioned_equals_sequential(
    n, k, seed, n_parts, contiguous, extra_parts, tied, gf, gr, rounds, budget_kind
):
    rng = np.random.default_rng(seed)
    nb, dist = random_knn(rng, n, k, distance_values=[0.0, 0.5, 1.0] if tied else None)
    graph = d2.symmetrize_knn(nb, dist)
    # "tied": few distinct scores and distances, so exact ties exercise the id rule (gamma 0
    # makes every weight exactly 1).
    scores = rng.integers(0, 3, n).astype(float) if tied else rng.random(n) * 3
    if contiguous:
        labels = (np.arange(n) * n_parts) // max(n, 1)
    else:
        labels = rng.integers(0, n_parts, n)
    budget = {
        "zero": 0,
        "one": 1,
        "third": n // 3,
        "random": int(rng.integers(0, n + 1)),
        "all": n,
        "more": n + 5,
    }[budget_kind]
    # extra_parts > 0: some partitions own nothing.
    assert_same(graph, scores, labels, budget, gf, gr, rounds, n_partitions=n_parts + extra_parts)


@pytest.mark.parametrize("n_parts", [1, 3, 8, 32])
@pytest.mark.parametrize("contiguous", [False, True])
def test_medium_graph_full_order(n_parts, contiguous):
    rng = np.random.default_rng(n_parts)
    n = 3000
    graph = d2.symmetrize_knn(*random_knn(rng, n, 8, p_missing=0.02))
    scores = rng.random(n)
    labels = (np.arange(n) * n_parts) // n if contiguous else rng.integers(0, n_parts, n)
    for budget in (1, n // 10, (3 * n) // 10, n):
        assert_same(graph, scores, labels, budget, 1.0, 1.0, 1)


# --------------------------------------------------------------------------------------------
# Hard cases
# --------------------------------------------------------------------------------------------


def path_graph(n, d=0.0):
    nb = np.arange(1, n + 1).reshape(n, 1)
    nb[-1, 0] = -1
    return d2.symmetrize_knn(nb, np.full((n, 1), d, np.float32))


@pytest.mark.parametrize("n_parts", [2, 3, 7])
@pytest.mark.parametrize("gr", [0.0, 0.3, 2.0])
def test_long_decreasing_chain_crossing_partitions(n_parts, gr):
    # A path whose scores fall along it: each pick is only certifiable after its predecessor's
    # pick has suppressed the node between them, so certification walks the chain; the labels
    # switch partition every 1-3 nodes, so it crosses partitions back and forth all the way.
    n = 240
    graph = path_graph(n, d=0.1)
    scores = np.linspace(10.0, 1.0, n)
    rng = np.random.default_rng(n_parts)
    labels = np.repeat(np.arange(n) % n_parts, rng.integers(1, 4, n))[:n]
    for rounds in (0, 1, 2):
        for budget in (n // 3, n):
            assert_same(graph, scores, labels, budget, 1.0, gr, rounds)
    # The chain is hard: the unpartitioned scheme certifies one even node per round (n/2 + 1
    # rounds); partitions walk runs of their own nodes within a round but still need >= n/4.
    _, info = d2_exact.partitioned_d2_select(graph, scores, labels, n, 1.0, gr, 0)
    assert d2_exact.certified_rounds(graph, scores, n, gr) == n // 2 + 1
    assert info["rounds"] >= n // 4


@pytest.mark.parametrize("n_parts", [1, 2, 5, 16])
def test_exact_ties_gamma_zero_equal_scores(n_parts):
    rng = np.random.default_rng(1)
    n = 200
    graph = d2.symmetrize_knn(*random_knn(rng, n, 4, distance_values=[0.0]))
    scores = np.ones(n)
    labels = rng.integers(0, n_parts, n)
    for budget in (0, 1, 50, n):
        for rounds in (0, 1, 3):
            assert_same(graph, scores, labels, budget, 0.0, 0.0, rounds)


def test_isolated_nodes_and_empty_partitions():
    rng = np.random.default_rng(2)
    n = 120
    nb, dist = random_knn(rng, n, 3, p_missing=0.6)
    nb[:40] = -1  # the first 40 have no own entries; some have none either way
    graph = d2.symmetrize_knn(nb, dist)
    assert (graph.degrees == 0).any()
    scores = rng.random(n)
    labels = rng.choice([1, 4, 6], n)  # partitions 0, 2, 3, 5, 7 own nothing
    for budget in (0, 7, 60, n):
        assert_same(graph, scores, labels, budget, 1.0, 0.5, 1, n_partitions=8)
    edgeless = CSRGraph.empty(10)
    assert_same(edgeless, rng.random(10), np.arange(10) % 3, 10, 1.0, 1.0, 2)
    assert_same(CSRGraph.empty(0), np.zeros(0), np.zeros(0, np.int64), 5, 1.0, 1.0, 1)


@pytest.mark.parametrize("n_parts", [2, 5, 16])
def test_hub_with_neighbours_in_every_partition(n_parts):
    rng = np.random.default_rng(3)
    n = 300
    nb, dist = random_knn(rng, n, 3)
    nb[:, 0] = 0  # everyone points at the hub
    nb[0, 0] = 1
    graph = d2.symmetrize_knn(nb, dist)
    labels = np.arange(n) % n_parts
    for hub_score in (0.0, 0.5, 50.0):  # hub picked last, in the middle, first
        scores = rng.random(n)
        scores[0] = hub_score
        for budget in (1, n // 4, n):
            for rounds in (0, 1, 2):
                assert_same(graph, scores, labels, budget, 1.0, 0.4, rounds)


def test_floor_reached_across_partitions():
    # Star with 600 leaves of score 1 around a hub of score 0, weights 1: the hub falls to the
    # fixed-point floor; the leaves live in 7 partitions, the hub in its own.
    n_leaves = 600
    nb = np.concatenate([np.full((1, 1), -1), np.zeros((n_leaves, 1), np.int64)])
    dist = np.zeros((n_leaves + 1, 1), np.float32)
    graph = d2.symmetrize_knn(nb, dist)
    scores = np.ones(n_leaves + 1)
    scores[0] = 0.0
    labels = np.concatenate([[7], np.arange(n_leaves) % 7])
    sel, _ = assert_same(graph, scores, labels, n_leaves + 1, 0.0, 0.0, 0)
    assert sel.final_scores[0] == math.ldexp(d2.FIXED_POINT_FLOOR, -43)


# --------------------------------------------------------------------------------------------
# The rule's promise, certified_rounds, the partition layout
# --------------------------------------------------------------------------------------------


def test_full_order_priorities_strictly_decreasing():
    rng = np.random.default_rng(4)
    n = 5000
    graph = d2.symmetrize_knn(*random_knn(rng, n, 10, p_missing=0.0))
    sel = d2.d2_select(graph, rng.random(n), n, 1.0, 0.2)
    shift = d2.fixed_point_shift(sel.forward_scores.max())
    q = d2.quantize_scores(sel.final_scores[sel.order], shift)  # exact: the scores are q / 2**S
    ids = sel.order
    assert (q < 0).any()  # the run goes deep into suppressed nodes
    later = (q[1:] < q[:-1]) | ((q[1:] == q[:-1]) & (ids[1:] > ids[:-1]))
    assert later.all()


def naive_certified_rounds(graph, forward, budget, gamma):
    n = graph.n_nodes
    if n == 0 or budget == 0:
        return 0
    rows = [[(int(j), float(d)) for j, d in zip(*graph.neighbors(i))] for i in range(n)]
    shift = min(44 - math.frexp(float(max(forward)))[1], 1022)
    q = [math.floor(math.ldexp(float(x), shift) + 0.5) for x in forward]
    picked = [False] * n
    picks = []
    rounds = 0
    while True:
        unpicked = [i for i in range(n) if not picked[i]]
        best = max(((q[i], -i) for i in unpicked), default=None)
        if sum(best is None or p > best for p in picks) >= min(budget, n):
            return rounds
        rounds += 1
        cert = [
            u
            for u in unpicked
            if all((q[u], -u) > (q[y], -y) for y, _ in rows[u] if y != u and not picked[y])
        ]
        for u in cert:
            picked[u] = True
            picks.append((q[u], -u))
        for u in cert:
            for y, d in rows[u]:
                if not picked[y]:
                    amount = math.floor(math.exp(-gamma * d) * float(max(q[u], 0)) + 0.5)
                    q[y] = max(q[y] - amount, FLOOR)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 50),
    k=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
    tied=st.booleans(),
    gamma=st.sampled_from([0.0, 0.3, 1.0]),
    budget_frac=st.sampled_from([0.0, 0.1, 0.3, 1.0]),
)
def test_certified_rounds_matches_naive(n, k, seed, tied, gamma, budget_frac):
    rng = np.random.default_rng(seed)
    graph = d2.symmetrize_knn(*random_knn(rng, n, k, distance_values=[0.0, 1.0] if tied else None))
    forward = d2.forward_pass(graph, rng.integers(0, 3, n).astype(float) if tied else rng.random(n))
    budget = int(round(budget_frac * n))
    assert d2_exact.certified_rounds(graph, forward, budget, gamma) == naive_certified_rounds(
        graph, forward, budget, gamma
    )


def test_certified_rounds_grow_with_budget_and_partitions_need_more_than_one():
    rng = np.random.default_rng(5)
    n = 4000
    graph = d2.symmetrize_knn(*random_knn(rng, n, 10, p_missing=0.0))
    forward = d2.forward_pass(graph, rng.random(n))
    counts = [d2_exact.certified_rounds(graph, forward, b, 1.0) for b in (0, 1, n // 10, n // 3, n)]
    assert counts[0] == 0 and counts[1] == 1
    assert counts == sorted(counts) and counts[-1] > counts[2] > 1
    _, info = d2_exact.partitioned_d2_select(graph, forward, np.arange(n) % 8, n, 1.0, 1.0, 0)
    assert info["rounds"] > 1 and info["total_picks"] == n


def test_partition_pair_lists_agree_and_messages_are_compact():
    rng = np.random.default_rng(6)
    n = 400
    graph = d2.symmetrize_knn(*random_knn(rng, n, 5))
    labels = rng.integers(0, 6, n)
    parts = [d2_exact.PartitionState(**kw) for kw in d2_exact.graph_partition_arrays(graph, rng.random(n), labels, 6)]
    for a in parts:
        np.testing.assert_array_equal(a.owned, np.flatnonzero(labels == a.part_id))
        for b in parts:
            if a is b:
                continue
            # L(a->b) as a sends it == b's halo nodes owned by a, in the same order.
            sent = a.owned[a._bnd_lid[a._bnd_off[b.part_id] : a._bnd_off[b.part_id + 1]]]
            held = b.halo[b._halo_off[a.part_id] : b._halo_off[a.part_id + 1]]
            np.testing.assert_array_equal(sent, held)
            assert np.all(np.diff(sent) > 0)
    for p in parts:
        p.start_reverse(40)
    out = parts[0].step([], None, 1.0)
    for msg in out.values():
        assert msg.dec_slots.dtype == np.int32 and msg.state_slots.dtype == np.int32
        assert msg.dec_values.dtype == np.int64 and msg.state_values.dtype == np.int64
        assert msg.nbytes == sum(x.nbytes for x in msg)
        assert (msg.dec_values > 0).all()


def test_validation():
    g = d2.symmetrize_knn(np.array([[1], [2], [-1]]), np.zeros((3, 1), np.float32))
    s = np.ones(3)
    with pytest.raises(ValueError, match="symmetric"):
        d2_exact.partitioned_d2_select(CSRGraph([0, 1, 1], [1], [0.5], 2), np.ones(2), [0, 1], 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        d2_exact.partitioned_d2_select(g, s, [0, 1], 1)
    with pytest.raises(ValueError, match=">= 0"):
        d2_exact.partitioned_d2_select(g, s, [0, -1, 0], 1)
    with pytest.raises(ValueError, match="0..n_partitions-1"):
        d2_exact.partitioned_d2_select(g, s, [0, 3, 0], 1, n_partitions=2)
    with pytest.raises(ValueError, match="integer"):
        d2_exact.partitioned_d2_select(g, s, [0.0, 1.0, 0.0], 1)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        d2_exact.partitioned_d2_select(g, s, [0, 1, 0], -1)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        d2_exact.partitioned_d2_select(g, [1.0, -1.0, 1.0], [0, 1, 0], 1)
    with pytest.raises(ValueError, match="gamma_reverse"):
        d2_exact.partitioned_d2_select(g, s, [0, 1, 0], 1, gamma_reverse=-1.0)
    with pytest.raises(ValueError, match="rounds"):
        d2_exact.partitioned_d2_select(g, s, [0, 1, 0], 1, rounds=-1)
    # Unsorted but symmetric rows are accepted (checked by the slow path).
    unsorted = CSRGraph([0, 2, 3, 4], [2, 1, 0, 0], [0.1, 0.2, 0.2, 0.1], 3)
    assert_same(unsorted, np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1]), 3, 1.0, 1.0, 1)
    assert d2_exact.certified_rounds(g, s, 0) == 0


def test_dead_level_from_sketches():
    e = np.zeros(0, np.int64)
    sketches = [
        (np.array([10, 8, 6]), np.array([0, 1, 2]), np.array([1, 2, 3])),
        (e, e, e),
        (np.array([9, 5]), np.array([3, 4]), np.array([2, 4])),
    ]
    # best first: 10 (1 pick proven), 9 (+2: partition 2 has 2 at or above 9), 8, 6, 5
    assert d2_exact.dead_level_from_sketches(sketches, 1) == (10, 0)
    assert d2_exact.dead_level_from_sketches(sketches, 3) == (9, 3)
    assert d2_exact.dead_level_from_sketches(sketches, 4) == (8, 1)
    assert d2_exact.dead_level_from_sketches(sketches, 7) == (5, 4)
    assert d2_exact.dead_level_from_sketches(sketches, 8) is None
    assert d2_exact.dead_level_from_sketches([(e, e, e)], 1) is None
    # equal q: the lower id is the higher priority
    tie = [(np.array([7]), np.array([5]), np.array([1])), (np.array([7]), np.array([2]), np.array([1]))]
    assert d2_exact.dead_level_from_sketches(tie, 1) == (7, 2)
    assert d2_exact.dead_level_from_sketches(tie, 2) == (7, 5)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_parts=st.integers(1, 6), points=st.integers(1, 8))
def test_settle_sketch_levels_are_proven(seed, n_parts, points):
    # Real partitions mid-run: the level derived from their sketches has at least `remaining`
    # unsettled picks at or above it (counted exactly here).
    rng = np.random.default_rng(seed)
    n = 300
    graph = d2.symmetrize_knn(*random_knn(rng, n, 4))
    scores = rng.random(n)
    parts = [
        d2_exact.PartitionState(**kw)
        for kw in d2_exact.graph_partition_arrays(graph, scores, rng.integers(0, n_parts, n), n_parts)
    ]
    for p in parts:
        p.start_reverse(d2.fixed_point_shift(scores.max()))
    inbox = [[] for _ in parts]
    for _ in range(int(rng.integers(1, 4))):
        outs = [p.step(inbox[i], None, 1.0) for i, p in enumerate(parts)]
        inbox = [[(src, m) for src, out in enumerate(outs) for dst, m in out.items() if dst == i] for i in range(n_parts)]
    bests = [b for b in (p.best_unpicked() for p in parts) if b is not None]
    threshold = max(bests, key=lambda t: (t[0], -t[1])) if bests else None
    remaining = int(rng.integers(1, n))
    reports = [p.settle(threshold, remaining, points) for p in parts]
    unsettled = np.concatenate(
        [np.stack(p.picks_above(None)[::-1], 1)[c:] for p, (c, _) in zip(parts, reports)]
    )  # rows (q, id)
    for c, (q, g, k) in reports:
        assert np.all(np.diff(k) > 0) and (k.size == 0 or k[-1] <= remaining)
    level = d2_exact.dead_level_from_sketches([sk for _, sk in reports], remaining)
    if level is not None:
        at_or_above = (unsettled[:, 0] > level[0]) | ((unsettled[:, 0] == level[0]) & (unsettled[:, 1] <= level[1]))
        assert at_or_above.sum() >= remaining
