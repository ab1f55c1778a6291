"""Cell-sharded IVF-Flat (pipeline.ivf): pure maths, no Ray, no storage."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.core import ivf
from pipeline.core.knn import exact_knn, merge_topk, prepare_vectors, recall_at_k, recall_sample_ids, remove_self
from pipeline.testing import clip_like_vectors


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return prepare_vectors(x, None)


def single_list_major(x: np.ndarray, centroids: np.ndarray, k: int, nprobe: int):
    """The graph list by list without groups: each list's members (ascending id) searched by the
    queries probing it (ascending id) in one faiss.knn, every query's candidates merged, self dropped."""
    home, probes = ivf.probe_lists(centroids, x, nprobe)
    ids = np.arange(len(x), dtype=np.int64)
    best_d = np.full((len(x), k + 1), np.inf, np.float32)
    best_i = np.full((len(x), k + 1), -1, np.int64)
    for lst in np.unique(home):
        base = ids[home == lst]
        queries = ids[(probes == lst).any(axis=1)]
        d, local = faiss.knn(x[queries], x[base], min(k + 1, len(base)))
        best_d[queries], best_i[queries] = merge_topk(best_d[queries], best_i[queries], d, base[local], k + 1)
    neighbors, sq_distances = remove_self(best_i, best_d, ids, k)
    return neighbors, sq_distances, home


# ------------------------------------------------------------------------------------------------
# sizing and training
# ------------------------------------------------------------------------------------------------

def test_nlist_grows_as_four_sqrt_n_without_a_training_cap():
    assert ivf.nlist_for(10**6) == 4000
    assert ivf.nlist_for(10**8) == 40_000
    assert ivf.nlist_for(10**9) == 126_491
    assert ivf.nlist_for(1) == 1 and ivf.nlist_for(9) == 9  # never more lists than vectors
    assert ivf.nlist_for(1000, nlist=1000) == 1000
    with pytest.raises(ValueError, match="graph.nlist=1001"):
        ivf.nlist_for(1000, nlist=1001)
    with pytest.raises(ValueError, match="graph.nlist"):
        ivf.nlist_for(1000, nlist=0)
    assert ivf.coarse_count(126_491) == 356 and ivf.coarse_count(4000) == 64 and ivf.coarse_count(1) == 1


def test_training_samples_are_seeded_nested_and_sized_by_nlist():
    coarse, fine = ivf.training_sample_ids(10**6, 4000, seed=3)
    assert len(fine) == ivf.FINE_POINTS_PER_LIST * 4000 and len(coarse) == ivf.COARSE_POINTS_PER_CENTROID * 64
    assert (np.diff(fine) > 0).all() and (np.diff(coarse) > 0).all() and np.isin(coarse, fine).all()
    again = ivf.training_sample_ids(10**6, 4000, seed=3)
    assert np.array_equal(again[0], coarse) and np.array_equal(again[1], fine)
    assert not np.array_equal(ivf.training_sample_ids(10**6, 4000, seed=4)[1], fine)
    small = ivf.training_sample_ids(5000, 283, seed=3)  # the pool is smaller than 64 * nlist: all of it
    assert np.array_equal(small[1], np.arange(5000))
    assert len(ivf.training_sample_ids(10**6, 4000, seed=3, train_size=50_000)[1]) == 50_000
    with pytest.raises(ValueError, match="graph.train_size=100"):
        ivf.training_sample_ids(10**6, 4000, seed=3, train_size=100)


