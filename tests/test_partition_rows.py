"""A partition's rows built from edge records (pipeline.core.partition.PartitionRows) against
symmetrize_knn on the whole graph, on inputs large enough that the fill runs in several passes and
several row blocks (FILL_PASS_RECORDS, FILL_BLOCK_BITS), with repeated neighbours and hubs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import d2
from pipeline.core.partition import FILL_BLOCK_BITS, FILL_PASS_RECORDS, PartitionRows
from pipeline.select.shuffle import partition_records


def _graph(n: int, k: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    nb = rng.integers(0, n, size=(n, k))
    nb[:, 0] = rng.integers(0, 5, n)  # hubs: every node names one of 5
    nb[rng.random((n, k)) < 0.05] = -1
    nb[::7, 1] = nb[::7, 2]  # repeated neighbours in a list
    dist = rng.choice(np.array([0.25, 0.5, 1.0, 2.0], np.float32), size=(n, k))  # ties
    return nb, dist


def _records(nb, dist):
    n, k = nb.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    nbrs = nb.reshape(-1).astype(np.int64)
    d = dist.reshape(-1)
    keep = (nbrs >= 0) & (nbrs != rows)
    return rows[keep], nbrs[keep], d[keep]


def _assert_rows_equal(built: PartitionRows, graph, owned):
    for pos, node in enumerate(owned.tolist()):
        a, b = built.indptr[pos], built.indptr[pos + 1]
        c, e = graph.indptr[node], graph.indptr[node + 1]
        np.testing.assert_array_equal(built.ent_id[a:b], graph.indices[c:e])
        np.testing.assert_array_equal(built.ent_dist[a:b], graph.distances[c:e])


@pytest.mark.parametrize("chunks", [1, 3])
def test_one_partition_rows_are_symmetrize_knns_rows(chunks):
    n, k = 160_000, 10
    nb, dist = _graph(n, k)
    rows, nbrs, d = _records(nb, dist)
    assert rows.size > FILL_PASS_RECORDS and n >> FILL_BLOCK_BITS >= 2  # several passes and blocks
    cuts = np.linspace(0, rows.size, chunks + 1).astype(int)
    sources = [lambda full, a=a, b=b: (rows[a:b], nbrs[a:b], d[a:b] if full else None, None)
               for a, b in zip(cuts[:-1], cuts[1:])]
    built = PartitionRows(0, 1, n, np.arange(n, dtype=np.int64)).build(sources)
    graph = d2.symmetrize_knn(nb, dist)
    np.testing.assert_array_equal(built.indptr, graph.indptr)
    np.testing.assert_array_equal(built.ent_id, graph.indices)
    np.testing.assert_array_equal(built.ent_dist, graph.distances)


@pytest.mark.parametrize("budget_chunks", [0, 1, 3])
def test_records_read_once_under_a_budget_give_the_same_rows(budget_chunks):
    """select.shuffle._read_once: a partition whose records fit the byte budget reads each chunk once
    (the counting pass reads it whole and keeps it); one that does not keeps none, all read twice
    (a chunk kept before the budget ran out is read again too); the rows do not depend on it."""
    from pipeline.select.shuffle import _read_once

    n, k = 20_000, 6
    nb, dist = _graph(n, k, seed=9)
    rows, nbrs, d = _records(nb, dist)
    cuts = np.linspace(0, rows.size, 4).astype(int)
    reads: list[tuple[int, bool]] = []

    def source(full, i, a, b):
        reads.append((i, full))
        return rows[a:b].copy(), nbrs[a:b].copy(), d[a:b].copy() if full else None, None

    chunk_bytes = max(20 * (b - a) for a, b in zip(cuts[:-1], cuts[1:]))
    sources = _read_once([lambda full, i=i, a=a, b=b: source(full, i, a, b)
                          for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))], budget=budget_chunks * chunk_bytes)
    built = PartitionRows(0, 1, n, np.arange(n, dtype=np.int64)).build(sources)
    graph = d2.symmetrize_knn(nb, dist)
    np.testing.assert_array_equal(built.indptr, graph.indptr)
    np.testing.assert_array_equal(built.ent_id, graph.indices)
    np.testing.assert_array_equal(built.ent_dist, graph.distances)
    read_once = budget_chunks == 3
    assert len(reads) == (3 if read_once else 6)


def test_each_partitions_rows_are_symmetrize_knns_rows_of_its_nodes():
    n, k, parts = 150_000, 10, 3
    nb, dist = _graph(n, k, seed=5)
    label = np.random.default_rng(1).integers(0, parts, n).astype(np.int32)
    rows, nbrs, d = _records(nb, dist)
    dest, row, nbr, dd, owner = partition_records(rows, nbrs, d, label[rows], label[nbrs])
    graph = d2.symmetrize_knn(nb, dist)
    for p in range(parts):
        mine = dest == p
        r, q, x, o = row[mine], nbr[mine], dd[mine], owner[mine]
        owned = np.flatnonzero(label == p).astype(np.int64)
        source = lambda full: (r, q, x if full else None, o if full else None)  # noqa: E731
        built = PartitionRows(p, parts, n, owned).build([source])
        _assert_rows_equal(built, graph, owned)
        # each entry's owner is its neighbour's partition
        np.testing.assert_array_equal(built.halo_owner, label[built.halo_ids])
