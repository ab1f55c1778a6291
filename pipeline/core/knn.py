"""The pieces of the kNN dataset graph (docs/d2.md#3-the-knn-graph) that are not the search itself: pure numpy
and FAISS (no Ray, no storage).

:func:`prepare_vectors` and :func:`prepare_raw` (the vectors a graph is built on), :func:`remove_self`
and :func:`merge_topk` (what every search's candidates go through), and the exact side:
:func:`exact_topk_block`, :func:`exact_knn`, :func:`recall_sample_ids` and :func:`recall_at_k`
(what an approximate graph is measured against). The graph itself, in one process or as the Ray
stage runs it, is :func:`pipeline.core.ivf.sharded_knn_graph`.

Distances are **squared** L2, because that is what FAISS computes and what docs/d2.md's kernel
``exp(-gamma * d)`` uses; the graph stage always writes squared L2 to the ``sq_distances`` column,
and the select stage takes the square root when ``graph.distance == "euclidean"``.
"""

from __future__ import annotations

import numpy as np

VECTOR_KINDS = ("image", "text", "image+text")


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


def recall_sample_ids(n_vectors: int, sample: int, seed: int) -> np.ndarray:
    """Sorted global ids of the seeded nodes whose recall is checked against exact search (all ids
    when n_vectors <= sample)."""
    if n_vectors <= sample:
        return np.arange(n_vectors, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x72656361])  # "reca": its own stream of the job's seed
    return np.sort(rng.choice(n_vectors, size=sample, replace=False)).astype(np.int64)


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
