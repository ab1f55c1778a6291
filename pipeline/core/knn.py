"""The kNN dataset graph (spec section 2): pure FAISS maths (numpy in, numpy out; no Ray, no storage).

:func:`prepare_vectors` (and :func:`prepare_raw`), :func:`knn_graph` (one process: a one-level
IVF-Flat index searched list-major), :func:`exact_knn`, :func:`recall_at_k` and the pieces the
graph stage and :mod:`pipeline.core.ivf` share with them (:func:`remove_self`, :func:`merge_topk`,
:func:`exact_topk_block`). Tests, the quality benchmark and small pools call these directly; the
graph stage computes :func:`pipeline.core.ivf.sharded_knn_graph`.

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

import math
import time
from typing import Literal

import numpy as np

IndexKind = Literal["flat", "ivfflat"]
INDEX_KINDS = ("flat", "ivfflat")
VECTOR_KINDS = ("image", "text", "image+text")

# FAISS warns when k-means gets fewer than 39 training points per centroid; below that the
# centroids are poorly placed and list sizes become very uneven.
MIN_POINTS_PER_LIST = 39
# k-means iterations for the coarse quantiser. Training is the one step that runs on a single
# worker; FAISS's default of 25 costs 2.5x the time of 10, and the lists only need to split the
# space into compact cells (recall is then set by nprobe, measured in benchmarks/graph_speed.py).
KMEANS_ITERATIONS = 10


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


def prepare_raw(raw: np.ndarray, vector: str, widths: tuple[int, ...]) -> np.ndarray:
    """:func:`prepare_vectors` of raw embeddings stored side by side in one array (the columns of
    `vector`, `widths` wide each: ``image+text`` is image | text), row by row: any subset of rows
    gives the rows of the whole array's result, so a task may prepare a list or a block at a time."""
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] != sum(widths):
        raise ValueError(f"raw {vector} vectors must be [n, {sum(widths)}] (columns {widths}), got shape {raw.shape}")
    if vector == "image+text":
        if len(widths) != 2:
            raise ValueError(f"image+text needs two column widths, got {widths}")
        return prepare_vectors(raw[:, : widths[0]], raw[:, widths[0]:], vector)
    if vector == "image":
        return prepare_vectors(raw, None, vector)
    return prepare_vectors(None, raw, vector)


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


def seeded_sample(n_vectors: int, size: int, seed: int, stream: int) -> np.ndarray:
    """Sorted ids of a seeded sample of `size` of `n_vectors` (all ids when n_vectors <= size);
    `stream` separates the random streams of different uses of one seed."""
    if n_vectors <= size:
        return np.arange(n_vectors, dtype=np.int64)
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n_vectors, size=size, replace=False)).astype(np.int64)


def training_ids(n_vectors: int, train_size: int, seed: int) -> np.ndarray:
    """Sorted global ids of the seeded training sample (all ids when N <= train_size)."""
    return seeded_sample(n_vectors, train_size, seed, 0x7261696E)  # "rain"


def recall_sample_ids(n_vectors: int, sample: int, seed: int) -> np.ndarray:
    """Sorted global ids of the seeded nodes whose recall is checked against exact search."""
    return seeded_sample(n_vectors, sample, seed, 0x72656361)  # "reca"


def build_empty_index(dim: int, index: str, nlist: int):
    """An untrained FAISS IVF-Flat index (``flat`` = IVF with one list: an exact scan)."""
    faiss = _faiss()
    if index not in INDEX_KINDS:
        raise ValueError(f"graph.index must be one of {INDEX_KINDS}, got {index!r}")
    quantizer = faiss.IndexFlatL2(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist if index == "ivfflat" else 1, faiss.METRIC_L2)
    ivf.own_fields = True
    quantizer.this.disown()  # the IVF index owns and frees its quantiser
    return ivf


def train_index(ivf, sample: np.ndarray, seed: int = 0) -> None:
    """Train the coarse quantiser on `sample` (one-level k-means), deterministically for `seed`."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if ivf.nlist == 1:
        # One list holds everything: its centroid is irrelevant, so skip k-means (and its warning).
        ivf.quantizer.add(np.zeros((1, ivf.d), dtype=np.float32))
        ivf.is_trained = True
        return
    if sample.shape[0] < ivf.nlist:
        raise ValueError(f"{sample.shape[0]} training vectors cannot train {ivf.nlist} IVF lists")
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

    The IVF-Flat index is searched list-major (:func:`_search_flat_lists`).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.shape[0] == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.int32)
    _, iq = coarse if coarse is not None else coarse_assign(ivf, q, nprobe)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    nb = np.empty((q.shape[0], k), np.int64)
    sqd = np.empty((q.shape[0], k), np.float32)
    for lo in range(0, q.shape[0], QUERY_BLOCK):
        hi = min(q.shape[0], lo + QUERY_BLOCK)
        d, i = _search_flat_lists(ivf, q[lo:hi], iq[lo:hi], k + 1)
        nb[lo:hi], sqd[lo:hi] = remove_self(i, d, query_ids[lo:hi], k)
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
    train_size: int = 200_000,
    distance: str = "sqeuclidean",
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed kNN graph of `vectors` (self excluded): (neighbors int64[N,k], distances float32[N,k],
    cells int32[N]).

    Distances are squared L2 (``distance="euclidean"`` returns their square root). Rows with fewer
    than k other nodes in reach are padded with -1 / inf. The IVF quantiser is trained (one-level
    k-means) on a seeded sample of `train_size` vectors (:func:`training_ids`), so the result is
    deterministic for a seed. This is the one-process path for small pools and benchmarks; the graph
    stage computes :func:`pipeline.core.ivf.sharded_knn_graph` (two-level training, nlist growing
    with N, search by groups of lists), bit for bit. Uses FAISS's OpenMP threads
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
    ivf = build_empty_index(dim, index, lists)
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
    """Bytes an IVF index holds in memory: codes + 8-byte ids per vector and the coarse centroids
    (computed, not serialised, so measuring a 2 GB index costs no 2 GB copy)."""
    return int(ivf.ntotal) * (int(ivf.code_size) + 8) + int(ivf.nlist) * int(ivf.d) * 4
