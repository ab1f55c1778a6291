"""Partitions of the dataset graph built from IVF cells (docs/d2.md#102-partitions-and-halos): which nodes, how many
partitions, and a partition's rows assembled from the select stage's shuffled edge records.

Pure numpy + numba. A partition is a group of whole IVF cells (most kNN edges stay inside a cell),
balanced by node count.
"""

from __future__ import annotations

import heapq

import numba
import numpy as np


def pack_largest_first(sizes: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin (0..n_bins-1, int32) of every item: largest item first (ties: lowest item index), each
    into the bin holding the least so far (ties: lowest bin id). Deterministic."""
    sizes = np.asarray(sizes, np.int64)
    bins = np.empty(len(sizes), np.int32)
    heap = [(0, b) for b in range(n_bins)]
    for item in np.lexsort((np.arange(len(sizes)), -sizes)):
        load, b = heapq.heappop(heap)
        bins[item] = b
        heapq.heappush(heap, (load + int(sizes[item]), b))
    return bins


# --------------------------------------------------------------------------------------------
# Partitions from per-cell counts (the driver's O(nlist) view), and how many
# --------------------------------------------------------------------------------------------


def cell_partitions(cell_counts, partitions: int | str) -> tuple[np.ndarray, int]:
    """The partition of every cell (int32[n_cells], -1 for a cell with no nodes) and P, from the
    node count of each cell. ``"cells"``: one partition per non-empty cell, numbered in cell order.
    An integer P: whole cells packed into P partitions, largest cell first (ties: lower cell id),
    each into the partition holding the fewest nodes so far (ties: lowest partition id);
    deterministic; asking for more partitions than there are non-empty cells gives one per cell."""
    counts = np.asarray(cell_counts, np.int64)
    used = np.flatnonzero(counts)
    out = np.full(counts.shape[0], -1, np.int32)
    if used.size == 0:
        return out, 0
    if partitions == "cells":
        out[used] = np.arange(used.size, dtype=np.int32)
        return out, int(used.size)
    p = int(partitions)
    if p < 1:
        raise ValueError(f"partitions must be 'cells' or an integer >= 1, got {partitions!r}")
    if p >= used.size:
        out[used] = np.arange(used.size, dtype=np.int32)
        return out, int(used.size)
    out[used] = pack_largest_first(counts[used], p)
    return out, p


# Measured on locality graphs (d2_exact's benchmark notes, benchmarks/results/select_scale.md): the
# partitioned greedy does 2-3x the sequential greedy's work in total, so splitting a pool only to
# use more cores pays from about this many cores on.
PARALLEL_MIN_CPUS = 4
# Below this many nodes per partition the rounds' fixed costs outweigh the parallel work.
PARALLEL_MIN_PARTITION_NODES = 250_000


# What a partition worker holds per node of its partitions at most (rows at k = 10, the greedy's
# state, the final pass; measured in benchmarks/results/select_scale.md): sizes partitions to memory.
WORKER_BYTES_PER_NODE = 300


def auto_partitions(n_nodes: int, max_nodes: int, cpus: int, worker_bytes: float = 0) -> int:
    """``select.partitions: auto``: P = max(P_memory, P_cores). P_memory: no partition holds more
    than ``max_nodes`` (``select.partition_max_nodes``) nodes, nor more than a worker's memory
    (``worker_bytes``, 0 = unknown) at WORKER_BYTES_PER_NODE. P_cores: the cluster's CPUs when
    there are at least PARALLEL_MIN_CPUS of them, capped so that partitions keep at least
    PARALLEL_MIN_PARTITION_NODES nodes (else 1). The result is the same for every P; only time
    and memory depend on it."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    n = max(int(n_nodes), 0)
    by_memory = max(1, -(-n // int(max_nodes)))
    if worker_bytes > 0:
        by_memory = max(by_memory, -(-n * WORKER_BYTES_PER_NODE // int(worker_bytes)))
    by_cores = 1
    if int(cpus) >= PARALLEL_MIN_CPUS:
        by_cores = max(1, min(int(cpus), n // PARALLEL_MIN_PARTITION_NODES))
    return max(by_memory, by_cores)


# --------------------------------------------------------------------------------------------
# A partition's rows from edge records (the select stage's shuffle output)
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _index_sorted(ids, n_total):
    """A coarse index over sorted distinct ids in 0..n_total-1: ``first[b]`` = position of the first
    id whose top bits (``id >> shift``) are >= b, with about one id per slot, so a lookup is one
    index read and a search over a slot (O(len(ids)) memory, never O(n_total)). Contiguous ids
    (one partition owning everything) need no index: ``shift`` -1, a lookup is a subtraction."""
    n = ids.shape[0]
    if n > 0 and ids[n - 1] - ids[0] == n - 1:
        return -1, np.zeros(1, np.int64)
    bits = 0
    while (1 << bits) < n:
        bits += 1
    total_bits = 0
    while (1 << total_bits) < n_total:
        total_bits += 1
    shift = max(0, total_bits - bits)
    n_slots = ((max(n_total, 1) - 1) >> shift) + 2
    first = np.empty(n_slots, np.int64)
    j = 0
    for b in range(n_slots):
        while j < n and (ids[j] >> shift) < b:
            j += 1
        first[b] = j
    return shift, first


@numba.njit(cache=True, nogil=True, inline="always")
def _find(ids, shift, first, g):
    """Position of id ``g`` in the sorted ``ids`` (index from :func:`_index_sorted`), or -1."""
    if shift < 0:  # contiguous
        i = g - ids[0]
        return i if 0 <= i < ids.shape[0] else -1
    if g < 0:
        return -1
    b = g >> shift
    if b + 1 >= first.shape[0]:
        return -1
    lo = first[b]
    end = first[b + 1]
    hi = end
    while lo < hi:
        mid = (lo + hi) >> 1
        if ids[mid] < g:
            lo = mid + 1
        else:
            hi = mid
    if lo < end and ids[lo] == g:
        return lo
    return -1


def positions_of(ids: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Position of each of ``g`` in the sorted distinct ``ids`` (-1 where absent), through
    :class:`SortedIds`: numpy's searchsorted of 10^7 ids in random order misses the cache at every
    level of its binary search (~1 s per 10^7 lookups; 25 s of a 10^7-node select stage)."""
    ids = np.asarray(ids, np.int64)
    return SortedIds(ids, int(ids[-1]) + 1 if ids.size else 0).find(g)


class SortedIds:
    """Sorted distinct ids with O(1)-expected lookup (:func:`_index_sorted`)."""

    def __init__(self, ids: np.ndarray, n_total: int):
        self.ids = np.ascontiguousarray(ids, np.int64)
        if self.ids.size > 1 and np.any(np.diff(self.ids) <= 0):
            raise ValueError("ids must be strictly increasing")
        self.shift, self.first = _index_sorted(self.ids, int(n_total))

    def find(self, g) -> np.ndarray:
        """Position of each id of ``g`` (-1 where absent)."""
        return _find_many(self.ids, self.shift, self.first, np.ascontiguousarray(g, np.int64))


@numba.njit(cache=True, nogil=True)
def _find_many(ids, shift, first, g):
    out = np.empty(g.shape[0], np.int64)
    for i in range(g.shape[0]):
        out[i] = _find(ids, shift, first, g[i])
    return out


# _count_entries and _fill_entries: owned rows per block of the nbr side's bucketing (their ``deg``
# or ``pos`` slots, 256 KiB, stay in a core's cache) and records per pass (the bucket buffers: 20 MiB)
FILL_BLOCK_BITS = 15
FILL_PASS_RECORDS = 1 << 20


@numba.njit(cache=True, nogil=True)
def _count_entries(deg, ids, shift, first, rows, nbrs):
    """Row lengths: each record (row, nbr) is an entry of its row and, when nbr is owned too, of
    nbr's row (the record of an edge inside a partition travels once). Returns the number of
    records whose row is not owned (must be 0). The nbr side is bucketed by block of rows first,
    as in :func:`_fill_entries` (an increment in record order is a cache miss per record)."""
    bad = 0
    n_blocks = (deg.shape[0] >> FILL_BLOCK_BITS) + 1
    size = min(FILL_PASS_RECORDS, rows.shape[0])
    t_of = np.empty(size, np.int64)
    starts = np.zeros(n_blocks + 1, np.int64)
    bt = np.empty(size, np.int64)
    for lo in range(0, rows.shape[0], FILL_PASS_RECORDS):
        hi = min(rows.shape[0], lo + FILL_PASS_RECORDS)
        starts[:] = 0
        for i in range(lo, hi):
            s = _find(ids, shift, first, rows[i])
            t = -1
            if s < 0:
                bad += 1
            else:
                deg[s] += 1
                t = _find(ids, shift, first, nbrs[i])
                if t >= 0:
                    starts[(t >> FILL_BLOCK_BITS) + 1] += 1
            t_of[i - lo] = t
        for b in range(n_blocks):
            starts[b + 1] += starts[b]
        for i in range(lo, hi):
            t = t_of[i - lo]
            if t >= 0:
                b = t >> FILL_BLOCK_BITS
                bt[starts[b]] = t
                starts[b] += 1
        for q in range(starts[n_blocks - 1]):
            deg[bt[q]] += 1
    return bad


@numba.njit(cache=True, nogil=True)
def _fill_entries(pos, ent_id, ent_dist, ent_owner, ids, shift, first, rows, nbrs, dists, owners, me):
    """Enter each record in its row (``pos``: each row's next free entry) and, when the partition
    owns ``nbr`` too, in nbr's row. The rows come in node order, so the first side writes nearly
    in sequence; nbr is anywhere, so its side is first bucketed by block of rows (a counting sort
    of each pass of records) and then written block by block, where ``pos`` and the entries written
    stay in cache: writing it in record order cost three cache misses per record (45 s of a
    10^7-node partition's 85 s load). A row's entries then hold the same (neighbour, distance)
    pairs in another order, which :func:`_sort_dedupe_rows` makes canonical (sorted by id, the
    smaller distance of a repeated neighbour)."""
    with_owner = ent_owner.shape[0] > 0
    n_blocks = (pos.shape[0] >> FILL_BLOCK_BITS) + 1
    size = min(FILL_PASS_RECORDS, rows.shape[0])
    t_of = np.empty(size, np.int64)
    starts = np.zeros(n_blocks + 1, np.int64)
    bt = np.empty(size, np.int64)
    br = np.empty(size, ent_id.dtype)
    bd = np.empty(size, ent_dist.dtype)
    for lo in range(0, rows.shape[0], FILL_PASS_RECORDS):
        hi = min(rows.shape[0], lo + FILL_PASS_RECORDS)
        starts[:] = 0
        for i in range(lo, hi):
            s = _find(ids, shift, first, rows[i])
            t = -1
            if s >= 0:
                p = pos[s]
                ent_id[p] = nbrs[i]
                ent_dist[p] = dists[i]
                if with_owner:
                    ent_owner[p] = owners[i]
                pos[s] = p + 1
                t = _find(ids, shift, first, nbrs[i])
                if t >= 0:
                    starts[(t >> FILL_BLOCK_BITS) + 1] += 1
            t_of[i - lo] = t
        for b in range(n_blocks):
            starts[b + 1] += starts[b]
        for i in range(lo, hi):  # the counting sort: stable, so each row keeps record order
            t = t_of[i - lo]
            if t >= 0:
                b = t >> FILL_BLOCK_BITS
                q = starts[b]
                bt[q] = t
                br[q] = rows[i]
                bd[q] = dists[i]
                starts[b] = q + 1
        for q in range(starts[n_blocks - 1]):
            t = bt[q]
            p = pos[t]
            ent_id[p] = br[q]
            ent_dist[p] = bd[q]
            if with_owner:
                ent_owner[p] = me
            pos[t] = p + 1


@numba.njit(cache=True, nogil=True)
def _sort_dedupe_rows(indptr, ent_id, ent_dist, ent_owner, own_ids):
    """Sort each row by neighbour id, merge repeated neighbours keeping the smaller distance (as
    :func:`~pipeline.core.d2.symmetrize_knn` does), drop self entries; compact in place. Returns
    the number of entries kept (``indptr`` is rewritten)."""
    with_owner = ent_owner.shape[0] > 0
    n = indptr.shape[0] - 1
    w = 0
    lo = indptr[0]
    for r in range(n):
        hi = indptr[r + 1]
        m = hi - lo
        if m > 24:  # hubs: a real sort
            perm = np.argsort(ent_id[lo:hi], kind="mergesort")
            tid = ent_id[lo:hi][perm]
            tdist = ent_dist[lo:hi][perm]
            ent_id[lo:hi] = tid
            ent_dist[lo:hi] = tdist
            if with_owner:
                ent_owner[lo:hi] = ent_owner[lo:hi][perm]
        else:
            for a in range(lo + 1, hi):
                key = ent_id[a]
                kd = ent_dist[a]
                ko = ent_owner[a] if with_owner else 0
                b = a - 1
                while b >= lo and ent_id[b] > key:
                    ent_id[b + 1] = ent_id[b]
                    ent_dist[b + 1] = ent_dist[b]
                    if with_owner:
                        ent_owner[b + 1] = ent_owner[b]
                    b -= 1
                ent_id[b + 1] = key
                ent_dist[b + 1] = kd
                if with_owner:
                    ent_owner[b + 1] = ko
        indptr[r] = w
        me = own_ids[r]
        a = lo
        while a < hi:
            j = ent_id[a]
            best = ent_dist[a]
            o = ent_owner[a] if with_owner else 0
            a += 1
            while a < hi and ent_id[a] == j:
                if ent_dist[a] < best:
                    best = ent_dist[a]
                a += 1
            if j == me:
                continue
            ent_id[w] = j
            ent_dist[w] = best
            if with_owner:
                ent_owner[w] = o
            w += 1
        lo = hi
    indptr[n] = w
    return w


@numba.njit(cache=True, nogil=True)
def _boundary_rows(indptr, ent_owner, me, n_parts):
    """For every other partition b, the owned rows with a neighbour owned by b (ascending):
    (offsets int64[n_parts + 1], rows)."""
    n = indptr.shape[0] - 1
    stamp = np.full(n_parts, -1, np.int64)
    count = np.zeros(n_parts + 1, np.int64)
    for r in range(n):
        for e in range(indptr[r], indptr[r + 1]):
            o = ent_owner[e]
            if o != me and stamp[o] != r:
                stamp[o] = r
                count[o + 1] += 1
    for b in range(n_parts):
        count[b + 1] += count[b]
    out = np.empty(count[n_parts], np.int64)
    fill = count[:n_parts].copy()
    stamp[:] = -1
    for r in range(n):
        for e in range(indptr[r], indptr[r + 1]):
            o = ent_owner[e]
            if o != me and stamp[o] != r:
                stamp[o] = r
                out[fill[o]] = r
                fill[o] += 1
    return count, out


@numba.njit(cache=True, nogil=True)
def _localize(indptr, ent_id, ent_dist, own_ids, own_shift, own_first, keep_own, halo_ids, halo_shift,
              halo_first, keep_halo, halo_rank, nbr_template):
    """The kept rows with local neighbour ids (owned: rank among kept owned nodes; halo: n_kept +
    position of the halo node among the *used* kept halo nodes in ``halo_rank`` order, owner-major).
    Two passes: count and mark which halo nodes still have an entry (skipped when nothing is
    dropped), then write.
    Returns (indptr, neighbours, distances, used halo positions in halo_ids order)."""
    n = indptr.shape[0] - 1
    new_own = np.full(n, -1, np.int64)
    k = 0
    for r in range(n):
        if keep_own[r]:
            new_own[r] = k
            k += 1
    n_halo = halo_ids.shape[0]
    everything = k == n and np.all(keep_halo)
    used = np.zeros(n_halo, np.bool_)
    out_ptr = np.zeros(k + 1, np.int64)
    if everything:  # nothing dropped: the rows as they are, every halo node in use
        out_ptr[:] = indptr
        used[:] = True
    for r in range(n if not everything else 0):
        a = new_own[r]
        if a < 0:
            continue
        c = 0
        for e in range(indptr[r], indptr[r + 1]):
            g = ent_id[e]
            t = _find(own_ids, own_shift, own_first, g)
            if t >= 0:
                if keep_own[t]:
                    c += 1
                continue
            h = _find(halo_ids, halo_shift, halo_first, g)
            if h >= 0 and keep_halo[h]:
                used[h] = True
                c += 1
        out_ptr[a + 1] = out_ptr[a] + c
    # local ids of the used halo nodes, in halo_rank order (owner-major, then id)
    halo_local = np.full(n_halo, -1, np.int64)
    m = 0
    for i in range(n_halo):
        h = halo_rank[i]
        if used[h]:
            halo_local[h] = k + m
            m += 1
    out_nbr = np.empty(out_ptr[k], nbr_template.dtype)
    out_dist = np.empty(out_ptr[k], ent_dist.dtype)
    w = 0
    for r in range(n):
        if new_own[r] < 0:
            continue
        for e in range(indptr[r], indptr[r + 1]):
            g = ent_id[e]
            t = _find(own_ids, own_shift, own_first, g)
            if t >= 0:
                if keep_own[t]:
                    out_nbr[w] = new_own[t]
                    out_dist[w] = ent_dist[e]
                    w += 1
                continue
            h = _find(halo_ids, halo_shift, halo_first, g)
            if h >= 0 and keep_halo[h]:
                out_nbr[w] = halo_local[h]
                out_dist[w] = ent_dist[e]
                w += 1
    return out_ptr, out_nbr, out_dist, used


class PartitionRows:
    """One partition's rows of the undirected graph, built from edge records, before the
    pre-filter: what :class:`~pipeline.core.d2_exact.PartitionState` is made from.

    A record ``(row, nbr, dist, owner of nbr)`` says "nbr is a neighbour of row at this distance";
    the partition owning ``row`` receives it, and when it owns ``nbr`` too it also becomes an entry
    of nbr's row (so an edge inside a partition travels once). Rows are then sorted by neighbour
    id with repeated neighbours merged to the smaller distance and self entries dropped: exactly the
    rows :func:`~pipeline.core.d2.symmetrize_knn` gives, whatever order the records came in.

    Built in two passes over the records (:meth:`build`: ``sources`` is a list of callables
    ``source(full)`` returning record chunks ``(rows, nbrs, dists, owners)``; called once with
    ``full`` false to count, when only ``rows`` and ``nbrs`` are used and need be read, once with
    it true to fill), so a partition never holds all its records and its rows at once.

    Attributes: ``owned`` (sorted global ids), ``indptr``, ``ent_id`` (neighbour global ids),
    ``ent_dist``, ``halo`` (sorted global ids of the neighbours owned elsewhere), ``halo_owner``,
    ``boundary`` ({partition b: owned row positions with a neighbour owned by b, ascending}).
    """

    def __init__(self, part_id: int, n_parts: int, n_total: int, owned: np.ndarray):
        self.part_id, self.n_parts, self.n_total = int(part_id), int(n_parts), int(n_total)
        self.own = SortedIds(owned, n_total)
        self.owned = self.own.ids

    @property
    def n_own(self) -> int:
        return int(self.owned.shape[0])

    @property
    def n_entries(self) -> int:
        return int(self.indptr[-1])

    def build(self, sources, dist_dtype=np.float32) -> "PartitionRows":
        n_own = self.n_own
        deg = np.zeros(n_own, np.int64)
        own = self.own
        for source in sources:
            rows, nbrs, _, _ = source(False)
            bad = _count_entries(deg, own.ids, own.shift, own.first, np.ascontiguousarray(rows, np.int64),
                                 np.ascontiguousarray(nbrs, np.int64))
            if bad:
                raise ValueError(f"partition {self.part_id}: {bad} edge records for rows it does not own")
        indptr = np.zeros(n_own + 1, np.int64)
        np.cumsum(deg, out=indptr[1:])
        del deg
        id_dtype = np.int32 if self.n_total < 2**31 else np.int64
        ent_id = np.empty(indptr[-1], id_dtype)
        ent_dist = np.empty(indptr[-1], dist_dtype)
        ent_owner = np.empty(indptr[-1] if self.n_parts > 1 else 0, np.int32)
        pos = indptr[:-1].copy()
        for source in sources:
            rows, nbrs, dists, owners = source(True)
            _fill_entries(pos, ent_id, ent_dist, ent_owner, own.ids, own.shift, own.first,
                          np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(nbrs, np.int64),
                          np.ascontiguousarray(dists, dist_dtype),
                          np.ascontiguousarray(owners if owners is not None else np.zeros(0), np.int32),
                          self.part_id)
        del pos
        kept = _sort_dedupe_rows(indptr, ent_id, ent_dist, ent_owner, own.ids)
        for arr in (ent_id, ent_dist, ent_owner):  # right-sized in place (mutual kNN pairs merged)
            if arr.shape[0] > kept:
                arr.resize(kept, refcheck=False)
        self.indptr, self.ent_id, self.ent_dist = indptr, ent_id, ent_dist
        if self.n_parts > 1:
            remote = ent_owner != self.part_id
            halo_ids, first = np.unique(ent_id[remote], return_index=True)
            owners = ent_owner[remote]
            halo_owner = owners[first]
            # every record naming a halo node must agree on its owner
            pos = np.searchsorted(halo_ids, ent_id[remote])
            if np.any(halo_owner[pos] != owners):
                raise ValueError(f"partition {self.part_id}: edge records disagree on a neighbour's partition")
            self.halo = SortedIds(halo_ids.astype(np.int64), self.n_total)
            self.halo_owner = halo_owner.astype(np.int32)
            off, rows = _boundary_rows(indptr, ent_owner, self.part_id, self.n_parts)
            self.boundary = {b: rows[off[b]:off[b + 1]] for b in range(self.n_parts) if off[b + 1] > off[b]}
        else:
            self.halo = SortedIds(np.zeros(0, np.int64), self.n_total)
            self.halo_owner = np.zeros(0, np.int32)
            self.boundary = {}
        return self

    @property
    def halo_ids(self) -> np.ndarray:
        return self.halo.ids

    def halo_blocks(self) -> dict[int, np.ndarray]:
        """{owner: positions in ``halo_ids`` of the nodes it owns, ascending id}: what the owner's
        :attr:`boundary` toward this partition lists, in the same order."""
        order = np.argsort(self.halo_owner, kind="stable")
        owners = self.halo_owner[order]
        cuts = np.flatnonzero(np.diff(owners)) + 1
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        return {int(owners[s]): block for s, block in zip(starts, np.split(order, cuts))} if order.size else {}

    def state_arrays(self, owned_scores, halo_scores, keep_own=None, keep_halo=None) -> dict:
        """The constructor arguments of :class:`~pipeline.core.d2_exact.PartitionState` on the rows
        of the kept owned nodes, without the dropped nodes (owned or halo: ``keep_*`` masks, None =
        all kept), scores in ``owned``/``halo_ids`` order. A halo node left with no entry leaves
        the halo."""
        n_own = self.n_own
        halo_ids = self.halo.ids
        owned_scores = np.asarray(owned_scores, np.float64)
        halo_scores = np.asarray(halo_scores, np.float64)
        if owned_scores.shape != (n_own,) or halo_scores.shape != halo_ids.shape:
            raise ValueError("scores must match the owned and halo nodes")
        n_loc = n_own + halo_ids.shape[0]
        nbr_dtype = np.int32 if n_loc < 2**31 - 1 else np.int64
        halo_rank = np.lexsort((halo_ids, self.halo_owner))  # owner-major, then id
        if keep_own is None and keep_halo is None and halo_ids.size == 0 and (
                n_own == 0 or (self.owned[0] == 0 and self.owned[-1] == n_own - 1)):
            # every node owned and kept: local ids are the global ids, no mapping pass
            return {
                "part_id": self.part_id, "n_partitions": self.n_parts, "owned": self.owned,
                "indptr": self.indptr, "neighbors": self.ent_id.astype(nbr_dtype, copy=False),
                "distances": self.ent_dist, "owned_scores": owned_scores, "halo": halo_ids,
                "halo_owner": self.halo_owner, "halo_scores": halo_scores,
            }
        keep_own = np.ones(n_own, np.bool_) if keep_own is None else np.asarray(keep_own, np.bool_)
        keep_halo = np.ones(halo_ids.shape[0], np.bool_) if keep_halo is None else np.asarray(keep_halo, np.bool_)
        own, halo = self.own, self.halo
        ptr, nbr, dist, used = _localize(self.indptr, self.ent_id, self.ent_dist, own.ids, own.shift, own.first,
                                         keep_own, halo.ids, halo.shift, halo.first, keep_halo, halo_rank,
                                         np.zeros(0, nbr_dtype))
        order = halo_rank[used[halo_rank]]
        return {
            "part_id": self.part_id, "n_partitions": self.n_parts, "owned": self.owned[keep_own],
            "indptr": ptr, "neighbors": nbr, "distances": dist, "owned_scores": owned_scores[keep_own],
            "halo": halo_ids[order], "halo_owner": self.halo_owner[order], "halo_scores": halo_scores[order],
        }
