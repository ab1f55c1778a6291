"""Cell-sharded IVF-Flat kNN graph at pool scale: pure maths (numpy + faiss only).

At 10^8-10^9 vectors no process may hold the whole index. The search is organised by *groups of
IVF lists*: a task holds only its lists' base vectors (float16 is fine) and the queries that probe
them, scans each list once for all of its queries (list-major, one ``faiss.knn`` BLAS product per
list), and the per-query candidates of all groups are merged afterwards with
:func:`pipeline.core.knn.merge_topk` and :func:`pipeline.core.knn.remove_self`. The Ray stage moves
the data; this module is the maths, and :func:`sharded_knn_graph` runs all of it in one process:
the one in-memory graph builder (tests, benchmarks and small pools call it; the stage is tested
against it bit for bit; ``graph.index: flat`` is ``nlist=1, nprobe=1``).

Steps and the functions for each:

1. Size: :func:`nlist_for` (about 4*sqrt(N) lists, no cap from the training size).
2. Train, two-level k-means (:func:`train_two_level` in one process; split for parallel tasks):
   :func:`training_sample_ids` (the two seeded samples), :func:`coarse_level` (k1 = ceil(sqrt(nlist))
   coarse centroids), :func:`fine_counts` (how many fine centroids each coarse cell gets),
   :func:`fine_level` (one coarse cell's fine centroids, seed :func:`fine_seed`). Concatenating the
   fine centroids in coarse-cell order defines the list ids, so lists of one coarse cell are
   adjacent; a flat ``IndexFlatL2`` over them is the quantiser.
3. Assign: :func:`probe_lists_two_level` gives each vector its home list (where it is stored; its
   ``cell``) and the ``nprobe`` lists it probes as a query, in one batch-invariant computation,
   through the coarse level (the vector's :func:`coarse_probes_for` nearest coarse cells, then
   their fine centroids: ~(1 + COARSE_PROBES) * sqrt(nlist) centroids per vector, not all nlist);
   :func:`probe_lists` is the exhaustive rule (every centroid).
4. Group: :func:`group_cells` cuts the lists, in list-id order, into contiguous groups under a row
   bound; :func:`probes_by_group` splits each query's probes by group (a query is sent once to each
   group its probes fall in, with only that group's probes).
5. Search: :func:`search_group` (top-kk of each query over its probed lists of one group), then
   :func:`merge_group_results` per query.

Bit-for-bit equality across groupings: each list lives in exactly one group and every query that
probes it is sent there, so each list is scanned by the same ``faiss.knn`` calls (same query set,
in ascending query id, same base rows in ascending id) whatever the grouping; the final top-kk is
the lexicographic (distance, id) top-kk of the union of the per-list candidates, which merging in
any order reproduces exactly. Squared L2 distances throughout.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from .knn import merge_topk, remove_self
from .runs import run_ids

# FAISS warns when k-means gets fewer than 39 training points per centroid; below that the
# centroids are poorly placed and list sizes become very uneven.
MIN_POINTS_PER_LIST = 39
# k-means iterations of both training levels: FAISS's default of 25 costs 2.5x the time of 10, and
# the lists only need to split the space into compact cells (recall is then set by nprobe,
# measured in benchmarks/graph_speed.py).
KMEANS_ITERATIONS = 10
# Sample points per centroid used by each training level (see train_two_level's docstring).
COARSE_POINTS_PER_CENTROID = 256
FINE_POINTS_PER_LIST = 64
# probe_lists runs the quantiser on blocks of exactly this many rows (the last block zero-padded),
# so a vector's probes do not depend on which batch it was assigned in (see probe_lists).
PROBE_BLOCK = 4096
# Coarse cells a vector is routed through by probe_lists_two_level, at least (coarse_probes_for): its
# probes are the nearest lists among those cells' fine centroids (~COARSE_PROBES * sqrt(nlist) of them
# instead of all nlist). On 512-d CLIP-like vectors at N = 10^5 (36 coarse cells of 35 lists, nprobe
# 16), routing through 2 cells finds 99.0% of the exhaustive probes and 4 cells all of them (20,000
# vectors checked); cells grow as sqrt(nlist), so 4 cells cover more lists at larger N.
COARSE_PROBES = 4
# ... and one more routed cell per PROBES_PER_COARSE_CELL probes beyond 4 * COARSE_PROBES.
PROBES_PER_COARSE_CELL = 4
# probe_lists_two_level's fine step computes one coarse cell's distances for exactly this many rows at
# a time (the last chunk zero-padded): every row goes through the same-shaped product whatever batch
# or unit it came in, as PROBE_BLOCK does for the flat quantiser.
ROUTE_CHUNK = 512
# Rows routed at a time by probe_lists_two_level (bounds its float32 copy and candidate buffer:
# ASSIGN_BLOCK * (4 * dim + coarse_probes * nprobe * 12) bytes, 184 MB at 512-d, nprobe 16), large
# enough that each cell's chunks are mostly full (3,100 rows per cell at N = 3*10^6).
ASSIGN_BLOCK = 65_536
# Queries of one list scanned by one faiss.knn call (bounds the per-thread copy of query rows to
# LIST_QUERY_CHUNK * dim * 4 bytes). The chunks depend only on the list's full, sorted query set,
# which is the same in every grouping.
LIST_QUERY_CHUNK = 32_768
# Queries reduced to their top-kk at a time after a group's scan (bounds the padded buffer).
REDUCE_QUERY_BLOCK = 65_536
# Default bound of sharded_knn_graph's groups: base rows + (query, probed list) pairs.
DEFAULT_MAX_ROWS_PER_GROUP = 4_000_000

_ID_MAX = np.iinfo(np.int64).max


def _faiss():
    import faiss

    return faiss


# ================================================================================================
# 1. sizing
# ================================================================================================

def nlist_for(n_vectors: int, nlist: int | None = None) -> int:
    """IVF lists for `n_vectors`: `nlist` when given, else round(4*sqrt(N)) (at least 1, at most N).

    There is no cap from the training sample (one-level k-means on a fixed sample would need one,
    at train_size // MIN_POINTS_PER_LIST): two-level training samples FINE_POINTS_PER_LIST points
    per list however many lists there are.
    An explicit nlist larger than N (some lists would be empty by construction) is an error.
    """
    n_vectors = int(n_vectors)
    if n_vectors <= 0:
        raise ValueError(f"cannot size an IVF index for {n_vectors} vectors")
    if nlist is None:
        return max(1, min(n_vectors, int(round(4 * math.sqrt(n_vectors)))))
    nlist = int(nlist)
    if nlist < 1:
        raise ValueError(f"graph.nlist must be >= 1, got {nlist}")
    if nlist > n_vectors:
        raise ValueError(f"graph.nlist={nlist} exceeds the {n_vectors} vectors to index; lower nlist or leave it null")
    return nlist


def coarse_count(nlist: int) -> int:
    """Coarse cells of the two-level training: k1 = ceil(sqrt(nlist)) (so each gets ~k1 lists)."""
    if nlist < 1:
        raise ValueError(f"graph.nlist must be >= 1, got {nlist}")
    return int(math.isqrt(nlist - 1)) + 1 if nlist > 1 else 1


# ================================================================================================
# 2. two-level training
# ================================================================================================

def training_sample_ids(
    n_vectors: int, nlist: int, seed: int, train_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded training samples: (coarse ids, fine ids), both sorted global ids, coarse ⊂ fine.

    The fine sample has ``min(N, train_size or FINE_POINTS_PER_LIST * nlist)`` ids; the coarse
    sample is a seeded subset of it with ``min(len(fine), COARSE_POINTS_PER_CENTROID * k1)`` ids
    (k1 = :func:`coarse_count`). A stage can therefore gather the fine sample once and take the
    coarse one from it. `train_size` smaller than nlist cannot place nlist centroids: an error.
    """
    if n_vectors <= 0:
        raise ValueError(f"cannot sample {n_vectors} vectors")
    wanted = FINE_POINTS_PER_LIST * nlist if train_size is None else int(train_size)
    fine_size = min(int(n_vectors), wanted)
    if fine_size < nlist:
        raise ValueError(
            f"graph.train_size={train_size} gives {fine_size} training vectors for {nlist} IVF lists; "
            f"use at least nlist (better {FINE_POINTS_PER_LIST}*nlist) or leave it null"
        )
    if fine_size == n_vectors:
        fine = np.arange(n_vectors, dtype=np.int64)
    else:
        rng = np.random.default_rng([seed, 0x66696E65])  # "fine"
        fine = np.sort(rng.choice(n_vectors, size=fine_size, replace=False)).astype(np.int64)
    coarse_size = min(fine_size, COARSE_POINTS_PER_CENTROID * coarse_count(nlist))
    if coarse_size == fine_size:
        return fine.copy(), fine
    rng = np.random.default_rng([seed, 0x636F6172])  # "coar"
    coarse = np.sort(fine[rng.choice(fine_size, size=coarse_size, replace=False)])
    return coarse, fine


def fine_seed(seed: int, cell: int) -> int:
    """The k-means seed of coarse cell `cell`'s fine level (independent streams per cell)."""
    return int(np.random.SeedSequence([int(seed), 0x6365, int(cell)]).generate_state(1)[0] & 0x7FFFFFFF)


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """FAISS k-means (L2, KMEANS_ITERATIONS iterations) on exactly `points` (no subsampling)."""
    faiss = _faiss()
    x = np.ascontiguousarray(points, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1], int(k), niter=KMEANS_ITERATIONS, seed=int(seed), verbose=False,
        max_points_per_centroid=max(256, -(-x.shape[0] // k)),  # never subsample: we sampled already
        min_points_per_centroid=1,  # small cells are expected (fine_level); no warning
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def chain_order(centroids: np.ndarray) -> np.ndarray:
    """A locality order of centroids: the greedy nearest-neighbour chain from centroid 0 (each next
    one is the nearest not yet taken, ties to the lower index). O(k^2) for k centroids (k ~ sqrt(nlist)
    per call), deterministic. Neighbouring cells get nearby ids, so groups of consecutive lists are
    compact and a query's probes fall in fewer groups (measured at N = 10^5, 17 groups: 2.15 groups
    per query in k-means order, 1.56 with both levels chained, 10.3 for a random list order)."""
    c = np.asarray(centroids, dtype=np.float64)
    k = c.shape[0]
    if k <= 2:
        return np.arange(k, dtype=np.int64)
    sq = (c * c).sum(axis=1)
    order = np.empty(k, np.int64)
    taken = np.zeros(k, bool)
    current = 0
    for step in range(k):
        order[step] = current
        taken[current] = True
        if step == k - 1:
            break
        d = sq - 2 * (c @ c[current])  # + |c_current|^2, the same for every candidate
        d[taken] = np.inf
        current = int(np.argmin(d))
    return order


def coarse_level(sample: np.ndarray, k1: int, seed: int) -> np.ndarray:
    """The k1 coarse centroids (float32[k1, d]), k-means on the coarse sample, deterministic for a seed.

    The sample should be the coarse ids of :func:`training_sample_ids` in ascending id order
    (COARSE_POINTS_PER_CENTROID points per centroid). k1 = 1 gives the mean. The centroids come in
    :func:`chain_order`, so coarse cells with adjacent ids are near each other.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"sample must be 2-d [n, d], got shape {x.shape}")
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    if x.shape[0] < k1:
        raise ValueError(f"{x.shape[0]} coarse training vectors cannot place {k1} coarse centroids")
    if k1 == 1:
        return x.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
    c = _kmeans(x, k1, seed)
    return np.ascontiguousarray(c[chain_order(c)])


def fine_counts(cell_sizes: np.ndarray, nlist: int) -> np.ndarray:
    """Fine centroids per coarse cell (int64[k1]) from the sizes of the cells' shares of the fine sample.

    Proportional to size by largest remainder (Hamilton) with a floor of one list per non-empty
    cell: start from floor(nlist*size/total) (at least 1 for a non-empty cell, 0 for an empty one),
    then hand out the missing lists one at a time to the cell furthest below its quota, or take the
    excess back one at a time from the cell (holding >= 2) furthest above it; ties go to the lower
    cell id. Exact integer arithmetic, so the result is deterministic; the counts sum to nlist.
    The coarse centroids themselves are not needed: only the sizes decide.
    """
    sizes = np.asarray(cell_sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError("cell_sizes must be a 1-d array of non-negative counts")
    nonempty = sizes > 0
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("no training vectors in any coarse cell")
    if int(nonempty.sum()) > nlist:
        raise ValueError(f"{int(nonempty.sum())} non-empty coarse cells cannot share {nlist} lists")
    quota = sizes * int(nlist)  # quota_i * total (exact; < 2^63 for any realistic sample)
    counts = quota // total
    counts[nonempty & (counts == 0)] = 1
    missing = int(nlist) - int(counts.sum())
    while missing > 0:  # at most k1 rounds
        below = np.where(nonempty, quota - counts * total, np.iinfo(np.int64).min)
        counts[int(np.argmax(below))] += 1
        missing -= 1
    while missing < 0:
        above = np.where(counts >= 2, counts * total - quota, np.iinfo(np.int64).min)
        counts[int(np.argmax(above))] -= 1
        missing += 1
    return counts


def fine_level(points: np.ndarray, m: int, seed: int) -> np.ndarray:
    """m fine centroids (float32[m, d]) for the fine-sample points of one coarse cell.

    `points` must come in ascending global id order (k-means' seeded initialisation picks points by
    position). More than m points: k-means. Exactly m: the points themselves. Fewer (n < m, only for
    cells of a handful of points): the n points, then m - n copies of them split off in turn,
    copy j being point (j mod n) scaled by (1 + (j//n + 1) * 2^-10) (FAISS's own split of an empty
    centroid: a tiny move along the point's own direction), so the extra lists are valid, nearly
    empty and deterministic. m = 1: the mean. m = 0 (empty cell): no centroids. k-means
    centroids come in :func:`chain_order`.
    """
    x = np.ascontiguousarray(points, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"points must be 2-d [n, d], got shape {x.shape}")
    n = x.shape[0]
    if m == 0:
        return np.zeros((0, x.shape[1]), np.float32)
    if n == 0:
        raise ValueError(f"a coarse cell with no training points cannot get {m} fine centroids")
    if m == 1:
        return x.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
    if n > m:
        c = _kmeans(x, m, seed)
        return np.ascontiguousarray(c[chain_order(c)])
    j = np.arange(m - n)
    pad = x[j % n] * (1 + (j // n + 1) * 2.0 ** -10).astype(np.float32)[:, None]
    return np.ascontiguousarray(np.concatenate([x, pad]), dtype=np.float32)


def train_two_level(
    vectors: np.ndarray, nlist: int, seed: int = 0, train_size: int | None = None,
    timings: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-level k-means in one process: (centroids float32[nlist, d], coarse cell of each list
    int32[nlist], coarse centroids float32[k1, d]; :func:`probe_lists_two_level` routes through them).

    Sample points per list, and why: FAISS wants at least MIN_POINTS_PER_LIST (39) training points
    per centroid (fewer gives badly placed centroids and very uneven lists) and gains little beyond
    256. The coarse level runs k1 = ceil(sqrt(nlist)) centroids on COARSE_POINTS_PER_CENTROID (256)
    points each: ~256*sqrt(nlist) points, 91k at nlist = 126k (N = 10^9), one small task. The fine
    level gives each coarse cell its share of a sample of FINE_POINTS_PER_LIST (64) points per list
    and as many lists as fine_counts says (so ~64 points per fine centroid, above FAISS's 39 with a
    margin for uneven shares): each coarse cell is an independent k-means of ~sqrt(nlist) centroids
    on ~64*sqrt(nlist) points (23k points at N = 10^9), so training cost is ~nlist^1.5 instead of
    one-level's nlist^2 * 64 and the fine cells run as parallel tasks. Total sample 64*nlist
    (8.1M vectors at N = 10^9, gathered in parallel; about 4*sqrt(N)*64 = 256*sqrt(N)).

    Deterministic for a seed (and for the thread count); the fine cells' seeds are :func:`fine_seed`.
    List ids are the concatenation order (coarse cell 0's fine centroids first), so lists of a coarse
    cell are adjacent.

    Measured on 512-d CLIP-like vectors (2-core VM shared with other jobs), recall@10 of the graph at
    nprobe 16, against FAISS one-level k-means (10 iterations) on the same fine sample and nlist:
    N = 10^5: 0.9993 vs 0.9994 (nprobe 1/2/4: 0.38/0.62/0.88 vs 0.40/0.63/0.88), training 0.7 s vs
    4.8 s; N = 3*10^5: 0.997 vs 0.997, training 1.7 s vs 66 s.
    """
    clock = time.perf_counter()
    n, dim = vectors.shape
    nlist = nlist_for(n, nlist)
    coarse_ids, fine_ids = training_sample_ids(n, nlist, seed, train_size)
    k1 = coarse_count(nlist)
    coarse = coarse_level(vectors[coarse_ids], k1, seed)
    t_coarse = time.perf_counter() - clock
    fine_x = vectors[fine_ids]
    home, _ = probe_lists(coarse, fine_x, 1)
    sizes = np.bincount(home, minlength=k1)
    counts = fine_counts(sizes, nlist)
    order = np.argsort(home, kind="stable")  # within a cell: ascending id
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    centroids, owner = [], []
    for cell in range(k1):
        pts = fine_x[order[bounds[cell]:bounds[cell + 1]]]
        centroids.append(fine_level(pts, int(counts[cell]), fine_seed(seed, cell)))
        owner.append(np.full(int(counts[cell]), cell, np.int32))
    out = np.ascontiguousarray(np.concatenate(centroids), dtype=np.float32).reshape(nlist, dim)
    if timings is not None:
        timings.update(train_coarse=t_coarse, train_fine=time.perf_counter() - clock - t_coarse)
    return out, np.concatenate(owner), coarse


# ================================================================================================
# 3. coarse assignment
# ================================================================================================

def probe_lists(
    centroids: np.ndarray, vectors: np.ndarray, nprobe: int,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(home int32[n], probes int32[n, nprobe]): the nprobe nearest lists of each vector, nearest first.

    home = probes[:, 0] is the list the vector is stored in (its cell); one computation serves both,
    so a vector always probes its own list. nprobe > nlist is an error (not clamped). `vectors` may be
    float16 (or raw embeddings with `prepare`, applied per block): converted block by block.

    Batch-invariant: the quantiser runs on blocks of exactly PROBE_BLOCK rows (the last one padded
    with zero rows), so every row goes through the same-shaped BLAS product and a vector's probes do
    not depend on the batch it came in (FAISS takes a non-BLAS path below 20 rows; tie-flips between
    a stage's per-part batches and the reference's would otherwise be possible).
    """
    faiss = _faiss()
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    nlist = c.shape[0]
    nprobe = int(nprobe)
    if nprobe < 1:
        raise ValueError(f"graph.nprobe must be >= 1, got {nprobe}")
    if nprobe > nlist:
        raise ValueError(f"graph.nprobe={nprobe} exceeds graph.nlist={nlist} (the lists there are)")
    quantizer = faiss.IndexFlatL2(c.shape[1])
    quantizer.add(c)
    n = vectors.shape[0]
    probes = np.empty((n, nprobe), np.int32)
    block = np.zeros((PROBE_BLOCK, c.shape[1]), np.float32)
    for lo in range(0, n, PROBE_BLOCK):
        hi = min(n, lo + PROBE_BLOCK)
        rows = vectors[lo:hi]
        block[: hi - lo] = prepare(rows) if prepare is not None else rows
        block[hi - lo:] = 0
        _, i = quantizer.search(block, nprobe)
        probes[lo:hi] = i[: hi - lo]
    return probes[:, 0].copy(), probes


def coarse_probes_for(nprobe: int) -> int:
    """Coarse cells a vector is routed through for `nprobe` probes: COARSE_PROBES, one more per
    PROBES_PER_COARSE_CELL probes beyond 16 (a wider probe set spreads over more coarse cells)."""
    return max(COARSE_PROBES, -(-int(nprobe) // PROBES_PER_COARSE_CELL))


def probe_lists_two_level(
    coarse: np.ndarray, centroids: np.ndarray, coarse_cell: np.ndarray, vectors: np.ndarray, nprobe: int,
    coarse_probes: int | None = None, prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(home int32[n], probes int32[n, nprobe]) found through the coarse level of the two-level quantiser.

    :func:`probe_lists` compares every vector with all nlist centroids: as many multiply-adds per
    vector as its search (nprobe lists of ~N/nlist rows each, at nlist ~ 4*sqrt(N)). Here a vector is
    compared with the k1 coarse centroids, routed to its `coarse_probes` (default
    :func:`coarse_probes_for`) nearest coarse cells among those holding lists, and compared with
    those cells' fine centroids only (the lists of a coarse cell are adjacent ids, `coarse_cell`
    non-decreasing): ~(1 + coarse_probes) * sqrt(nlist) centroids instead of nlist. Its probes are
    the nprobe nearest of those lists, nearest first (FAISS's merge of the cells' sorted candidates;
    ties in a fixed order); home = probes[:, 0]. They equal :func:`probe_lists`'s whenever the
    vector's nprobe nearest lists all lie in the cells it is routed to (always when coarse_probes
    covers every cell); otherwise a probe is the next-nearest list of a routed cell, and recall is
    held by routing to enough cells (COARSE_PROBES, measured). A vector whose routed cells hold fewer than nprobe lists
    in all (tiny cells) gets :func:`probe_lists`'s exhaustive probes.

    Batch-invariant like :func:`probe_lists`: the coarse distances come from its padded blocks, and
    each cell's fine distances from ``faiss.knn`` on chunks of exactly ROUTE_CHUNK rows (the last one
    zero-padded), so a vector's probes do not depend on the batch, unit or thread count. The cells
    run side by side on faiss's thread count, one OpenMP thread per cell (:func:`_run_parallel`).
    """
    faiss = _faiss()
    fine = np.ascontiguousarray(centroids, dtype=np.float32)
    cell_of = np.asarray(coarse_cell, dtype=np.int64)
    nlist, dim = fine.shape
    nprobe = int(nprobe)
    if len(cell_of) != nlist or (len(cell_of) and (np.diff(cell_of) < 0).any()):
        raise ValueError(f"coarse_cell must give the coarse cell of each of the {nlist} lists, non-decreasing")
    if nprobe < 1:
        raise ValueError(f"graph.nprobe must be >= 1, got {nprobe}")
    if nprobe > nlist:
        raise ValueError(f"graph.nprobe={nprobe} exceeds graph.nlist={nlist} (the lists there are)")
    coarse_probes = coarse_probes_for(nprobe) if coarse_probes is None else int(coarse_probes)
    if coarse_probes < 1:
        raise ValueError(f"coarse_probes must be >= 1, got {coarse_probes}")
    cells = np.unique(cell_of)  # the coarse cells that hold lists (an empty cell gets none)
    routers = np.ascontiguousarray(np.asarray(coarse, dtype=np.float32)[cells])
    lo_of = np.searchsorted(cell_of, cells, "left")
    hi_of = np.searchsorted(cell_of, cells, "right")
    width = min(int(coarse_probes), len(cells))
    n = vectors.shape[0]
    probes = np.empty((n, nprobe), np.int32)
    for start in range(0, n, ASSIGN_BLOCK):
        stop = min(n, start + ASSIGN_BLOCK)
        rows = vectors[start:stop]
        x = np.ascontiguousarray(prepare(rows) if prepare is not None else rows, dtype=np.float32)
        b = stop - start
        _, routed = probe_lists(routers, x, width)  # [b, width] positions in `cells`
        # candidates [width, b, nprobe]: routed cell `slot` of row `row` at slot * b + row
        cand_d = np.full((width * b, nprobe), np.inf, np.float32)
        cand_i = np.full((width * b, nprobe), -1, np.int64)
        flat = routed.ravel().astype(np.int64)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(cells) + 1))

        def scan(c: int) -> None:
            pairs = order[bounds[c]:bounds[c + 1]]  # flat indices of `routed`: row * width + slot
            members = pairs // width
            at = (pairs % width) * b + members
            lists = fine[lo_of[c]:hi_of[c]]
            top = min(nprobe, len(lists))
            chunk = np.zeros((ROUTE_CHUNK, dim), np.float32)
            for lo in range(0, len(pairs), ROUTE_CHUNK):
                hi = min(len(pairs), lo + ROUTE_CHUNK)
                np.take(x, members[lo:hi], axis=0, out=chunk[: hi - lo])
                chunk[hi - lo:] = 0
                d, local = faiss.knn(chunk, lists, top)
                # each pair belongs to one cell: threads never write the same row
                cand_d[at[lo:hi], :top] = d[: hi - lo]
                cand_i[at[lo:hi], :top] = local[: hi - lo] + lo_of[c]

        _run_parallel(scan, np.flatnonzero(np.diff(bounds)))
        # each cell's candidates come sorted: FAISS merges them per row, row by row independently
        _, best = faiss.merge_knn_results(cand_d.reshape(width, b, nprobe), cand_i.reshape(width, b, nprobe))
        best = best.astype(np.int32)
        short = np.flatnonzero(best[:, -1] < 0)  # routed cells with fewer than nprobe lists in all
        if len(short):
            best[short] = probe_lists(fine, x[short], nprobe)[1]
        probes[start:stop] = best
    return probes[:, 0].copy(), probes


# ================================================================================================
# 4. cell groups
# ================================================================================================

def group_cells(list_sizes: np.ndarray, probe_counts: np.ndarray, max_rows_per_group: int) -> np.ndarray:
    """Group id (int32[nlist]) of each list: contiguous runs of lists in list-id order.

    List-id order is the locality order: two-level training numbers the lists of a coarse cell
    consecutively, so a query's probes (mostly in its own and neighbouring fine cells of one coarse
    cell) tend to fall in one or two groups. A group's rows are its lists' base rows plus their
    probe counts ((query, probed list) pairs: an upper bound on the distinct queries the group
    receives, and what its candidate buffer grows with). Greedy: a list joins the current group
    unless that would pass max_rows_per_group, then it opens the next one; a single list over the
    bound gets a group of its own. Deterministic; group ids are 0..G-1 in list order.
    """
    sizes = np.asarray(list_sizes, dtype=np.int64)
    probes = np.asarray(probe_counts, dtype=np.int64)
    if sizes.shape != probes.shape or sizes.ndim != 1:
        raise ValueError(f"list_sizes {sizes.shape} and probe_counts {probes.shape} must be equal 1-d shapes")
    if max_rows_per_group < 1:
        raise ValueError(f"max_rows_per_group must be >= 1, got {max_rows_per_group}")
    return run_ids(sizes + probes, max_rows_per_group)


def group_rows(list_group: np.ndarray, list_sizes: np.ndarray, probe_counts: np.ndarray) -> np.ndarray:
    """Rows (base + probe pairs) of each group, as group_cells counts them."""
    g = np.asarray(list_group)
    n_groups = int(g.max()) + 1 if len(g) else 0
    return np.bincount(g, weights=np.asarray(list_sizes) + np.asarray(probe_counts), minlength=n_groups).astype(np.int64)


def probes_by_group(probes: np.ndarray, list_group: np.ndarray,
                    groups: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each query's probes by the group they fall in.

    Returns (pair_query int64[P], pair_group int32[P], pair_probes int32[P, nprobe]), one entry per
    (query, group its probes touch), sorted by group then query row: `pair_query` is the row in
    `probes`, `pair_probes` that query's probes with those of other groups set to -1 (slots kept).
    A shuffle sends query pair_query[p] to group pair_group[p] once, with pair_probes[p].
    ``groups`` = (lo, hi): only the pairs of groups lo <= g < hi (one wave's), the same entries
    as the whole result's for those groups.
    """
    probes = np.asarray(probes)
    n, nprobe = probes.shape
    group_of = np.asarray(list_group)
    flat_g = group_of[probes].ravel()  # [n * nprobe], query-major: flat index // nprobe is the query
    if groups is not None:
        flat = np.flatnonzero((flat_g >= groups[0]) & (flat_g < groups[1]))
        flat_g = flat_g[flat]
    else:
        flat = None
    if flat_g.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, nprobe), np.int32)
    # a stable sort by group alone orders by (group, query, slot): the flat entries are already in
    # (query, slot) order. Group ids fit 16 bits up to 65,536 groups, where numpy's stable sort is
    # a radix sort (linear), much cheaper than a lexsort of two keys over n * nprobe entries.
    keys = flat_g.astype(np.uint16) if int(flat_g.max()) < 2**16 and int(flat_g.min()) >= 0 else flat_g
    order = np.argsort(keys, kind="stable")
    entry = order if flat is None else flat[order]  # flat index into probes
    sq, sg = entry // nprobe, flat_g[order]
    new = np.ones(len(order), bool)
    new[1:] = (sq[1:] != sq[:-1]) | (sg[1:] != sg[:-1])
    pair_of = np.cumsum(new) - 1
    pair_probes = np.full((int(new.sum()), nprobe), -1, np.int32)
    pair_probes[pair_of, entry % nprobe] = probes.ravel()[entry]
    return sq[new].astype(np.int64), sg[new].astype(np.int32), pair_probes


# ================================================================================================
# 5. search one group, merge groups
# ================================================================================================

def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _run_parallel(fn, items) -> None:
    """fn over items on faiss's OpenMP thread count, one OpenMP thread per call (as graph.py does:
    the per-list products are small; nested OpenMP teams spin-wait at every list's barrier)."""
    faiss = _faiss()
    threads = max(1, faiss.omp_get_max_threads())
    if threads == 1:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
    faiss.omp_set_num_threads(threads)


def _topk_rows(d: np.ndarray, i: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the kk smallest (distance, id) pairs in lexicographic order (-1 ids carry inf)."""
    n, width = d.shape
    if width <= kk:
        pick = np.lexsort((np.where(i < 0, _ID_MAX, i), d), axis=-1)
        out_d, out_i = np.take_along_axis(d, pick, 1), np.take_along_axis(i, pick, 1)
        if width < kk:
            out_d = np.pad(out_d, ((0, 0), (0, kk - width)), constant_values=np.inf)
            out_i = np.pad(out_i, ((0, 0), (0, kk - width)), constant_values=-1)
        return out_d, out_i
    # Fast path: argpartition by distance; rows whose kk-th distance is tied (or inf) get the exact
    # lexicographic selection, so ties at the cut always keep the lower id.
    part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
    pd = np.take_along_axis(d, part, 1)
    cut = pd.max(axis=1, keepdims=True)
    ambiguous = ((d <= cut).sum(axis=1) > kk) | ~np.isfinite(cut[:, 0])
    out_d = np.empty((n, kk), np.float32)
    out_i = np.empty((n, kk), np.int64)
    pi = np.take_along_axis(i, part, 1)
    pick = np.lexsort((np.where(pi < 0, _ID_MAX, pi), pd), axis=-1)
    out_d[:], out_i[:] = np.take_along_axis(pd, pick, 1), np.take_along_axis(pi, pick, 1)
    rows = np.flatnonzero(ambiguous)
    if len(rows):
        pick = np.lexsort((np.where(i[rows] < 0, _ID_MAX, i[rows]), d[rows]), axis=-1)[:, :kk]
        out_d[rows] = np.take_along_axis(d[rows], pick, 1)
        out_i[rows] = np.take_along_axis(i[rows], pick, 1)
    return out_d, out_i


def search_group(
    base_ids: np.ndarray,
    base_vectors: np.ndarray,
    base_lists: np.ndarray,
    query_ids: np.ndarray,
    query_vectors: np.ndarray,
    query_probes_in_group: np.ndarray,
    kk: int,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    prepare_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-kk of each query over its probed lists that belong to this group, list-major.

    base_*: the group's vectors (any order; float16 or float32, or raw embeddings with `prepare`),
    their global ids and home lists. query_*: the queries sent to this group (distinct ids), their
    vectors (same dtype rules) and probes (int32[nq, nprobe], -1 for probes in other groups, as
    :func:`probes_by_group` gives). Returns (sq distances float32[nq, kk], ids int64[nq, kk]) in query
    input order, ascending (distance, id), padded with inf / -1; self is *not* removed (that happens
    after the merge of all groups).

    Each list is scanned once for all its queries: its base rows (ascending id) are converted to
    float32 (`prepare`) per list, never all at once; its queries (ascending id) go through one
    ``faiss.knn`` per LIST_QUERY_CHUNK queries, exactly as in any other grouping. A query probing w
    lists of the group is converted w times; with ``prepare_queries=False`` `query_vectors` are the
    prepared float32 vectors already (a caller that can hold them converts each query once: measured
    1.7x faster on 512-d float16 rows, for 2*d bytes more per query). A probe naming a
    list with no base rows here contributes nothing (an empty list; the caller must send each list's
    base rows to the group holding it).

    Memory: the base rows and query rows as given (1 KiB per row at 512-d float16), a candidate
    buffer of kk * 12 bytes per (query, probed list) pair, per running list its float32 base and
    query-chunk copies, and at the end a padded [REDUCE_QUERY_BLOCK, w, kk] block (w = the most
    probes any query has in this group, <= nprobe).
    """
    faiss = _faiss()
    convert = prepare or _as_float32
    convert_queries = convert if prepare_queries else _as_float32
    base_ids = np.asarray(base_ids, dtype=np.int64)
    base_lists = np.asarray(base_lists, dtype=np.int64)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    qp = np.asarray(query_probes_in_group, dtype=np.int64)
    nq = len(query_ids)
    if base_vectors.shape[0] != len(base_ids) or len(base_lists) != len(base_ids):
        raise ValueError(f"{base_vectors.shape[0]} base vectors, {len(base_ids)} ids, {len(base_lists)} lists")
    if query_vectors.shape[0] != nq or qp.shape[0] != nq:
        raise ValueError(f"{query_vectors.shape[0]} query vectors, {nq} ids, {qp.shape[0]} probe rows")
    if nq and len(np.unique(query_ids)) != nq:
        raise ValueError("a query was sent twice to one group")
    if kk < 1:
        raise ValueError(f"kk must be >= 1, got {kk}")
    # Each query's probes in this group, compacted to the left (slot = rank among them).
    valid = qp >= 0
    counts = valid.sum(axis=1)
    if nq == 0 or len(base_ids) == 0:
        return np.full((nq, kk), np.inf, np.float32), np.full((nq, kk), -1, np.int64)
    slot = np.cumsum(valid, axis=1) - 1
    pq_row, pq_col = np.nonzero(valid)
    pair_list = qp[pq_row, pq_col]
    pair_slot = slot[pq_row, pq_col]
    del valid, slot
    pair_order = np.lexsort((query_ids[pq_row], pair_list))  # by list, then ascending query id
    pair_row, pair_slot, pair_list = pq_row[pair_order], pair_slot[pair_order], pair_list[pair_order]
    del pq_row, pq_col, pair_order

    base_order = np.lexsort((base_ids, base_lists))  # by list, then ascending id
    sorted_lists = base_lists[base_order]
    lists = np.unique(pair_list)
    b_lo = np.searchsorted(sorted_lists, lists, "left")
    b_hi = np.searchsorted(sorted_lists, lists, "right")
    p_lo = np.searchsorted(pair_list, lists, "left")
    p_hi = np.searchsorted(pair_list, lists, "right")
    del pair_list, sorted_lists
    # One candidate row per (query, probed list) pair, in scan order: pairs * kk * 12 bytes. A
    # [query, slot] buffer would take nq * (the most probes any one query has here) * kk * 12, up to
    # nprobe / (mean probes per query in the group) times more (~2 GB of a 5.5 GB task at N = 1.28e7).
    cand_d = np.full((len(pair_row), kk), np.inf, np.float32)
    cand_i = np.full((len(pair_row), kk), -1, np.int64)

    def scan(j: int) -> None:
        if b_hi[j] == b_lo[j]:
            return
        rows_b = base_order[b_lo[j]:b_hi[j]]
        base = convert(base_vectors[rows_b])
        ids = base_ids[rows_b]
        top = min(kk, len(rows_b))
        for lo in range(p_lo[j], p_hi[j], LIST_QUERY_CHUNK):
            hi = min(p_hi[j], lo + LIST_QUERY_CHUNK)
            d, local = faiss.knn(convert_queries(query_vectors[pair_row[lo:hi]]), base, top)
            # each pair's own row: threads never write the same cell
            cand_d[lo:hi, :top] = d
            cand_i[lo:hi, :top] = np.where(local >= 0, ids[np.maximum(local, 0)], -1)

    _run_parallel(scan, range(len(lists)))
    return _topk_of_pairs(cand_d, cand_i, pair_row, pair_slot, counts, kk)


def _topk_of_pairs(cand_d: np.ndarray, cand_i: np.ndarray, pair_row: np.ndarray, pair_slot: np.ndarray,
                   counts: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the lexicographic top-kk over the candidates of its pairs (``cand_*[p]`` belongs
    to query ``pair_row[p]``, probe slot ``pair_slot[p]``; ``counts`` pairs per query), a block of
    queries at a time: the block's [queries, slots, kk] buffer is the only padded copy."""
    nq, block = len(counts), REDUCE_QUERY_BLOCK
    out_d = np.empty((nq, kk), np.float32)
    out_i = np.empty((nq, kk), np.int64)
    by_query = np.argsort(pair_row, kind="stable")  # each query's pairs contiguous
    starts = np.concatenate([[0], np.cumsum(counts)])
    for a in range(0, nq, block):
        b = min(nq, a + block)
        width = max(1, int(counts[a:b].max()))
        sel = by_query[starts[a]:starts[b]]
        d = np.full((b - a, width, kk), np.inf, np.float32)
        i = np.full((b - a, width, kk), -1, np.int64)
        d[pair_row[sel] - a, pair_slot[sel]] = cand_d[sel]
        i[pair_row[sel] - a, pair_slot[sel]] = cand_i[sel]
        out_d[a:b], out_i[a:b] = _topk_rows(d.reshape(b - a, width * kk), i.reshape(b - a, width * kk), kk)
    return out_d, out_i


def merge_group_results(
    best_d: np.ndarray, best_i: np.ndarray, rows: np.ndarray, d: np.ndarray, i: np.ndarray
) -> None:
    """Merge one group's top-kk (d, i) for queries at `rows` of (best_d, best_i), in place.

    :func:`pipeline.graph.merge_topk` is a lexicographic (distance, id) top-kk, so the groups may
    arrive in any order and the result is the same, bit for bit.
    """
    kk = best_d.shape[1]
    best_d[rows], best_i[rows] = merge_topk(best_d[rows], best_i[rows], d, i, kk)


# ================================================================================================
# 6. the whole graph in one process (the reference for the Ray stage)
# ================================================================================================

def sharded_knn_graph(
    vectors: np.ndarray,
    k: int,
    nlist: int | None = None,
    nprobe: int = 16,
    seed: int = 0,
    train_size: int | None = None,
    max_rows_per_group: int = DEFAULT_MAX_ROWS_PER_GROUP,
    centroids: np.ndarray | None = None,
    timings: dict | None = None,
    coarse: np.ndarray | None = None,
    coarse_cell: np.ndarray | None = None,
    coarse_probes: int | None = None,
    exhaustive_assign: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed kNN graph by cell-group-sharded IVF-Flat: (neighbors int64[N,k], sq_distances
    float32[N,k], cells int32[N]), self removed by id, -1/inf padding.

    Train two-level centroids (:func:`train_two_level`, or use `centroids`), assign every vector its
    home list and probes (:func:`probe_lists_two_level` through the coarse level, as the stage does;
    `coarse_probes` cells, default :func:`coarse_probes_for`; :func:`probe_lists`, every centroid,
    with `exhaustive_assign` or when `centroids` come without their `coarse` centroids and
    `coarse_cell`), cut the lists into groups (:func:`group_cells`), search
    each group (:func:`search_group`) and merge each query's groups (:func:`merge_group_results`),
    then drop self and keep k. `vectors` are prepared graph vectors (float32, or float16: converted
    per list). The result does not depend on `max_rows_per_group` (bit for bit). When `timings` is
    given, seconds of train (train_coarse, train_fine), assign, group and search are stored in it,
    with the number of groups and the mean groups per query (groups_per_query).
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array [N, D], got shape {vectors.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = vectors.shape[0]
    if n == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.int32)
    steps: dict = {}
    clock = time.perf_counter()
    if centroids is None:
        centroids, coarse_cell, coarse = train_two_level(vectors, nlist_for(n, nlist), seed, train_size, timings=steps)
    lists = centroids.shape[0]
    steps["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if exhaustive_assign or coarse is None or coarse_cell is None:
        home, probes = probe_lists(centroids, vectors, nprobe)
    else:
        home, probes = probe_lists_two_level(coarse, centroids, coarse_cell, vectors, nprobe, coarse_probes)
    steps["assign"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sizes = np.bincount(home, minlength=lists)
    probe_counts = np.bincount(probes.ravel(), minlength=lists)
    list_group = group_cells(sizes, probe_counts, max_rows_per_group)
    pair_query, pair_group, pair_probes = probes_by_group(probes, list_group)
    base_group = list_group[home]
    base_order = np.argsort(base_group, kind="stable")
    n_groups = int(list_group.max()) + 1
    b_bounds = np.searchsorted(base_group[base_order], np.arange(n_groups + 1))
    p_bounds = np.searchsorted(pair_group, np.arange(n_groups + 1))
    steps["group"] = time.perf_counter() - clock
    steps["groups"] = n_groups
    steps["groups_per_query"] = len(pair_query) / n

    clock = time.perf_counter()
    kk = k + 1
    best_d = np.full((n, kk), np.inf, np.float32)
    best_i = np.full((n, kk), -1, np.int64)
    all_ids = np.arange(n, dtype=np.int64)
    for g in range(n_groups):
        b = base_order[b_bounds[g]:b_bounds[g + 1]]
        p = slice(p_bounds[g], p_bounds[g + 1])
        q = pair_query[p]
        d, i = search_group(all_ids[b], vectors[b], home[b], q, vectors[q], pair_probes[p], kk)
        merge_group_results(best_d, best_i, q, d, i)
    neighbors, sq_distances = remove_self(best_i, best_d, all_ids, k)
    steps["search"] = time.perf_counter() - clock
    if timings is not None:
        timings.update(steps)
    return neighbors, sq_distances, home


__all__ = [
    "COARSE_POINTS_PER_CENTROID", "FINE_POINTS_PER_LIST", "MIN_POINTS_PER_LIST", "KMEANS_ITERATIONS", "COARSE_PROBES",
    "nlist_for", "coarse_count", "training_sample_ids", "fine_seed", "chain_order", "coarse_level", "fine_counts",
    "fine_level", "train_two_level", "probe_lists", "coarse_probes_for", "probe_lists_two_level", "group_cells",
    "group_rows", "probes_by_group",
    "search_group", "merge_group_results", "sharded_knn_graph",
]
