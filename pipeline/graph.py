"""The kNN dataset graph (spec section 2): pure FAISS maths, plus the sharded Ray stage.

Pure part (numpy in, numpy out; no Ray, no storage): :func:`prepare_vectors`, :func:`knn_graph`,
:func:`exact_knn`, :func:`recall_at_k` and the building blocks the stage shares with them
(:func:`build_empty_index`, :func:`train_index`, :func:`search_knn`, :func:`remove_self`,
:func:`merge_topk`). Tests, the quality benchmark and small pools call these directly.

Distances: every function returns **squared** L2 distances unless asked otherwise, because that
is what FAISS computes and what the spec's kernel ``exp(-gamma * d)`` uses. The stage always
writes squared L2 to the ``sq_distances`` column, whatever ``graph.distance`` says; the select
stage takes the square root when ``graph.distance == "euclidean"``. :func:`knn_graph` (used
directly by benchmarks) applies it itself when called with ``distance="euclidean"``.

Cells: a node's cell is its nearest IVF centroid (the inverted list it is stored in, barring exact
distance ties), which the select stage uses as its partition. The exact ``flat`` index has no lists: every node gets cell 0,
so the select stage runs one exact global greedy, which is what choosing the exact index asks for.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivfflat", "ivfpq"]
INDEX_KINDS = ("flat", "ivfflat", "ivfpq")
VECTOR_KINDS = ("image", "text", "image+text")

# FAISS warns when k-means gets fewer than 39 training points per centroid; below that the
# centroids are poorly placed and list sizes become very uneven.
MIN_POINTS_PER_LIST = 39
# k-means iterations for the coarse quantiser. Training is the one step that runs on a single
# worker; FAISS's default of 25 costs 2.5x the time of 10, and the lists only need to split the
# space into compact cells (recall is then set by nprobe, measured in benchmarks/graph_speed.py).
KMEANS_ITERATIONS = 10


# ================================================================================================
# Pure maths
# ================================================================================================

def _faiss():
    import faiss

    return faiss


def prepare_vectors(
    image_emb: np.ndarray | None,
    text_emb: np.ndarray | None,
    vector: str = "image",
) -> np.ndarray:
    """The vectors the graph is built on, float32 and L2-normalised row by row.

    ``image+text`` normalises each half, concatenates and normalises again (so both modalities
    weigh the same). All-zero rows stay zero (there is no direction to normalise to). Non-finite
    values are errors, with the first bad row named.
    """
    if vector not in VECTOR_KINDS:
        raise ValueError(f"graph.vector must be one of {VECTOR_KINDS}, got {vector!r}")
    if vector in ("image", "image+text") and image_emb is None:
        raise ValueError(f"graph.vector={vector!r} needs image embeddings, got None")
    if vector in ("text", "image+text") and text_emb is None:
        raise ValueError(f"graph.vector={vector!r} needs text embeddings, got None")
    if vector == "image":
        out = _normalise(image_emb, "image_embedding")
    elif vector == "text":
        out = _normalise(text_emb, "text_embedding")
    else:
        img = _normalise(image_emb, "image_embedding")
        txt = _normalise(text_emb, "text_embedding")
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"image and text embeddings have different row counts: {img.shape[0]} != {txt.shape[0]}")
        out = _normalise(np.concatenate([img, txt], axis=1), "image+text")
    return out


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array [N, D], got shape {x.shape}")
    x = x.astype(np.float32, copy=True)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name}: {int((~finite).sum())} rows hold NaN/inf values (first: row {bad})")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return np.ascontiguousarray(x)


def default_nlist(n_vectors: int, n_train: int) -> int:
    """About 4*sqrt(N) lists, but never fewer than MIN_POINTS_PER_LIST training points per list."""
    if n_vectors <= 0:
        raise ValueError(f"cannot size an IVF index for {n_vectors} vectors")
    wanted = int(round(4 * math.sqrt(n_vectors)))
    return max(1, min(wanted, n_train // MIN_POINTS_PER_LIST))


def resolve_nlist(index: str, n_vectors: int, n_train: int, nlist: int | None) -> int:
    """The number of IVF lists actually used (1 for ``flat``). An explicit nlist larger than the
    training sample cannot be trained and is an error."""
    if index == "flat":
        return 1
    if nlist is None:
        return default_nlist(n_vectors, n_train)
    if nlist < 1:
        raise ValueError(f"graph.nlist must be >= 1, got {nlist}")
    if nlist > n_train:
        raise ValueError(
            f"graph.nlist={nlist} exceeds the {n_train} training vectors available "
            f"(min(train_size, N)); lower nlist or leave it null"
        )
    return nlist


def training_ids(n_vectors: int, train_size: int, seed: int) -> np.ndarray:
    """Sorted global ids of the seeded training sample (all ids when N <= train_size)."""
    if n_vectors <= train_size:
        return np.arange(n_vectors, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x7261696E])  # a stream of its own: "rain"
    return np.sort(rng.choice(n_vectors, size=train_size, replace=False)).astype(np.int64)


def recall_sample_ids(n_vectors: int, sample: int, seed: int) -> np.ndarray:
    """Sorted global ids of the seeded nodes whose recall is checked against exact search."""
    if sample >= n_vectors:
        return np.arange(n_vectors, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x72656361])  # "reca"
    return np.sort(rng.choice(n_vectors, size=sample, replace=False)).astype(np.int64)


def build_empty_index(dim: int, index: str, nlist: int, pq_m: int = 32, pq_bits: int = 8):
    """An untrained FAISS IVF index (``flat`` = IVF with one list: an exact scan that shards and
    merges exactly like the approximate kinds)."""
    faiss = _faiss()
    if index not in INDEX_KINDS:
        raise ValueError(f"graph.index must be one of {INDEX_KINDS}, got {index!r}")
    quantizer = faiss.IndexFlatL2(dim)
    if index in ("flat", "ivfflat"):
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist if index == "ivfflat" else 1, faiss.METRIC_L2)
    else:
        if dim % pq_m != 0:
            raise ValueError(f"graph.pq_m={pq_m} must divide the vector dimension {dim}")
        if not 1 <= pq_bits <= 16:
            raise ValueError(f"graph.pq_bits must be in 1..16, got {pq_bits}")
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_bits)
    ivf.own_fields = True
    quantizer.this.disown()  # the IVF index owns and frees its quantiser
    return ivf


def train_index(ivf, sample: np.ndarray, seed: int = 0) -> None:
    """Train the coarse quantiser (and PQ codebooks) on `sample`, deterministically for `seed`."""
    faiss = _faiss()
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if ivf.nlist == 1 and not isinstance(ivf, faiss.IndexIVFPQ):
        # One list holds everything: its centroid is irrelevant, so skip k-means (and its warning).
        ivf.quantizer.add(np.zeros((1, ivf.d), dtype=np.float32))
        ivf.is_trained = True
        return
    if sample.shape[0] < ivf.nlist:
        raise ValueError(f"{sample.shape[0]} training vectors cannot train {ivf.nlist} IVF lists")
    if isinstance(ivf, faiss.IndexIVFPQ):
        ksub = 1 << ivf.pq.nbits
        if sample.shape[0] < ksub:
            raise ValueError(
                f"ivfpq with pq_bits={ivf.pq.nbits} needs at least {ksub} training vectors, got {sample.shape[0]}"
            )
        ivf.pq.cp.seed = seed
    ivf.cp.seed = seed
    ivf.cp.niter = KMEANS_ITERATIONS
    # FAISS subsamples to max_points_per_centroid*nlist with its own seed; we already sampled.
    ivf.cp.max_points_per_centroid = max(256, -(-sample.shape[0] // max(ivf.nlist, 1)))
    ivf.train(sample)


def coarse_assign(ivf, vectors: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The `nprobe` nearest IVF lists of each vector: (distances, list ids), nearest first."""
    nprobe = max(1, min(int(nprobe), ivf.nlist))
    dq, iq = ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), nprobe)
    return dq, iq


