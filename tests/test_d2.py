"""D2 core against a naive reference written here, plus edge cases and input validation.

The references follow docs/d2.md literally (dict-of-edges graph, repeated argmax over all nodes),
performing the same floating-point operations in the same order as the compiled code (and the
reverse pass's fixed point with Python ints), so the comparison is exact: same selected set,
same order, same scores bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import d2
from pipeline.core.d2 import CSRGraph

# --------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------


def naive_adjacency(neighbors, distances):
    """{i: {j: d}} with N(i) = {j in kNN(i)} ∪ {j : i in kNN(j)}, one (smallest) d per edge."""
    n = len(neighbors)
    adj = {i: {} for i in range(n)}
    for i in range(n):
        for j, d in zip(neighbors[i], distances[i]):
            j = int(j)
            if j < 0 or j == i:
                continue
            d = max(float(d), 0.0)
            for a, b in ((i, j), (j, i)):
                if b not in adj[a] or d < adj[a][b]:
                    adj[a][b] = d
    return adj


def adjacency_from_csr(graph):
    """Rows of a CSRGraph as lists of (j, d) in stored order."""
    return [
        [(int(j), float(d)) for j, d in zip(*graph.neighbors(i))] for i in range(graph.n_nodes)
    ]


def naive_forward(rows, scores, gamma, rounds=1):
    prev = [float(x) for x in scores]
    for _ in range(rounds):
        out = []
        for i, row in enumerate(rows):
            total = float(scores[i])
            for j, d in row:
                total += math.exp(-gamma * d) * prev[j]
            out.append(total)
        prev = out
    return np.array(prev, dtype=np.float64)


# The reverse pass's fixed point written out (docs/d2.md#7-fixed-point-integer-scores): S with M < 2**e, S = 44 - e (capped at
# 1022); q = floor(s * 2**S + 0.5); each update floor(w * max(q, 0) + 0.5); floor -(2**52 - 1).
NAIVE_FLOOR = -(2**52 - 1)


def naive_shift(max_score):
    return min(44 - math.frexp(float(max_score))[1], 1022)


def naive_reverse(rows, forward_scores, budget, gamma):
    """docs/d2.md §5 verbatim: O(B·N) repeated argmax (highest score, then lowest index), suppression
    by max(score, 0), on Python-int fixed-point scores."""
    fwd = [float(x) for x in forward_scores]
    n = len(fwd)
    if n == 0 or budget == 0:
        return np.zeros(0, dtype=np.int64), np.array(fwd, dtype=np.float64)
    shift = naive_shift(max(fwd))
    q = [math.floor(math.ldexp(x, shift) + 0.5) for x in fwd]
    selected = [False] * n
    order = []
    for _ in range(min(budget, n)):
        top = max((i for i in range(n) if not selected[i]), key=lambda i: (q[i], -i))
        order.append(top)
        selected[top] = True
        for j, d in rows[top]:
            if not selected[j]:
                amount = math.floor(math.exp(-gamma * d) * float(max(q[top], 0)) + 0.5)
                q[j] = max(q[j] - amount, NAIVE_FLOOR)
    final = np.array([math.ldexp(float(x), -shift) for x in q], dtype=np.float64)
    return np.array(order, dtype=np.int64), final


def random_knn(rng, n, k, p_missing=0.1, p_self=0.05, distance_values=None):
    """kNN-shaped input with -1 entries, self entries, duplicates and (optionally) tied distances."""
    nb = rng.integers(0, max(n, 1), size=(n, k))
    nb[rng.random((n, k)) < p_missing] = -1
    self_mask = rng.random((n, k)) < p_self
    nb[self_mask] = np.nonzero(self_mask)[0]
    if distance_values is None:
        dist = rng.random((n, k)).astype(np.float32) * 2
    else:
        dist = rng.choice(np.asarray(distance_values, dtype=np.float32), size=(n, k))
    dist[nb < 0] = np.inf  # FAISS's padding for missing neighbours
    return nb, dist


def assert_matches_naive(nb, dist, scores, budget, gf, gr, rounds=1):
    graph = d2.symmetrize_knn(nb, dist)
    adj = naive_adjacency(nb, dist)
    rows = adjacency_from_csr(graph)
    # The graph: same neighbour sets and distances, rows sorted, symmetric.
    for i in range(len(nb)):
        expected = sorted(adj[i].items())
        got = [(j, d) for j, d in rows[i]]
        assert [j for j, _ in got] == [j for j, _ in expected], f"row {i}"
        np.testing.assert_array_equal(
            np.array([d for _, d in got], dtype=graph.distances.dtype),
            np.array([d for _, d in expected], dtype=graph.distances.dtype),
        )
    assert graph.is_symmetric()
    fwd = d2.forward_pass(graph, scores, gf, rounds)
    np.testing.assert_array_equal(fwd, naive_forward(rows, scores, gf, rounds))
    sel = d2.reverse_select(graph, fwd, budget, gr)
    order, final = naive_reverse(rows, fwd, budget, gr)
    np.testing.assert_array_equal(sel.order, order)
    np.testing.assert_array_equal(sel.final_scores, final)
    np.testing.assert_array_equal(sel.forward_scores, fwd)
    both = d2.d2_select(graph, scores, budget, gf, gr, rounds)
    np.testing.assert_array_equal(both.order, order)
    return sel


# --------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(
    n=st.integers(0, 40),
    k=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
    tied=st.booleans(),
    gf=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    gr=st.sampled_from([0.0, 0.1, 1.0, 4.0]),
    rounds=st.integers(0, 3),
    extra_budget=st.integers(-5, 3),
)
def test_matches_naive_on_random_graphs(n, k, seed, tied, gf, gr, rounds, extra_budget):
    rng = np.random.default_rng(seed)
    # "tied" draws scores and distances from a few values: exact ties exercise the
    # lowest-index rule, and gamma=0 makes every weight exactly 1.
    nb, dist = random_knn(rng, n, k, distance_values=[0.0, 0.5, 1.0] if tied else None)
    scores = rng.integers(0, 3, n).astype(float) if tied else rng.random(n) * 3
    budget = max(0, (n * 3) // 10 + extra_budget)
    assert_matches_naive(nb, dist, scores, budget, gf, gr, rounds)


@pytest.mark.parametrize("seed", range(3))
def test_matches_naive_medium_graph(seed):
    rng = np.random.default_rng(100 + seed)
    n, k = 1500, 10
    nb, dist = random_knn(rng, n, k, p_missing=0.02, p_self=0.01)
    scores = rng.random(n)
    for budget in (1, n // 10, (3 * n) // 10, n):
        sel = assert_matches_naive(nb, dist, scores, budget, 1.0, 1.0)
        assert len(sel) == budget
        assert np.unique(sel.order).size == budget


def test_full_greedy_selects_every_node_once_in_reference_order():
    rng = np.random.default_rng(7)
    nb, dist = random_knn(rng, 200, 4)
    scores = rng.random(200)
    sel = assert_matches_naive(nb, dist, scores, 10**9, 1.0, 0.4)
    assert sorted(sel.order.tolist()) == list(range(200))


def test_hand_computed_path_graph():
    # 0 - 1 - 2 with distance 0 and gamma 0: every weight is 1.
    nb = np.array([[1], [2], [-1]])
    dist = np.array([[0.0], [0.0], [np.inf]], dtype=np.float32)
    graph = d2.symmetrize_knn(nb, dist)
    assert graph.indptr.tolist() == [0, 1, 3, 4]
    assert graph.indices.tolist() == [1, 0, 2, 1]
    fwd = d2.forward_pass(graph, [1.0, 1.0, 1.0], gamma=0.0)
    assert fwd.tolist() == [2.0, 3.0, 2.0]
    sel = d2.reverse_select(graph, fwd, budget=2, gamma=0.0)
    # 1 first (3); both ends drop to 2 - 3 = -1; the tie between 0 and 2 goes to 0.
    assert sel.order.tolist() == [1, 0]
    assert sel.final_scores.tolist() == [-1.0, 3.0, -1.0]
    assert sel.mask().tolist() == [True, True, False]
    assert sel.ranks().tolist() == [1, 0, -1]
    # The whole order: 0 is picked at -1 and suppresses 2 by max(-1, 0) = 0 (the published rule
    # would have raised 2 to -1 - (-1) = 0), so 2 is picked last, still at -1.
    sel = d2.reverse_select(graph, fwd, budget=3, gamma=0.0)
    assert sel.order.tolist() == [1, 0, 2]
    assert sel.final_scores.tolist() == [-1.0, 3.0, -1.0]


def test_fixed_point_shift_and_quantization():
    assert d2.fixed_point_shift(0.0) == d2.FIXED_POINT_BITS
    assert d2.fixed_point_shift(1.0) == 43  # 1 < 2**1
    assert d2.fixed_point_shift(0.75) == 44  # 0.75 < 2**0
    assert d2.fixed_point_shift(3.0) == 42
    assert d2.fixed_point_shift(1e-320) == 1022  # capped: 2**-S stays a normal float
    rng = np.random.default_rng(0)
    for m in [1e-290, 1e-5, 0.3, 1.0, 7.5, 1e6, 2.0**100, 1e200]:
        shift = d2.fixed_point_shift(m)
        q = d2.quantize_scores(np.array([m, m * rng.random(), 0.0]), shift)
        assert q.dtype == np.int64
        assert 2**43 <= q[0] <= 2**44  # the largest score uses the 44 bits
        assert q[2] == 0
        # exact: q == floor(m * 2**S + 0.5) in Python ints
        assert int(q[0]) == math.floor(math.ldexp(m, shift) + 0.5)
        np.testing.assert_array_equal(d2.quantize_scores(d2.dequantize_scores(q, shift), shift), q)
    for bad in (-1.0, float("nan"), float("inf"), 2.0**961):
        with pytest.raises(ValueError):
            d2.fixed_point_shift(bad)


def test_fixed_point_floor_holds_a_node_pushed_far_below_zero():
    # Star: hub 0 (score 0) and 600 leaves (score 1), every weight 1. Each leaf pick suppresses
    # the hub by 2**43 (S = 43); after 512 of them it would pass -2**52: it is held at the floor.
    n_leaves = 600
    nb = np.concatenate([np.full((1, 1), -1), np.zeros((n_leaves, 1), np.int64)])
    dist = np.zeros((n_leaves + 1, 1), np.float32)
    dist[0, 0] = np.inf
    graph = d2.symmetrize_knn(nb, dist)
    fwd = np.ones(n_leaves + 1)
    fwd[0] = 0.0
    sel = d2.reverse_select(graph, fwd, n_leaves + 1, gamma=0.0)
    assert sel.order.tolist() == list(range(1, n_leaves + 1)) + [0]
    assert sel.final_scores[0] == math.ldexp(d2.FIXED_POINT_FLOOR, -43)
    order, final = naive_reverse(adjacency_from_csr(graph), fwd, n_leaves + 1, 0.0)
    np.testing.assert_array_equal(sel.order, order)
    np.testing.assert_array_equal(sel.final_scores, final)


def test_reverse_pass_spreads_selection_over_clusters():
    # Two tight clusters of 5 and one far pair; cluster A has the higher scores. Plain top-k
    # would take A only; D2 must discount A after its first pick and reach B.
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 0.01, (5, 2)), rng.normal(5, 0.01, (5, 2))])
    scores = np.array([1.0] * 5 + [0.8] * 5)
    d = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nb = np.argsort(d, axis=1)[:, :4]
    dist = np.take_along_axis(d, nb, 1).astype(np.float32)
    sel = d2.d2_select(d2.symmetrize_knn(nb, dist), scores, budget=2)
    assert set(sel.order.tolist()) & set(range(5)) and set(sel.order.tolist()) & set(range(5, 10))


def test_handbuilt_csr_with_duplicate_entries_matches_naive():
    # A CSR given directly (not via symmetrize_knn) may repeat an edge; the kernels follow the
    # stored entries, exactly like the reference does.
    indptr = np.array([0, 3, 5, 7, 7])
    indices = np.array([1, 1, 2, 0, 0, 0, 1])
    distances = np.array([0.1, 0.3, 0.2, 0.1, 0.3, 0.2, 0.5])
    graph = CSRGraph(indptr, indices, distances, 4)
    rows = adjacency_from_csr(graph)
    scores = np.array([1.0, 2.0, 0.5, 0.7])
    fwd = d2.forward_pass(graph, scores, 1.0)
    np.testing.assert_array_equal(fwd, naive_forward(rows, scores, 1.0))
    sel = d2.reverse_select(graph, fwd, 4, 1.0)
    order, final = naive_reverse(rows, fwd, 4, 1.0)
    np.testing.assert_array_equal(sel.order, order)
    np.testing.assert_array_equal(sel.final_scores, final)


# --------------------------------------------------------------------------------------------
# Graph construction
# --------------------------------------------------------------------------------------------


def test_symmetrize_drops_self_missing_and_keeps_smaller_distance():
    nb = np.array([[0, 1, -1], [0, 0, 2], [1, -1, -1], [-1, -1, -1]])
    dist = np.array(
        [[0.0, 0.5, np.inf], [0.7, 0.2, 0.3], [0.9, np.inf, np.inf], [np.inf, np.inf, np.inf]],
        dtype=np.float32,
    )
    g = d2.symmetrize_knn(nb, dist)
    assert g.n_nodes == 4
    assert g.degrees.tolist() == [1, 2, 1, 0]  # node 3 isolated
    assert g.neighbors(0)[0].tolist() == [1]
    assert g.neighbors(0)[1].tolist() == [pytest.approx(0.2)]  # min of 0.5, 0.7, 0.2
    assert g.neighbors(1)[0].tolist() == [0, 2]
    assert g.neighbors(1)[1].tolist() == [pytest.approx(0.2), pytest.approx(0.3)]
    assert g.neighbors(2)[1].tolist() == [pytest.approx(0.3)]  # min of 0.3 and 0.9
    assert g.n_edges == 2 and g.is_symmetric()
    assert g.indices.dtype == np.int32 and g.distances.dtype == np.float32


def test_symmetrize_dtypes_and_tiny_negative_distance_clamped():
    nb = np.array([[1], [0]], dtype=np.int32)
    dist = np.array([[-1e-6], [0.25]], dtype=np.float64)
    g = d2.symmetrize_knn(nb, dist)
    assert g.distances.dtype == np.float64
    assert g.distances.tolist() == [0.0, 0.0]


def test_symmetrize_hub_node_rows_sorted():
    # Everyone points at node 0: a hub with N-1 reverse entries plus its own list.
    n = 500
    nb = np.zeros((n, 3), dtype=np.int64)
    nb[:, 1] = (np.arange(n) + 1) % n
    nb[:, 2] = (np.arange(n) * 7 + 3) % n
    dist = np.ones((n, 3), dtype=np.float32)
    g = d2.symmetrize_knn(nb, dist)
    assert g.neighbors(0)[0].tolist() == list(range(1, n))
    for i in range(n):
        row = g.neighbors(i)[0]
        assert np.all(np.diff(row) > 0)
    assert g.is_symmetric()


def test_empty_and_edgeless_graphs():
    g = d2.symmetrize_knn(np.zeros((0, 5), np.int64), np.zeros((0, 5), np.float32))
    assert g.n_nodes == 0 and g.n_entries == 0 and g.indptr.tolist() == [0]
    sel = d2.d2_select(g, np.zeros(0), budget=10)
    assert sel.order.shape == (0,) and sel.forward_scores.shape == (0,)
    assert d2.cross_edge_fraction(g, np.zeros(0)) == 0.0

    g = d2.symmetrize_knn(np.zeros((4, 0), np.int64), np.zeros((4, 0), np.float32))
    assert g.n_nodes == 4 and g.n_entries == 0


def test_isolated_nodes_are_picked_by_own_score_with_index_ties():
    nb = np.full((6, 3), -1)
    dist = np.full((6, 3), np.inf, dtype=np.float32)
    g = d2.symmetrize_knn(nb, dist)
    scores = np.array([1.0, 3.0, 2.0, 3.0, 0.0, 2.0])
    fwd = d2.forward_pass(g, scores, 1.0)
    np.testing.assert_array_equal(fwd, scores)
    sel = d2.reverse_select(g, fwd, 6, 1.0)
    assert sel.order.tolist() == [1, 3, 2, 5, 0, 4]
    np.testing.assert_array_equal(sel.final_scores, scores)


@pytest.mark.parametrize(
    "nb, dist, match",
    [
        (np.array([[1], [2]]), np.array([[0.1], [0.1]], np.float32), r"neighbors\[1, 0\] = 2"),
        (np.array([[1], [-2]]), np.array([[0.1], [0.1]], np.float32), r"neighbors\[1, 0\] = -2"),
        (np.array([[1], [0]]), np.array([[0.1], [np.nan]], np.float32), r"distances\[1, 0\]"),
        (np.array([[1], [0]]), np.array([[-0.5], [0.1]], np.float32), r"distances\[0, 0\]"),
        (np.array([[1], [0]]), np.array([[0.5], [np.inf]], np.float32), r"distances\[1, 0\] = inf"),
        (np.array([[1, 0]]), np.array([[0.1]], np.float32), r"same shape"),
        (np.array([1, 0]), np.array([0.1, 0.1], np.float32), r"2-D"),
        (np.array([[1.0], [0.0]]), np.array([[0.1], [0.1]], np.float32), r"integer"),
    ],
)
def test_symmetrize_rejects_bad_input(nb, dist, match):
    with pytest.raises(ValueError, match=match):
        d2.symmetrize_knn(nb, dist)


def test_missing_entries_ignore_their_distance():
    # A -1 entry's distance is FAISS padding (inf or garbage, even NaN): never looked at.
    nb = np.array([[1, -1], [0, -1]])
    dist = np.array([[0.1, np.nan], [0.1, -5.0]], dtype=np.float32)
    assert d2.symmetrize_knn(nb, dist).n_edges == 1


def test_csrgraph_constructor_validates():
    with pytest.raises(ValueError, match="indptr must have shape"):
        CSRGraph(np.array([0, 1]), np.array([0]), np.array([0.1]), 2)
    with pytest.raises(ValueError, match="end at len"):
        CSRGraph(np.array([0, 1, 1]), np.array([1, 0]), np.array([0.1, 0.1]), 2)
    with pytest.raises(ValueError, match="decreases at node 1"):
        CSRGraph(np.array([0, 2, 1, 2]), np.array([1, 0]), np.array([0.1, 0.1]), 3)
    with pytest.raises(ValueError, match="neighbour id 5"):
        CSRGraph(np.array([0, 1, 2]), np.array([5, 0]), np.array([0.1, 0.1]), 2)
    with pytest.raises(ValueError, match="distance nan"):
        CSRGraph(np.array([0, 1, 2]), np.array([1, 0]), np.array([np.nan, 0.1]), 2)
    with pytest.raises(ValueError, match="edge entry 1 has distance inf"):
        CSRGraph(np.array([0, 1, 2]), np.array([1, 0]), np.array([0.1, np.inf]), 2)
    with pytest.raises(ValueError, match="equal length"):
        CSRGraph(np.array([0, 1, 2]), np.array([1, 0]), np.array([0.1]), 2)
    g = CSRGraph([0, 1, 2], [1, 0], np.array([0.5, 0.5], np.float32), 2)
    assert g.indptr.dtype == np.int64 and g.indices.dtype == np.int32
    assert g.distances.dtype == np.float32 and g.nbytes > 0


# --------------------------------------------------------------------------------------------
# Scores, budgets, determinism
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_graph():
    rng = np.random.default_rng(3)
    return d2.symmetrize_knn(*random_knn(rng, 30, 4))


@pytest.mark.parametrize(
    "bad, index",
    [(np.nan, 4), (-0.5, 4), (np.inf, 4), (-np.inf, 4)],
)
def test_bad_scores_name_first_bad_index(small_graph, bad, index):
    scores = np.ones(30)
    scores[index] = bad
    scores[20] = bad
    for call in (
        lambda: d2.forward_pass(small_graph, scores, 1.0),
        lambda: d2.reverse_select(small_graph, scores, 5, 1.0),
        lambda: d2.d2_select(small_graph, scores, 5),
    ):
        with pytest.raises(ValueError, match=rf"scores\[{index}\] = .*2 bad values"):
            call()


def test_score_shape_and_parameter_errors(small_graph):
    with pytest.raises(ValueError, match=r"shape \(30,\).*\(29,\)"):
        d2.forward_pass(small_graph, np.ones(29), 1.0)
    with pytest.raises(ValueError, match=r"shape \(30,\)"):
        d2.reverse_select(small_graph, np.ones((30, 1)), 3, 1.0)
    with pytest.raises(ValueError, match="numeric"):
        d2.forward_pass(small_graph, np.array(["a"] * 30), 1.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        d2.forward_pass(small_graph, np.ones(30), -1.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        d2.reverse_select(small_graph, np.ones(30), 3, float("nan"))
    with pytest.raises(ValueError, match="rounds"):
        d2.forward_pass(small_graph, np.ones(30), 1.0, rounds=-1)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        d2.reverse_select(small_graph, np.ones(30), -1, 1.0)
    with pytest.raises(ValueError, match="budget must be an integer"):
        d2.reverse_select(small_graph, np.ones(30), 2.5, 1.0)
    with pytest.raises(TypeError, match="CSRGraph"):
        d2.forward_pass({"indptr": []}, np.ones(30), 1.0)


def test_budget_edge_cases(small_graph):
    scores = np.random.default_rng(0).random(30)
    zero = d2.d2_select(small_graph, scores, 0)
    assert zero.order.shape == (0,) and zero.order.dtype == np.int64
    np.testing.assert_array_equal(zero.final_scores, zero.forward_scores)
    everything = d2.d2_select(small_graph, scores, 30)
    more = d2.d2_select(small_graph, scores, 1000)
    np.testing.assert_array_equal(everything.order, more.order)
    assert sorted(more.order.tolist()) == list(range(30))
    # A prefix of the greedy is the greedy with a smaller budget.
    part = d2.d2_select(small_graph, scores, 7, gamma_reverse=0.3)
    full = d2.d2_select(small_graph, scores, 30, gamma_reverse=0.3)
    np.testing.assert_array_equal(part.order, full.order[:7])
    # Integer and numpy-integer budgets behave the same.
    np.testing.assert_array_equal(d2.d2_select(small_graph, scores, np.int64(7), gamma_reverse=0.3).order, part.order)


def test_deterministic_and_inputs_untouched(small_graph):
    scores = np.random.default_rng(1).random(30)
    keep = scores.copy()
    a = d2.d2_select(small_graph, scores, 10, 1.0, 0.5, rounds=2)
    b = d2.d2_select(small_graph, scores, 10, 1.0, 0.5, rounds=2)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.final_scores, b.final_scores)
    np.testing.assert_array_equal(scores, keep)
    # Integer scores are accepted and converted.
    ints = np.arange(30)
    c = d2.d2_select(small_graph, ints, 5)
    np.testing.assert_array_equal(c.order, d2.d2_select(small_graph, ints.astype(float), 5).order)


def test_forward_rounds_extension():
    # Path 0-1-2, weights 1: round 1 = s + neighbours; round 2 uses round-1 neighbours.
    g = d2.symmetrize_knn(np.array([[1], [2], [-1]]), np.zeros((3, 1), np.float32))
    s = np.array([1.0, 2.0, 4.0])
    np.testing.assert_array_equal(d2.forward_pass(g, s, 0.0, rounds=0), s)
    r1 = d2.forward_pass(g, s, 0.0, rounds=1)
    assert r1.tolist() == [3.0, 7.0, 6.0]
    r2 = d2.forward_pass(g, s, 0.0, rounds=2)
    assert r2.tolist() == [1 + 7, 2 + 3 + 6, 4 + 7]


def test_budget_for():
    assert d2.budget_for(100, 0.7) == 30
    assert d2.budget_for(10, 0.0) == 10
    assert d2.budget_for(10, 1.0) == 0
    assert d2.budget_for(0, 0.5) == 0
    assert d2.budget_for(12_800_000, 0.7) == 3_840_000
    with pytest.raises(ValueError, match="prune_rate"):
        d2.budget_for(10, 1.5)
    with pytest.raises(ValueError, match="n must be"):
        d2.budget_for(-1, 0.5)


# --------------------------------------------------------------------------------------------
# Helpers for the coordinator
# --------------------------------------------------------------------------------------------


def test_prefilter_mask_drops_lowest_with_index_ties():
    scores = np.array([0.5, 0.1, 0.1, 0.9, 0.1, 0.3])
    keep = d2.prefilter_mask(scores, 0.5)  # drop round(3) = 3
    # The three 0.1s are the lowest; all go.
    assert keep.tolist() == [True, False, False, True, False, True]
    keep = d2.prefilter_mask(scores, 0.34)  # drop round(2.04) = 2: among the tied 0.1s, the higher ids go
    assert keep.tolist() == [True, True, False, True, False, True]
    assert d2.prefilter_mask(scores, 0.0).all()
    assert d2.prefilter_mask(np.zeros(0), 0.5).shape == (0,)
    with pytest.raises(ValueError, match="beta"):
        d2.prefilter_mask(scores, 1.0)
    with pytest.raises(ValueError, match=r"scores\[2\] is NaN"):
        d2.prefilter_mask(np.array([1.0, 2.0, np.nan]), 0.1)


def test_shift_nonnegative():
    s, off = d2.shift_nonnegative(np.array([0.2, -0.3, 0.1]))
    assert off == pytest.approx(0.3) and s.min() == 0.0 and s.dtype == np.float64
    s, off = d2.shift_nonnegative(np.array([0.2, 0.5]))
    assert off == pytest.approx(-0.2) and s.tolist() == [0.0, pytest.approx(0.3)]
    s, off = d2.shift_nonnegative(np.array([0.2, -0.3]), offset=1.0)
    assert off == 1.0 and s.tolist() == [pytest.approx(1.2), pytest.approx(0.7)]
    assert d2.shift_nonnegative(np.zeros(0)) == (pytest.approx(np.zeros(0)), 0.0)
    with pytest.raises(ValueError, match=r"scores\[1\] \+ offset 0.1"):
        d2.shift_nonnegative(np.array([0.2, -0.3]), offset=0.1)
    with pytest.raises(ValueError, match=r"scores\[0\] = nan is not finite"):
        d2.shift_nonnegative(np.array([np.nan, 0.0]))


def test_subgraph_matches_naive_induced_graph():
    rng = np.random.default_rng(11)
    nb, dist = random_knn(rng, 80, 5)
    g = d2.symmetrize_knn(nb, dist)
    ids = np.sort(rng.choice(80, 30, replace=False))
    sg = d2.subgraph(g, ids)
    new_of = {int(old): new for new, old in enumerate(ids)}
    adj = naive_adjacency(nb, dist)
    assert sg.n_nodes == 30 and sg.is_symmetric()
    for new, old in enumerate(ids):
        expected = sorted((new_of[j], d) for j, d in adj[int(old)].items() if j in new_of)
        got = adjacency_from_csr(sg)[new]
        assert [j for j, _ in got] == [j for j, _ in expected]
        np.testing.assert_allclose([d for _, d in got], [d for _, d in expected], rtol=1e-6)
    # Unsorted ids relabel in the given order.
    perm = ids[::-1].copy()
    sg2 = d2.subgraph(g, perm)
    assert sg2.n_entries == sg.n_entries and sg2.is_symmetric()
    assert d2.subgraph(g, np.zeros(0, np.int64)).n_nodes == 0
    assert g.known_symmetric and sg.known_symmetric and sg2.known_symmetric
    assert not CSRGraph(g.indptr, g.indices, g.distances, g.n_nodes).known_symmetric  # not checked
    with pytest.raises(ValueError, match=r"node_ids\[1\] = 80"):
        d2.subgraph(g, np.array([0, 80]))
    with pytest.raises(ValueError, match="repeats node 3"):
        d2.subgraph(g, np.array([3, 4, 3]))


def test_cross_edge_fraction_matches_count():
    rng = np.random.default_rng(5)
    nb, dist = random_knn(rng, 60, 4)
    g = d2.symmetrize_knn(nb, dist)
    labels = rng.integers(0, 3, 60)
    adj = naive_adjacency(nb, dist)
    pairs = [(i, j) for i in adj for j in adj[i]]
    expected = sum(labels[i] != labels[j] for i, j in pairs) / len(pairs)
    assert d2.cross_edge_fraction(g, labels) == pytest.approx(expected)
    assert d2.cross_edge_fraction(g, np.zeros(60)) == 0.0
    with pytest.raises(ValueError, match=r"labels must have shape \(60,\)"):
        d2.cross_edge_fraction(g, np.zeros(59))


def test_graph_and_selection_pickle_roundtrip(small_graph):
    # Ray ships graphs and selections between processes by pickling.
    import pickle

    g = pickle.loads(pickle.dumps(small_graph))
    for name in ("indptr", "indices", "distances"):
        np.testing.assert_array_equal(getattr(g, name), getattr(small_graph, name))
    assert g.n_nodes == small_graph.n_nodes
    assert g.known_symmetric  # built by symmetrize_knn: symmetric by construction, kept by pickle
    sel = d2.d2_select(small_graph, np.arange(30, dtype=float), 5)
    back = pickle.loads(pickle.dumps(sel))
    np.testing.assert_array_equal(back.order, sel.order)
    np.testing.assert_array_equal(back.final_scores, sel.final_scores)