def test_fine_counts_sum_to_nlist_proportionally_with_one_per_nonempty_cell():
    assert ivf.fine_counts([10, 0, 30, 60], 10).tolist() == [1, 0, 3, 6]
    assert ivf.fine_counts([1, 1, 1, 97], 10).tolist() == [1, 1, 1, 7]  # floors of 1 paid by the big cell
    assert ivf.fine_counts([1, 1, 1], 4).tolist() == [2, 1, 1]  # equal remainders: lower cell id
    assert ivf.fine_counts([5, 3, 2], 7).tolist() == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: largest remainder .5
    rng = np.random.default_rng(0)
    for trial in range(60):
        sizes = rng.integers(1, 2000, size=int(rng.integers(1, 60)))
        sizes[rng.random(len(sizes)) < 0.2] = 0
        sizes[rng.random(len(sizes)) < 0.1] = 1  # tiny cells that need the floor of one list
        if sizes.sum() == 0:
            continue
        nlist = int(rng.integers((sizes > 0).sum(), 5 * len(sizes) + 2))
        counts = ivf.fine_counts(sizes, nlist)
        assert counts.sum() == nlist
        assert (counts[sizes > 0] >= 1).all() and (counts[sizes == 0] == 0).all()
        quota = nlist * sizes / sizes.sum()
        assert (counts[counts > 1] < quota[counts > 1] + 1).all()  # never a list more than its quota
        if (quota[sizes > 0] >= 1).all():  # no floor needed: plain largest remainder
            assert (np.abs(counts - quota) < 1).all()
        assert np.array_equal(counts, ivf.fine_counts(sizes, nlist))
    with pytest.raises(ValueError, match="non-empty"):
        ivf.fine_counts([1, 1, 1], 2)


def test_fine_level_handles_small_cells_deterministically():
    pts = clustered(5, 8, clusters=2, seed=1)
    assert ivf.fine_level(pts, 0, seed=0).shape == (0, 8)
    assert np.allclose(ivf.fine_level(pts, 1, seed=0)[0], pts.mean(axis=0), atol=1e-6)
    assert np.array_equal(ivf.fine_level(pts, 5, seed=0), pts)
    padded = ivf.fine_level(pts, 12, seed=0)
    assert padded.shape == (12, 8) and np.array_equal(padded[:5], pts)
    assert len(np.unique(padded, axis=0)) == 12  # every extra centroid is distinct ...
    assert np.allclose(padded[5:], pts[np.arange(7) % 5], atol=0.01)  # ... and splits off a point
    assert np.array_equal(padded, ivf.fine_level(pts, 12, seed=9))
    with pytest.raises(ValueError, match="no training points"):
        ivf.fine_level(pts[:0], 2, seed=0)
    many = clustered(400, 8, clusters=4, seed=2)
    assert np.array_equal(ivf.fine_level(many, 6, seed=1), ivf.fine_level(many, 6, seed=1))


def test_two_level_training_is_deterministic_and_numbers_lists_by_coarse_cell():
    x = clustered(6000, 16, clusters=20, seed=3)
    a, owner, coarse = ivf.train_two_level(x, 150, seed=2)
    b, owner_b, coarse_b = ivf.train_two_level(x, 150, seed=2)
    assert a.shape == (150, 16) and a.dtype == np.float32
    assert coarse.shape == (ivf.coarse_count(150), 16) and np.array_equal(coarse, coarse_b)
    assert np.array_equal(a, b) and np.array_equal(owner, owner_b)
    assert (np.diff(owner) >= 0).all() and owner.max() + 1 == ivf.coarse_count(150)  # adjacent by cell
    assert not np.array_equal(ivf.train_two_level(x, 150, seed=3)[0], a)
    home, _ = ivf.probe_lists(a, x, 1)
    assert len(np.unique(home)) > 140  # the centroids really split the pool


# ------------------------------------------------------------------------------------------------
# assignment and groups
# ------------------------------------------------------------------------------------------------