def add_vectors(ivf, vectors: np.ndarray, ids: np.ndarray, assign: np.ndarray | None = None) -> np.ndarray:
    """Add `vectors` under global `ids`; returns each vector's list (its cell)."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    xids = np.ascontiguousarray(ids, dtype=np.int64)
    if x.shape[0] != xids.shape[0]:
        raise ValueError(f"{x.shape[0]} vectors but {xids.shape[0]} ids")
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int32)
    if assign is None:
        _, iq = coarse_assign(ivf, x, 1)
        assign = iq[:, 0]
    assign = np.ascontiguousarray(assign, dtype=np.int64)
    ivf.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(xids), faiss.swig_ptr(assign))
    return assign.astype(np.int32)


def remove_self(
    neighbors: np.ndarray, distances: np.ndarray, query_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own id from its result row *by id* and keep the first `k` others.

    An approximate index need not return the query first (exact duplicates tie at distance 0 and
    PQ distances are not 0 for the query itself), so the position of self is never assumed.
    Missing neighbours are -1 with distance inf; squared distances are clamped at 0 (the
    ``|x|^2 + |y|^2 - 2xy`` formula can give -1e-7 for identical vectors).
    """
    neighbors = np.asarray(neighbors, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float32)
    query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1, 1)
    keep = (neighbors != query_ids) & (neighbors >= 0)
    # stable sort puts the kept entries first, in their original (distance) order
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out_n = np.take_along_axis(neighbors, order, axis=1)
    out_d = np.take_along_axis(distances, order, axis=1)
    valid = np.take_along_axis(keep, order, axis=1)
    if out_n.shape[1] < k:  # the index returned fewer than k columns
        pad = k - out_n.shape[1]
        out_n = np.pad(out_n, ((0, 0), (0, pad)), constant_values=-1)
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.inf)
        valid = np.pad(valid, ((0, 0), (0, pad)), constant_values=False)
    out_n = np.where(valid, out_n, -1)
    out_d = np.where(valid, np.maximum(out_d, 0.0), np.inf).astype(np.float32)
    return np.ascontiguousarray(out_n), np.ascontiguousarray(out_d)


# Queries processed together by the list-major search: bounds its candidate buffer to
# QUERY_BLOCK * nprobe * (k+1) * 12 bytes (about 280 MB for nprobe=16, k=10).
QUERY_BLOCK = 131_072


def search_knn(
    ivf,
    queries: np.ndarray,
    query_ids: np.ndarray,
    k: int,
    nprobe: int,
    coarse: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search k+1 neighbours per query, drop the query itself by id, keep k.

    Returns (neighbors int64[n,k], sq_distances float32[n,k], cells int32[n]); a query's cell is
    its nearest list, taken from the same coarse search that picks the probed lists (`coarse`,
    when the caller already has it).

    IVF-Flat is searched list-major (:func:`_search_flat_lists`); IVF-PQ with FAISS's own scan.
    """
    faiss = _faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.shape[0] == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.int32)
    dq, iq = coarse if coarse is not None else coarse_assign(ivf, q, nprobe)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    if isinstance(ivf, faiss.IndexIVFFlat):
        nb = np.empty((q.shape[0], k), np.int64)
        sqd = np.empty((q.shape[0], k), np.float32)
        for lo in range(0, q.shape[0], QUERY_BLOCK):
            hi = min(q.shape[0], lo + QUERY_BLOCK)
            d, i = _search_flat_lists(ivf, q[lo:hi], iq[lo:hi], k + 1)
            nb[lo:hi], sqd[lo:hi] = remove_self(i, d, query_ids[lo:hi], k)
    else:
        ivf.nprobe = iq.shape[1]
        d, i = ivf.search_preassigned(q, k + 1, iq, dq)
        nb, sqd = remove_self(i, d, query_ids, k)
    return nb, sqd, iq[:, 0].astype(np.int32)


def _search_flat_lists(ivf, q: np.ndarray, iq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`kk` of each query over its probed lists, visiting each list once for all its queries.

    Why not ``ivf.search``: FAISS scans list by list *per query*, streaming every probed list from
    memory once per query; at 512-d that is memory-bound (~3 GFLOP/s measured on 2 cores). When the
    queries are the whole pool, each list is probed by ~N*nprobe/nlist queries, so one BLAS product
    (``faiss.knn``) per list reuses the list from cache: same distances, ~10x faster. Each vector
    lies in exactly one list and the probed lists are distinct, so no id appears twice among a
    query's candidates; ties are broken by the lower id.
    """
    faiss = _faiss()
    n, nprobe = iq.shape
    dim = ivf.d
    invlists = ivf.invlists
    cand_d = np.full((n, nprobe, kk), np.inf, np.float32)
    cand_i = np.full((n, nprobe, kk), -1, np.int64)
    pair_list = iq.ravel()
    order = np.argsort(pair_list, kind="stable")
    pair_query = (order // nprobe).astype(np.int64)
    pair_slot = (order % nprobe).astype(np.int64)
    sorted_lists = pair_list[order]
    bounds = np.flatnonzero(np.diff(sorted_lists)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(sorted_lists)]])

    def scan(lo: int, hi: int) -> None:
        list_no = int(sorted_lists[lo])
        if list_no < 0:
            return  # fewer lists than nprobe
        size = invlists.list_size(list_no)
        if size == 0:
            return
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * dim * 4).view(np.float32).reshape(size, dim)
        ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).view(np.int64)
        rows = pair_query[lo:hi]
        top = min(kk, size)
        d, local = faiss.knn(q[rows], codes, top)
        # distinct (row, slot) pairs per list: threads never write the same cell
        cand_d[rows, pair_slot[lo:hi], :top] = d
        cand_i[rows, pair_slot[lo:hi], :top] = ids[local]

    # Parallel over lists, one OpenMP thread per call: the per-list products are small, and
    # OpenMP teams inside each would spin-wait at every list's barrier (10x slower measured when
    # another process shares the cores). faiss releases the GIL inside knn.
    threads = max(1, faiss.omp_get_max_threads())
    if threads == 1:
        for lo, hi in zip(starts, stops):
            scan(lo, hi)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
            for future in [pool.submit(scan, lo, hi) for lo, hi in zip(starts, stops)]:
                future.result()
    cand_d = cand_d.reshape(n, nprobe * kk)
    cand_i = cand_i.reshape(n, nprobe * kk)
    if nprobe > 1:  # keep the kk smallest (a deterministic function of the candidates), then sort them
        part = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
        cand_d = np.take_along_axis(cand_d, part, axis=1)
        cand_i = np.take_along_axis(cand_i, part, axis=1)
    tie_id = np.where(cand_i < 0, np.iinfo(np.int64).max, cand_i)
    pick = np.lexsort((tie_id, cand_d), axis=-1)
    return np.take_along_axis(cand_d, pick, axis=1), np.take_along_axis(cand_i, pick, axis=1)


def knn_graph(
    vectors: np.ndarray,
    k: int,
    index: IndexKind = "ivfflat",
    nlist: int | None = None,
    nprobe: int = 16,
    seed: int = 0,
    pq_m: int = 32,
    pq_bits: int = 8,
    train_size: int = 200_000,
    distance: str = "sqeuclidean",
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed kNN graph of `vectors` (self excluded): (neighbors int64[N,k], distances float32[N,k],
    cells int32[N]).

    Distances are squared L2 (``distance="euclidean"`` returns their square root). Rows with fewer
    than k other nodes in reach are padded with -1 / inf. The IVF quantiser is trained on a seeded
    sample of `train_size` vectors (:func:`training_ids`), so the result is deterministic for a
    seed and equal to what the Ray stage computes on the same vectors. Uses FAISS's OpenMP threads
    as set by the caller (``faiss.omp_set_num_threads``). When `timings` is given, the seconds of
    each step (train, add, search) are stored in it.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array [N, D], got shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if distance not in ("sqeuclidean", "euclidean"):
        raise ValueError(f"distance must be 'sqeuclidean' or 'euclidean', got {distance!r}")
    n, dim = x.shape
    if n == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.int32)
    clock = time.perf_counter()
    train_ids = training_ids(n, train_size, seed)
    lists = resolve_nlist(index, n, len(train_ids), nlist)
    ivf = build_empty_index(dim, index, lists, pq_m, pq_bits)
    train_index(ivf, x[train_ids], seed)
    ids = np.arange(n, dtype=np.int64)
    steps = {"train": time.perf_counter() - clock}
    clock = time.perf_counter()
    # One coarse search serves both the add (its nearest list) and the search (its nprobe lists).
    dq, iq = coarse_assign(ivf, x, nprobe)
    add_vectors(ivf, x, ids, assign=iq[:, 0])
    steps["add"] = time.perf_counter() - clock
    clock = time.perf_counter()
    neighbors, sq_distances, cells = search_knn(ivf, x, ids, k, nprobe, coarse=(dq, iq))
    steps["search"] = time.perf_counter() - clock
    if timings is not None:
        timings.update(steps)
        timings["index_bytes"] = index_bytes(ivf)
    if distance == "euclidean":
        sq_distances = np.sqrt(sq_distances)
    return neighbors, sq_distances, cells