def test_probes_through_the_coarse_level_equal_exhaustive_ones_where_they_must():
    """A vector's probes found through its routed coarse cells are the exhaustive ones whenever its
    exhaustive probes all lie in those cells (the same lists up to exact distance ties), and always
    when every cell is routed; a vector whose routed cells hold fewer than nprobe lists gets the
    exhaustive probes. Batch-invariant, as the exhaustive rule."""
    x = clustered(3000, 24, clusters=10, seed=4)
    centroids, cell, coarse = ivf.train_two_level(x, 60, seed=0)
    nprobe, k1 = 8, len(coarse)
    _, exhaustive = ivf.probe_lists(centroids, x, nprobe)
    d64 = ((x[:, None, :].astype(np.float64) - centroids[None, :, :]) ** 2).sum(-1)

    def same_lists(rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Rows whose probes are the same lists, or lists at the same float64 distances (ties)."""
        da, db = np.take_along_axis(d64[rows], a.astype(np.int64), 1), np.take_along_axis(d64[rows], b.astype(np.int64), 1)
        return (np.sort(a, 1) == np.sort(b, 1)).all(1) | np.isclose(np.sort(da, 1), np.sort(db, 1), rtol=1e-5).all(1)

    for routed in (2, 3, k1):
        home, probes = ivf.probe_lists_two_level(coarse, centroids, cell, x, nprobe, routed)
        assert probes.dtype == np.int32 and probes.shape == (3000, nprobe) and np.array_equal(home, probes[:, 0])
        assert all(len(set(row)) == nprobe for row in probes.tolist())
        assert (np.diff(np.take_along_axis(d64, probes.astype(np.int64), 1), axis=1) >= -1e-6).all()  # nearest first
        cells = np.unique(cell)
        _, routed_cells = ivf.probe_lists(coarse[cells], x, min(routed, len(cells)))
        inside = (cells[routed_cells][:, None, :] == cell[exhaustive][:, :, None]).any(axis=2).all(axis=1)
        must = inside if routed < k1 else np.ones(3000, bool)
        assert must.sum() > 1000  # the check is not vacuous
        assert same_lists(must, probes[must], exhaustive[must]).all()
        assert (probes[must] == exhaustive[must]).all(1).mean() > 0.99  # ties aside, in the same order
        if routed < k1:  # elsewhere a probe may differ; routing through 3 of 8 cells finds most of them
            overlap = np.mean([len(set(a) & set(b)) for a, b in zip(probes.tolist(), exhaustive.tolist())]) / nprobe
            assert overlap > (0.9 if routed == 3 else 0.8), overlap
        for lo, hi in [(0, 1), (7, 30), (100, 2900), (2990, 3000)]:
            assert np.array_equal(ivf.probe_lists_two_level(coarse, centroids, cell, x[lo:hi], nprobe, routed)[1],
                                  probes[lo:hi])
    # one routed cell of ~7 lists cannot give 8 probes: those vectors get the exhaustive probes
    _, one = ivf.probe_lists_two_level(coarse, centroids, cell, x, nprobe, 1)
    lists_per_cell = np.bincount(cell)
    _, first = ivf.probe_lists(coarse[np.unique(cell)], x, 1)
    short = lists_per_cell[np.unique(cell)[first[:, 0]]] < nprobe
    assert short.any() and np.array_equal(one[short], exhaustive[short])
    half = x.astype(np.float16)
    assert np.array_equal(ivf.probe_lists_two_level(coarse, centroids, cell, half, nprobe)[1],
                          ivf.probe_lists_two_level(coarse, centroids, cell, half.astype(np.float32), nprobe)[1])
    with pytest.raises(ValueError, match="graph.nprobe=61"):
        ivf.probe_lists_two_level(coarse, centroids, cell, x, 61)
    with pytest.raises(ValueError, match="coarse_cell"):
        ivf.probe_lists_two_level(coarse, centroids, cell[::-1], x, nprobe)
    assert ivf.coarse_probes_for(16) == ivf.COARSE_PROBES and ivf.coarse_probes_for(64) == 16


def test_probe_lists_home_is_nearest_and_batch_invariant():
    x = clustered(3000, 24, clusters=10, seed=4)
    centroids, _, _ = ivf.train_two_level(x, 60, seed=0)
    home, probes = ivf.probe_lists(centroids, x, 8)
    assert home.dtype == np.int32 and probes.dtype == np.int32 and probes.shape == (3000, 8)
    assert np.array_equal(home, probes[:, 0])
    assert all(len(set(row)) == 8 for row in probes[:200].tolist())
    d = ((x[:, None, :] - centroids[probes][:, :, :]) ** 2).sum(-1)
    assert (np.diff(d, axis=1) >= -1e-5).all()  # nearest first
    # the same rows give the same probes in any batch (tiny batches take another FAISS path unpadded)
    for lo, hi in [(0, 1), (7, 30), (100, 2900), (2990, 3000)]:
        assert np.array_equal(ivf.probe_lists(centroids, x[lo:hi], 8)[1], probes[lo:hi])
    half = x.astype(np.float16)
    assert np.array_equal(ivf.probe_lists(centroids, half, 8)[1],
                          ivf.probe_lists(centroids, half.astype(np.float32), 8)[1])
    with pytest.raises(ValueError, match="graph.nprobe=61"):
        ivf.probe_lists(centroids, x, 61)  # not clamped to nlist
    with pytest.raises(ValueError, match="graph.nprobe"):
        ivf.probe_lists(centroids, x, 0)


def test_group_cells_are_contiguous_bounded_and_deterministic():
    sizes = np.array([5, 5, 5, 30, 2, 2, 2, 2, 9])
    probes = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1])
    groups = ivf.group_cells(sizes, probes, 15)
    assert groups.tolist() == [0, 0, 1, 2, 3, 3, 3, 3, 4]  # the 31-row list sits alone
    assert ivf.group_rows(groups, sizes, probes).tolist() == [12, 6, 31, 12, 10]
    rng = np.random.default_rng(5)
    sizes, probes = rng.integers(0, 100, 500), rng.integers(0, 800, 500)
    for bound in (1, 300, 2000, 10**9):
        g = ivf.group_cells(sizes, probes, bound)
        assert g[0] == 0 and set(np.diff(g).tolist()) <= {0, 1}  # contiguous runs, numbered in order
        rows = ivf.group_rows(g, sizes, probes)
        lists_per_group = np.bincount(g)
        assert ((rows <= bound) | (lists_per_group == 1)).all()
        assert np.array_equal(g, ivf.group_cells(sizes, probes, bound))
    assert ivf.group_cells(sizes, probes, 10**9).max() == 0
    assert ivf.group_cells(sizes + 1, probes, 1).tolist() == list(range(500))  # one list per group
    with pytest.raises(ValueError, match="max_rows_per_group"):
        ivf.group_cells(sizes, probes, 0)


def test_probes_by_group_sends_each_query_once_per_group_with_its_probes():
    rng = np.random.default_rng(6)
    probes = np.stack([rng.permutation(40)[:6] for _ in range(300)]).astype(np.int32)
    list_group = ivf.group_cells(np.full(40, 10), np.full(40, 10), 75)
    q, g, p = ivf.probes_by_group(probes, list_group)
    assert (np.diff(g) >= 0).all() and all((np.diff(q[g == j]) > 0).all() for j in np.unique(g))
    rebuilt = np.full_like(probes, -1)
    for qi, gi, row in zip(q, g, p):
        inside = row >= 0
        assert inside.any() and (list_group[row[inside]] == gi).all()
        assert (rebuilt[qi][inside] == -1).all()  # each probe slot sent exactly once
        rebuilt[qi][inside] = row[inside]
    assert np.array_equal(rebuilt, probes)
    assert len(q) == sum(len(np.unique(list_group[row])) for row in probes)


def _probes_by_group_lexsort(probes, list_group):
    """The first implementation (a lexsort of (group, query) over every probe): the reference."""
    n, nprobe = probes.shape
    flat_q = np.repeat(np.arange(n, dtype=np.int64), nprobe)
    flat_g = np.asarray(list_group, np.int64)[probes].ravel()
    order = np.lexsort((flat_q, flat_g))
    sq, sg = flat_q[order], flat_g[order]
    new = np.ones(len(order), bool)
    new[1:] = (sq[1:] != sq[:-1]) | (sg[1:] != sg[:-1])
    pair_probes = np.full((int(new.sum()), nprobe), -1, np.int32)
    pair_probes[np.cumsum(new) - 1, order % nprobe] = probes.ravel()[order]
    return sq[new], sg[new].astype(np.int32), pair_probes


@pytest.mark.parametrize("n_lists,n_groups", [(40, 7), (300_000, 70_000)])  # radix (16-bit) and wide keys
def test_probes_by_group_equals_the_lexsort_whole_and_by_wave(n_lists, n_groups):
    rng = np.random.default_rng(8)
    probes = rng.integers(0, n_lists, size=(5_000, 16)).astype(np.int32)
    list_group = np.sort(rng.integers(0, n_groups, n_lists)).astype(np.int32)
    want = _probes_by_group_lexsort(probes, list_group)
    got = ivf.probes_by_group(probes, list_group)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    cuts = np.unique(np.r_[0, rng.integers(0, n_groups, 4), n_groups, n_groups + 3])
    for lo, hi in zip(cuts[:-1], cuts[1:]):  # one wave's groups: the whole result's entries for them
        keep = (want[1] >= lo) & (want[1] < hi)
        got = ivf.probes_by_group(probes, list_group, (int(lo), int(hi)))
        for a, b in zip(got, want):
            assert np.array_equal(a, b[keep])


# ------------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------------

def test_search_group_pads_ignores_foreign_probes_and_rejects_repeated_queries():
    base = np.array([[0.0, 0], [1, 0], [0, 3], [5, 5]], np.float32)
    d, i = ivf.search_group(np.array([10, 11, 12, 13]), base.astype(np.float16), np.array([0, 0, 1, 2]),
                            np.array([11, 12]), base[[1, 2]], np.array([[0, -1, 2], [-1, -1, 1]]), kk=3)
    assert i.tolist() == [[11, 10, 13], [12, -1, -1]]  # list 1 (probed only by query 12) is not searched for 11
    assert d[0].tolist() == [0.0, 1.0, 41.0] and d[1, 0] == 0 and np.isinf(d[1, 1:]).all()
    with pytest.raises(ValueError, match="twice"):
        ivf.search_group(np.array([10]), base[:1], np.array([0]), np.array([3, 3]), base[:2],
                         np.array([[0], [0]]), kk=1)


@pytest.mark.parametrize("block", [65_536, 7, 1])
def test_search_group_keeps_a_row_per_pair_and_reduces_queries_block_by_block(monkeypatch, block):
    """Candidates are kept per (query, probed list) pair and each query's top-kk is taken a block of
    queries at a time: whatever the block, the result is the lexicographic (distance, id) top-kk of
    the query's probed lists here (integer vectors: exact distances, many ties)."""
    monkeypatch.setattr(ivf, "REDUCE_QUERY_BLOCK", block)
    rng = np.random.default_rng(21)
    base = rng.integers(0, 3, (600, 8)).astype(np.float32)
    base_ids = rng.permutation(10_000)[:600]
    base_lists = rng.integers(0, 30, 600)
    queries = rng.integers(0, 3, (250, 8)).astype(np.float32)
    query_ids = rng.permutation(5000)[:250]
    probes = np.stack([rng.permutation(40)[:6] for _ in range(250)])  # lists 30..39: in other groups
    probes[probes >= 30] = -1
    probes[::17] = -1  # queries with no probe here at all
    kk = 9
    d, i = ivf.search_group(base_ids, base, base_lists, query_ids, queries, probes, kk)
    for q in range(250):
        mine = np.isin(base_lists, probes[q][probes[q] >= 0])
        dist = ((base[mine] - queries[q]) ** 2).sum(axis=1)
        order = np.lexsort((base_ids[mine], dist))[:kk]
        want_d = np.full(kk, np.inf, np.float32)
        want_i = np.full(kk, -1, np.int64)
        want_d[:len(order)], want_i[:len(order)] = dist[order], base_ids[mine][order]
        assert np.array_equal(d[q], want_d) and np.array_equal(i[q], want_i), q


def test_grouped_search_equals_single_list_major_bit_for_bit():
    x = clustered(4000, 32, clusters=25, seed=7)
    centroids, _, _ = ivf.train_two_level(x, 70, seed=1)
    reference = single_list_major(x, centroids, 10, 6)  # pipeline.graph's list-major search
    n_groups = set()
    for bound in (10**9, 20_000, 3000, 1):  # 1 group, a few, many, one list per group
        timings = {}
        out = ivf.sharded_knn_graph(x, 10, nprobe=6, centroids=centroids, max_rows_per_group=bound, timings=timings)
        n_groups.add(timings["groups"])
        for a, b in zip(out, reference):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert {1, 70} <= n_groups and len(n_groups) == 4


def test_search_group_result_does_not_depend_on_arrival_order():
    x = clustered(1500, 16, clusters=8, seed=14)
    centroids, _, _ = ivf.train_two_level(x, 25, seed=0)
    home, probes = ivf.probe_lists(centroids, x, 4)
    ids = np.arange(1500)
    d, i = ivf.search_group(ids, x, home, ids, x, probes, 7)
    rng = np.random.default_rng(14)
    b, q = rng.permutation(1500), rng.permutation(1500)
    d2, i2 = ivf.search_group(ids[b], x[b], home[b], ids[q], x[q], probes[q], 7)
    assert np.array_equal(d2, d[q]) and np.array_equal(i2, i[q])


def test_raw_float16_embeddings_prepared_per_list_equal_prepared_vectors():
    """A task may hold the parts' raw float16 embeddings and prepare (normalise) them list by list."""
    raw = (3 * clustered(1200, 16, clusters=6, seed=15)).astype(np.float16)
    x = prepare_vectors(raw, None)
    centroids, _, _ = ivf.train_two_level(x, 20, seed=0)
    prep = lambda rows: prepare_vectors(rows, None)  # noqa: E731
    home, probes = ivf.probe_lists(centroids, x, 4)
    home_raw, probes_raw = ivf.probe_lists(centroids, raw, 4, prepare=prep)
    assert np.array_equal(probes_raw, probes)
    ids = np.arange(1200)
    d, i = ivf.search_group(ids, x, home, ids, x, probes, 5)
    d_raw, i_raw = ivf.search_group(ids, raw, home, ids, raw, probes, 5, prepare=prep)
    assert np.array_equal(d_raw, d) and np.array_equal(i_raw, i)


def test_grouping_invariance_with_ties_and_float16_base():
    """Exact duplicates tie at equal distance (ties go to the lower id in every grouping), and
    float16 vectors, converted per list, give what their float32 values give."""
    base = clustered(700, 16, clusters=6, seed=8)
    x = np.repeat(base, 3, axis=0)[np.random.default_rng(8).permutation(2100)].astype(np.float16)
    centroids, _, _ = ivf.train_two_level(x, 30, seed=0)
    ref = ivf.sharded_knn_graph(x.astype(np.float32), 4, nprobe=5, centroids=centroids, max_rows_per_group=10**9)
    for bound in (10**9, 2000, 1):
        out = ivf.sharded_knn_graph(x, 4, nprobe=5, centroids=centroids, max_rows_per_group=bound)
        for a, b in zip(out, ref):
            assert np.array_equal(a, b)
    nb, d, _ = ref
    ids = np.arange(2100)
    assert not (nb == ids[:, None]).any()
    dup = (d[:, :2] == 0).all(axis=1)  # both duplicates found: they come first, lower id first
    assert dup.mean() > 0.95 and (nb[dup, 0] < nb[dup, 1]).all()


def test_all_lists_probed_equals_exact_knn():
    x = clustered(2500, 24, clusters=12, seed=9)
    nb, d, cells = ivf.sharded_knn_graph(x, 8, nlist=30, nprobe=30, max_rows_per_group=5000)
    en, ed = exact_knn(x, 8)
    assert np.array_equal(nb, en)
    assert np.allclose(d, ed, atol=1e-5)
    assert cells.dtype == np.int32 and len(np.unique(cells)) > 20


def test_padding_and_self_removal_with_few_nodes():
    x = clustered(5, 8, clusters=2, seed=10)
    nb, d, _ = ivf.sharded_knn_graph(x, 6, nlist=2, nprobe=2)
    assert (nb[:, :4] >= 0).all() and (nb[:, 4:] == -1).all() and np.isinf(d[:, 4:]).all()
    assert not (nb == np.arange(5)[:, None]).any()
    with pytest.raises(ValueError, match="graph.nprobe=3"):
        ivf.sharded_knn_graph(x, 2, nlist=2, nprobe=3)


def test_sharded_graph_is_deterministic_for_a_seed():
    x = clustered(3000, 16, clusters=10, seed=11)
    a = ivf.sharded_knn_graph(x, 5, nprobe=4, seed=1, max_rows_per_group=5000)
    b = ivf.sharded_knn_graph(x, 5, nprobe=4, seed=1, max_rows_per_group=40_000)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_recall_on_clustered_512d_matches_one_level_kmeans_and_exhaustive_assignment():
    n, k, nprobe, seed = 20_000, 10, 16, 0
    x = prepare_vectors(clip_like_vectors(n, 512, seed=12), None)
    sample = recall_sample_ids(n, 1500, seed)
    exact, _ = exact_knn(x, k, sample)
    nb, _, _ = ivf.sharded_knn_graph(x, k, nprobe=nprobe, seed=seed, max_rows_per_group=100_000)
    two_level = recall_at_k(nb[sample], exact)
    # the probes found through the coarse level hold the recall of comparing every vector with every list
    nb_all, _, _ = ivf.sharded_knn_graph(x, k, nprobe=nprobe, seed=seed, max_rows_per_group=100_000,
                                         exhaustive_assign=True)
    exhaustive_assign = recall_at_k(nb_all[sample], exact)
    assert two_level >= exhaustive_assign - 0.01, (two_level, exhaustive_assign)
    # FAISS IndexIVFFlat with one-level k-means on the same training sample, same nlist and nprobe
    nlist = ivf.nlist_for(n)
    _, fine = ivf.training_sample_ids(n, nlist, seed)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(512), 512, nlist, faiss.METRIC_L2)
    index.cp.seed, index.cp.niter = seed, ivf.KMEANS_ITERATIONS
    index.cp.max_points_per_centroid = max(256, -(-len(fine) // nlist))  # the whole sample, as the stage
    index.train(x[fine])
    index.add(x)
    index.nprobe = nprobe
    d, i = index.search(x[sample], k + 1)
    one_level = recall_at_k(remove_self(i, d, sample, k)[0], exact)
    assert two_level >= 0.95
    assert two_level >= one_level - 0.01, (two_level, one_level)


def test_thread_count_does_not_change_the_graph():
    x = clustered(3000, 32, clusters=15, seed=13)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = ivf.sharded_knn_graph(x, 6, nprobe=5, max_rows_per_group=8000)
    finally:
        faiss.omp_set_num_threads(threads)
    faiss.omp_set_num_threads(max(2, threads))
    try:
        many = ivf.sharded_knn_graph(x, 6, nprobe=5, max_rows_per_group=8000)
    finally:
        faiss.omp_set_num_threads(threads)
    for u, v in zip(one, many):
        assert np.array_equal(u, v)