def merge_topk(
    d_a: np.ndarray, i_a: np.ndarray, d_b: np.ndarray, i_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row k smallest of two (distances, ids) result sets; -1 entries (inf) sort last.

    Ties are broken by the lower id, so the merge is independent of the order blocks arrive in.
    """
    d = np.concatenate([d_a, d_b], axis=1).astype(np.float32)
    i = np.concatenate([i_a, i_b], axis=1).astype(np.int64)
    d = np.where(i < 0, np.inf, d)
    tie_id = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((tie_id, d), axis=-1)[:, :k] if d.shape[0] else np.zeros((0, min(k, d.shape[1])), np.int64)
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def exact_topk_block(
    queries: np.ndarray, base: np.ndarray, base_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k smallest squared L2 distances from `queries` to one block of base vectors."""
    faiss = _faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    b = np.ascontiguousarray(base, dtype=np.float32)
    kk = min(k, b.shape[0])
    if kk == 0 or q.shape[0] == 0:
        return np.full((q.shape[0], k), np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
    d, local = faiss.knn(q, b, kk)
    ids = np.where(local >= 0, np.asarray(base_ids, dtype=np.int64)[np.maximum(local, 0)], -1)
    if kk < k:
        d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
    return d.astype(np.float32), ids


def exact_knn(
    vectors: np.ndarray, k: int, query_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by brute force (self removed by id): (neighbors int64[Q,k], sq_distances float32[Q,k])
    for the nodes `query_ids` (default: all)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.arange(x.shape[0], dtype=np.int64) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= x.shape[0]):
        raise ValueError(f"query_ids must lie in [0, {x.shape[0]}), got range [{ids.min()}, {ids.max()}]")
    d, i = exact_topk_block(x[ids], x, np.arange(x.shape[0], dtype=np.int64), k + 1)
    return remove_self(i, d, ids, k)


def recall_at_k(approx_neighbors: np.ndarray, exact_neighbors: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / |exact| (ids; -1 padding ignored; rows with no exact
    neighbour are skipped). Equal-distance ties can make an exact search itself score below 1."""
    approx = np.asarray(approx_neighbors, dtype=np.int64)
    exact = np.asarray(exact_neighbors, dtype=np.int64)
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"approx has {approx.shape[0]} rows, exact has {exact.shape[0]}")
    if exact.shape[0] == 0:
        return float("nan")
    hits = np.zeros(exact.shape[0], dtype=np.int64)
    for j in range(exact.shape[1]):
        col = exact[:, j : j + 1]
        hits += ((approx == col) & (col >= 0)).any(axis=1)
    sizes = (exact >= 0).sum(axis=1)
    ok = sizes > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(hits[ok] / sizes[ok]))


def index_bytes(ivf) -> int:
    """Bytes an IVF index holds in memory: codes + 8-byte ids per vector, coarse centroids, PQ
    codebooks (computed, not serialised, so measuring a 2 GB index costs no 2 GB copy)."""
    faiss = _faiss()
    total = int(ivf.ntotal) * (int(ivf.code_size) + 8) + int(ivf.nlist) * int(ivf.d) * 4
    if isinstance(ivf, faiss.IndexIVFPQ):
        total += int(ivf.pq.M) * int(ivf.pq.ksub) * int(ivf.pq.dsub) * 4
    return total


# ================================================================================================
# The Ray stage
# ================================================================================================
#
# Layout under WORKDIR/graph/:
#   nodes.parquet                  node, uid, part (written once, streamed part by part)
#   index/plan.json                parts, row counts, dim, nlist, the add groups: fixed on the first
#                                  run so a resumed run builds the same shards
#   index/trained.faissindex       the trained empty index (one worker, seeded sample)
#   index/shard-NNNNN.faissindex   one group of parts added to a copy of it (global ids)
#   index/merged.faissindex        all shards merged; its inverted lists live in
#   index/merged.ivfdata           (FAISS OnDiskInvertedLists, memory-mapped by the searchers)
#   part-NNNNN.parquet             node, neighbors[k], sq_distances[k], cell, one per embedding part
#   _stats.json, _SUCCESS.json     via workdir.commit_stage
#
# Merge, not search-per-shard: searching S shards separately costs every search task S index
# reads (S times the index's I/O per task) and S top-k merges; one merged index with on-disk
# inverted lists is read through mmap, so the search tasks on a node share one copy in the page
# cache and no process ever holds all vectors. The results are identical either way (same
# quantiser, same probed lists). Shard files are deleted once the merged index is committed.

INDEX_DIR = "index"
TRAINED = "trained.faissindex"
MERGED = "merged.faissindex"
MERGED_DATA = "merged.ivfdata"
PLAN = "plan.json"
NODES = "nodes.parquet"
EMBEDDING_COLUMNS = {"image": ("image_embedding",), "text": ("text_embedding",),
                     "image+text": ("image_embedding", "text_embedding")}


@dataclass(frozen=True)
class EmbeddingPart:
    name: str  # "part-NNNNN"
    url: str
    rows: int
    offset: int  # global node id of its first row


def _task_threads() -> int:
    """FAISS OpenMP threads for this Ray task: the CPUs Ray assigned to it (>= 1), so concurrent
    tasks on a node do not oversubscribe its cores."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads = max(1, int(cpus))
    _faiss().omp_set_num_threads(threads)
    return threads


def read_part_vectors(store, url: str, vector: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The graph vectors (prepare_vectors) of one embedding part, optionally only some rows."""
    from .storage import fixed_list_to_numpy  # storage stays out of the pure maths' imports

    columns = list(EMBEDDING_COLUMNS[vector])
    table = store.read_parquet(url, columns=columns)
    if rows is not None:
        table = table.take(np.asarray(rows, dtype=np.int64))
    arrays = {c: fixed_list_to_numpy(table.column(c), c, url) for c in columns}
    return prepare_vectors(arrays.get("image_embedding"), arrays.get("text_embedding"), vector)


def _part_layout(store, urls: list[str], vector: str) -> tuple[list[int], int]:
    """Row counts of the parts (from parquet footers, no data read) and the graph vector dimension."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, dim = [], None
    for url in urls:
        with store.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            rows.append(pf.metadata.num_rows)
        part_dim = 0
        for col in ("uid",) + EMBEDDING_COLUMNS[vector]:
            if col not in schema.names:
                raise ValueError(f"embedding part {url} has no column {col!r} (columns: {schema.names})")
        for col in EMBEDDING_COLUMNS[vector]:
            typ = schema.field(col).type
            if not pa.types.is_fixed_size_list(typ):
                raise ValueError(f"embedding part {url}: column {col} must be fixed_size_list, got {typ}")
            part_dim += typ.list_size
        if dim is None:
            dim = part_dim
        elif dim != part_dim:
            raise ValueError(f"embedding part {url} has graph vector dimension {part_dim}, earlier parts {dim}")
    return rows, int(dim or 0)


def list_embedding_parts(store, cfg) -> tuple[list[EmbeddingPart], int]:
    """The committed embedding parts in sorted name order with their node offsets, and the graph
    vector dimension."""
    from . import workdir
    from .storage import basename

    urls = workdir.committed_parts(store, cfg, "embed")  # sorted: one directory, so name order
    if not urls:
        raise FileNotFoundError(f"no embedding parts (part-*.parquet) in {workdir.stage_dir(cfg, 'embed')}")
    names = [basename(u)[: -len(".parquet")] for u in urls]
    rows, dim = _part_layout(store, urls, cfg.graph.vector)
    offsets = np.concatenate([[0], np.cumsum(rows)])[:-1]
    return [EmbeddingPart(n, u, int(r), int(o)) for n, u, r, o in zip(names, urls, rows, offsets)], dim


def join_url(base: str, *parts: str) -> str:
    from .storage import join

    return join(base, *parts)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _ids_by_part(parts: list[EmbeddingPart], ids: np.ndarray) -> list[tuple[EmbeddingPart, np.ndarray]]:
    """Split sorted global ids into (part, local rows) pairs."""
    starts = np.array([p.offset for p in parts], dtype=np.int64)
    where = np.searchsorted(starts, ids, side="right") - 1
    out = []
    for idx in np.unique(where):
        sel = ids[where == idx]
        out.append((parts[idx], sel - parts[idx].offset))
    return out


def _read_whole_part(store, part: EmbeddingPart, vector: str) -> np.ndarray:
    """All graph vectors of `part`, which must still hold the rows the stage planned with."""
    x = read_part_vectors(store, part.url, vector)
    if x.shape[0] != part.rows:
        raise RuntimeError(f"{part.url} has {x.shape[0]} rows, {part.rows} when the stage started")
    return x


def _submit_gather(store, vector: str, by_part: list[tuple[EmbeddingPart, np.ndarray]], parts_per_task: int) -> list:
    """Ray tasks gathering the vectors of the (part, local rows) pairs, `parts_per_task` parts each."""
    import ray

    gather = ray.remote(num_cpus=1)(_gather_rows)
    return [gather.remote(store, vector, [(p.url, rows, p.offset) for p, rows in chunk])
            for chunk in _chunks(by_part, parts_per_task)]


# -- Ray task bodies (plain functions; wrapped with ray.remote in run_graph_stage) -----------------

def _gather_rows(store, vector: str, items: list[tuple[str, np.ndarray, int]]):
    """Vectors of selected rows of some parts: (global ids, float32 vectors)."""
    ids, vecs = [], []
    for url, rows, offset in items:
        vecs.append(read_part_vectors(store, url, vector, rows))
        ids.append(np.asarray(rows, dtype=np.int64) + offset)
    return np.concatenate(ids), np.concatenate(vecs)


def _local_copy(store, url: str, local_path: str) -> str:
    """`url` itself when local; else a copy under local_path (atomic rename)."""
    from .storage import is_local

    if is_local(url):
        return store.path(url)
    if not os.path.exists(local_path):
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        tmp = f"{local_path}.tmp-{os.getpid()}"
        store.fs(url).get_file(store.path(url), tmp)
        os.replace(tmp, local_path)
    return local_path


def _read_index_url(store, url: str):
    from .storage import basename

    faiss = _faiss()
    with tempfile.TemporaryDirectory(prefix="d2prune-graph-") as tmp:
        path = _local_copy(store, url, os.path.join(tmp, basename(url)))
        return faiss.read_index(path)


def _write_index_url(store, url: str, ivf) -> None:
    faiss = _faiss()
    store.write_bytes(url, faiss.serialize_index(ivf).tobytes())


def _train_task(store, index_dir: str, dim: int, kind: str, nlist: int, pq_m: int, pq_bits: int, seed: int,
                *pieces) -> float:
    _task_threads()
    start = time.perf_counter()
    ids = np.concatenate([p[0] for p in pieces])
    vecs = np.concatenate([p[1] for p in pieces])
    # Pieces arrive grouped by task; sort by global id so the sample is exactly x[training_ids].
    order = np.argsort(ids, kind="stable")
    ivf = build_empty_index(dim, kind, nlist, pq_m, pq_bits)
    train_index(ivf, vecs[order], seed)
    _write_index_url(store, join_url(index_dir, TRAINED), ivf)
    return time.perf_counter() - start


def _add_task(store, index_dir: str, shard: str, vector: str, parts: list[EmbeddingPart]) -> tuple[str, int, float]:
    _task_threads()
    start = time.perf_counter()
    ivf = _read_index_url(store, join_url(index_dir, TRAINED))
    for part in parts:
        x = _read_whole_part(store, part, vector)
        add_vectors(ivf, x, np.arange(part.offset, part.offset + part.rows, dtype=np.int64))
    _write_index_url(store, join_url(index_dir, f"{shard}.faissindex"), ivf)
    return shard, int(ivf.ntotal), time.perf_counter() - start


def _merge_task(store, index_dir: str, shards: list[str], expected_total: int) -> tuple[int, int, float]:
    """Merge the shard indexes into one index whose inverted lists are a file on disk."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    _task_threads()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="d2prune-merge-") as tmp:
        local_shards = [
            _local_copy(store, join_url(index_dir, f"{s}.faissindex"), os.path.join(tmp, f"{s}.faissindex"))
            for s in shards
        ]
        trained = _read_index_url(store, join_url(index_dir, TRAINED))
        data_path = os.path.join(tmp, MERGED_DATA)
        merge_ondisk(trained, local_shards, data_path)
        if trained.ntotal != expected_total:
            raise RuntimeError(f"merged index holds {trained.ntotal} vectors, expected {expected_total}")
        index_path = os.path.join(tmp, MERGED)
        faiss.write_index(trained, index_path)
        total = int(trained.ntotal)
        del trained  # unmaps and flushes the inverted-list file before it is copied
        nbytes = os.path.getsize(data_path) + os.path.getsize(index_path)
        # The data file first, the index (which names it) last: the index file commits the merge.
        store.write_local_file(join_url(index_dir, MERGED_DATA), data_path)
        store.write_local_file(join_url(index_dir, MERGED), index_path)
    return total, nbytes, time.perf_counter() - start


def _open_merged(store, index_dir: str):
    """The merged index with its inverted lists memory-mapped (a node-local copy for remote workdirs,
    shared by every task on the node)."""
    import hashlib

    faiss = _faiss()
    from .storage import is_local

    index_url = join_url(index_dir, MERGED)
    if is_local(index_url):
        path = store.path(index_url)
    else:
        key = hashlib.sha256(index_url.encode()).hexdigest()[:16]
        cache = os.path.join(tempfile.gettempdir(), "d2prune-faiss", key)
        _local_copy(store, join_url(index_dir, MERGED_DATA), os.path.join(cache, MERGED_DATA))
        path = _local_copy(store, index_url, os.path.join(cache, MERGED))
    return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def graph_part_table(nodes: np.ndarray, neighbors: np.ndarray, sq_distances: np.ndarray, cells: np.ndarray):
    """A graph part in the on-disk contract's schema."""
    import pyarrow as pa

    k = neighbors.shape[1]
    n = len(nodes)
    return pa.table({
        "node": pa.array(np.asarray(nodes, dtype=np.int64)),
        "neighbors": pa.FixedSizeListArray.from_arrays(pa.array(neighbors.reshape(n * k).astype(np.int64)), k),
        "sq_distances": pa.FixedSizeListArray.from_arrays(
            pa.array(sq_distances.reshape(n * k).astype(np.float32)), k),
        "cell": pa.array(np.asarray(cells, dtype=np.int32)),
    })


def _search_task(store, index_dir: str, graph_dir: str, vector: str, k: int, nprobe: int,
                 parts: list[EmbeddingPart]) -> list[tuple[str, int, float]]:
    """Search k+1 neighbours of every row of `parts`; commit one graph part per embedding part."""
    _task_threads()
    ivf = _open_merged(store, index_dir)
    done = []
    for part in parts:
        start = time.perf_counter()
        x = _read_whole_part(store, part, vector)
        ids = np.arange(part.offset, part.offset + part.rows, dtype=np.int64)
        neighbors, sq_distances, cells = search_knn(ivf, x, ids, k, nprobe)
        store.write_parquet(join_url(graph_dir, f"{part.name}.parquet"),
                            graph_part_table(ids, neighbors, sq_distances, cells))
        done.append((part.name, part.rows, time.perf_counter() - start))
    return done


def _exact_task(store, vector: str, k: int, queries: np.ndarray, parts: list[EmbeddingPart]):
    """Exact top-k of `queries` over the rows of `parts` (self not removed here)."""
    _task_threads()
    d = np.full((queries.shape[0], k), np.inf, np.float32)
    i = np.full((queries.shape[0], k), -1, np.int64)
    for part in parts:
        x = read_part_vectors(store, part.url, vector)
        bd, bi = exact_topk_block(queries, x, np.arange(part.offset, part.offset + part.rows, dtype=np.int64), k)
        d, i = merge_topk(d, i, bd, bi, k)
    return d, i


def _as_completed(refs: list) -> Iterator[Any]:
    """Results of Ray tasks in completion order (the driver must never rely on submission order)."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


# -- driver ---------------------------------------------------------------------------------------

def _write_nodes(store, url: str, parts: list[EmbeddingPart]) -> None:
    """nodes.parquet, streamed part by part (only one part's uids in memory at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("node", pa.int64()), ("uid", pa.string()), ("part", pa.string())])
    with tempfile.TemporaryDirectory(prefix="d2prune-nodes-") as tmp:
        path = os.path.join(tmp, NODES)
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for part in parts:
                uids = store.read_parquet(part.url, columns=["uid"]).column("uid").cast(pa.string())
                if len(uids) != part.rows:
                    raise RuntimeError(f"{part.url} has {len(uids)} rows, {part.rows} when the stage started")
                if uids.null_count:
                    raise ValueError(f"{part.url}: {uids.null_count} rows have a null uid")
                writer.write_table(pa.table({
                    "node": pa.array(np.arange(part.offset, part.offset + part.rows, dtype=np.int64)),
                    "uid": uids,
                    "part": pa.array([part.name] * part.rows, pa.string()),
                }, schema=schema))
        store.write_local_file(url, path)


def _plan(store, cfg, parts: list[EmbeddingPart], dim: int, nlist: int, index_dir: str) -> dict[str, Any]:
    """The add groups and sizes, fixed on the first run; a resumed run must see the same parts."""
    from .workdir import StaleStageError

    current = {
        "parts": [p.name for p in parts], "rows": [p.rows for p in parts], "dim": dim, "nlist": nlist,
        "index": cfg.graph.index,
    }
    url = join_url(index_dir, PLAN)
    if store.exists(url):
        plan = store.read_json(url)
        for key, value in current.items():
            if plan.get(key) != value:
                raise StaleStageError(
                    f"{url} was made for other embedding parts or settings ({key} differs); the embedding "
                    "stage changed under a partial graph stage: rerun with --force-from graph"
                )
        return plan
    groups = _chunks(list(range(len(parts))), cfg.graph.parts_per_task)
    plan = dict(current, groups=groups, shards=[f"shard-{g:05d}" for g in range(len(groups))])
    store.write_json(url, plan)
    return plan


def _max_node_cpus() -> int:
    """CPUs of the largest node: the one-worker steps (train, merge) take a whole node's cores."""
    import ray

    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def run_graph_stage(cfg, store) -> dict[str, Any]:
    """Build the kNN graph of the committed embedding parts (see the layout above). Resumable: each
    step's output is committed and skipped on re-run; only missing graph parts are searched."""
    import ray

    from . import workdir
    from .runtime import init_ray

    graph_dir = workdir.stage_dir(cfg, "graph")
    if workdir.is_committed(store, cfg, "graph"):
        log.info("graph stage already committed in %s", graph_dir)
        return store.read_json(join_url(graph_dir, "_stats.json"))
    if not workdir.is_committed(store, cfg, "embed"):
        raise RuntimeError(
            f"the graph stage needs the committed embed stage: no {workdir.SUCCESS} in {workdir.stage_dir(cfg, 'embed')}"
        )
    workdir.claim_stage_dir(store, cfg, "graph")
    g = cfg.graph
    index_dir = join_url(graph_dir, INDEX_DIR)
    seconds = {"layout": 0.0, "nodes": 0.0, "train": 0.0, "add": 0.0, "merge": 0.0, "search": 0.0, "recall": 0.0}

    t0 = time.perf_counter()
    parts, dim = list_embedding_parts(store, cfg)
    n_nodes = parts[-1].offset + parts[-1].rows
    if n_nodes == 0:
        raise ValueError(f"the embedding parts in {workdir.stage_dir(cfg, 'embed')} hold no rows")
    train_ids = training_ids(n_nodes, g.train_size, cfg.seed)
    nlist = resolve_nlist(g.index, n_nodes, len(train_ids), g.nlist)
    plan = _plan(store, cfg, parts, dim, nlist, index_dir)
    seconds["layout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    nodes_url = join_url(graph_dir, NODES)
    if not store.exists(nodes_url):
        _write_nodes(store, nodes_url, parts)
    seconds["nodes"] = time.perf_counter() - t0

    init_ray(cfg.ray)
    node_cpus = _max_node_cpus()
    steps_run = []

    # 1. train on one worker, from a seeded sample gathered in parallel
    if not store.exists(join_url(index_dir, TRAINED)) and not store.exists(join_url(index_dir, MERGED)):
        t0 = time.perf_counter()
        piece_refs = _submit_gather(store, g.vector, _ids_by_part(parts, train_ids), g.parts_per_task)
        train = ray.remote(num_cpus=node_cpus)(_train_task)
        ray.get(train.remote(store, index_dir, dim, g.index, nlist, g.pq_m, g.pq_bits, cfg.seed, *piece_refs))
        seconds["train"] = time.perf_counter() - t0
        steps_run.append("train")

    # 2. add: one shard per group of parts, each into its own copy of the trained index
    merged_done = store.exists(join_url(index_dir, MERGED))
    if not merged_done:
        t0 = time.perf_counter()
        add = ray.remote(num_cpus=1)(_add_task)
        refs = [add.remote(store, index_dir, shard, g.vector, [parts[i] for i in group])
                for shard, group in zip(plan["shards"], plan["groups"])
                if not store.exists(join_url(index_dir, f"{shard}.faissindex"))]
        for shard, total, _ in _as_completed(refs):
            log.info("graph: %s holds %d vectors", shard, total)
        seconds["add"] = time.perf_counter() - t0
        steps_run.append("add")

        # 3. merge into one index with on-disk inverted lists
        t0 = time.perf_counter()
        merge = ray.remote(num_cpus=node_cpus)(_merge_task)
        ray.get(merge.remote(store, index_dir, plan["shards"], n_nodes))
        seconds["merge"] = time.perf_counter() - t0
        steps_run.append("merge")
    for shard in plan["shards"]:  # the merged index replaces them (also after a kill right after merging)
        store.rm(join_url(index_dir, f"{shard}.faissindex"))

    # 4. search k+1 per node; one committed graph part per embedding part
    t0 = time.perf_counter()
    missing = [p for p in parts if not store.exists(join_url(graph_dir, f"{p.name}.parquet"))]
    search = ray.remote(num_cpus=1)(_search_task)
    refs = [search.remote(store, index_dir, graph_dir, g.vector, g.k, g.nprobe, chunk)
            for chunk in _chunks(missing, g.parts_per_task)]
    searched_rows = 0
    for done in _as_completed(refs):
        searched_rows += sum(rows for _, rows, _ in done)
    seconds["search"] = time.perf_counter() - t0

    # 5. recall@k on a seeded sample against exact search over all parts
    t0 = time.perf_counter()
    recall, sample_size = _measure_recall(store, cfg, parts, graph_dir, n_nodes)
    seconds["recall"] = time.perf_counter() - t0

    index_size = store.size(join_url(index_dir, MERGED)) + store.size(join_url(index_dir, MERGED_DATA))
    stats = {
        "n_nodes": n_nodes,
        "k": g.k,
        "vector": g.vector,
        "dim": dim,
        "index": g.index,
        "nlist": nlist,
        "nprobe": min(g.nprobe, nlist),
        "train_size": int(len(train_ids)),
        "parts": len(parts),
        "shards": len(plan["shards"]),
        "parts_searched": len(missing),
        "parts_reused": len(parts) - len(missing),
        "rows_searched": searched_rows,
        "steps_run": steps_run,
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
        "recall_at_k": recall,
        "recall_sample": sample_size,
        "index_bytes": index_size,
        "float32_vector_bytes": n_nodes * dim * 4,
        "sq_distances": "squared L2 always; the select stage takes sqrt when graph.distance is 'euclidean'",
        "distance": g.distance,
    }
    workdir.commit_stage(store, cfg, "graph", stats)
    log.info("graph stage committed: %s", stats)
    return stats


def _measure_recall(store, cfg, parts: list[EmbeddingPart], graph_dir: str, n_nodes: int) -> tuple[float | None, int]:
    """recall@k of the written graph on `graph.recall_sample` seeded nodes, against exact search."""
    import ray

    g = cfg.graph
    sample = recall_sample_ids(n_nodes, g.recall_sample, cfg.seed)
    if len(sample) == 0:
        return None, 0
    by_part = _ids_by_part(parts, sample)
    pieces = ray.get(_submit_gather(store, g.vector, by_part, g.parts_per_task))
    ids = np.concatenate([p[0] for p in pieces])
    vecs = np.concatenate([p[1] for p in pieces])
    order = np.argsort(ids)
    ids, vecs = ids[order], vecs[order]
    if not np.array_equal(ids, sample):
        raise RuntimeError("recall sample rows were not all gathered")

    exact = ray.remote(num_cpus=1)(_exact_task)
    queries = ray.put(vecs)
    best_d = np.full((len(ids), g.k + 1), np.inf, np.float32)
    best_i = np.full((len(ids), g.k + 1), -1, np.int64)
    for d, i in _as_completed([exact.remote(store, g.vector, g.k + 1, queries, chunk)
                               for chunk in _chunks(parts, g.parts_per_task)]):
        best_d, best_i = merge_topk(best_d, best_i, d, i, g.k + 1)
    exact_neighbors, _ = remove_self(best_i, best_d, ids, g.k)

    from .storage import fixed_list_to_numpy

    approx = np.full((len(ids), g.k), -1, np.int64)
    for part, rows in by_part:
        table = store.read_parquet(join_url(graph_dir, f"{part.name}.parquet"), columns=["node", "neighbors"])
        table = table.take(np.asarray(rows, dtype=np.int64))
        nodes = table.column("node").to_numpy()
        if not np.array_equal(nodes, rows + part.offset):
            raise RuntimeError(f"graph part {part.name} rows are not in node order")
        approx[np.searchsorted(ids, nodes)] = fixed_list_to_numpy(table.column("neighbors"), "neighbors", part.name)
    return recall_at_k(approx, exact_neighbors), int(len(ids))
