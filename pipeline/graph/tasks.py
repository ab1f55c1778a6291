"""The graph stage's Ray task bodies (plain functions; :mod:`.stage` wraps them with ``ray.remote``)
and the FAISS index files they exchange.

Layout under ``WORKDIR/graph/index/``::

    plan.json                  parts, row counts, dim, nlist, the add groups: fixed on the first
                               run so a resumed run builds the same shards
    trained.faissindex         the trained empty index (one worker, seeded sample)
    shard-NNNNN.faissindex     one group of parts added to a copy of it (global ids)
    merged.faissindex          all shards merged; its inverted lists live in
    merged.ivfdata             (FAISS OnDiskInvertedLists, memory-mapped by the searchers)

Merge, not search-per-shard: searching S shards separately costs every search task S index reads
and S top-k merges; one merged index with on-disk inverted lists is read through mmap, so the
search tasks on a node share one copy in the page cache and no process holds all vectors. The
results are identical either way (same quantiser, same probed lists).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from ..core.knn import add_vectors, build_empty_index, exact_topk_block, merge_topk, search_knn, train_index
from ..formats.embeddings import EmbeddingPart, read_vectors
from ..formats.graph import graph_part_table
from ..runtime import task_cpus
from ..storage import Store, basename, join

INDEX_DIR = "index"
TRAINED = "trained.faissindex"
MERGED = "merged.faissindex"
MERGED_DATA = "merged.ivfdata"
PLAN = "plan.json"


def cache_namespace(index_dir: str) -> str:
    """The node-local cache directory of one job's merged index (removed when the stage commits)."""
    import hashlib

    return "faiss-" + hashlib.sha256(index_dir.encode()).hexdigest()[:12]


def _faiss():
    import faiss

    faiss.omp_set_num_threads(task_cpus())  # the CPUs Ray reserved for this task, no more
    return faiss


def read_index(store: Store, url: str):
    faiss = _faiss()
    with tempfile.TemporaryDirectory(prefix="d2prune-graph-") as tmp:
        return faiss.read_index(store.copy_to_local(url, os.path.join(tmp, basename(url))))


def write_index(store: Store, url: str, ivf) -> None:
    store.write_bytes(url, _faiss().serialize_index(ivf).tobytes())


def open_merged(store: Store, index_dir: str):
    """The merged index with its inverted lists memory-mapped (for a remote workdir, a node-local
    copy keyed by the files' content identity, shared by every task on the node)."""
    faiss = _faiss()
    data_path, index_path = store.node_local_copy([join(index_dir, MERGED_DATA), join(index_dir, MERGED)],
                                                  cache_namespace(index_dir))
    return faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def gather_rows(store: Store, vector: str, items: list[tuple[EmbeddingPart, np.ndarray]]):
    """Vectors of selected rows of some parts: (global ids, float32 vectors)."""
    ids, vecs = [], []
    for part, rows in items:
        vecs.append(read_vectors(store, part, vector, rows))
        ids.append(np.asarray(rows, dtype=np.int64) + part.offset)
    return np.concatenate(ids), np.concatenate(vecs)


def train_task(store: Store, index_dir: str, dim: int, kind: str, nlist: int, pq_m: int, pq_bits: int, seed: int,
               *pieces) -> float:
    _faiss()
    start = time.perf_counter()
    ids = np.concatenate([p[0] for p in pieces])
    vecs = np.concatenate([p[1] for p in pieces])
    # Pieces arrive grouped by task; sort by global id so the sample is exactly x[training_ids].
    order = np.argsort(ids, kind="stable")
    ivf = build_empty_index(dim, kind, nlist, pq_m, pq_bits)
    train_index(ivf, vecs[order], seed)
    write_index(store, join(index_dir, TRAINED), ivf)
    return time.perf_counter() - start


def add_task(store: Store, index_dir: str, shard: str, vector: str, parts: list[EmbeddingPart]) -> tuple[str, int, float]:
    start = time.perf_counter()
    ivf = read_index(store, join(index_dir, TRAINED))
    for part in parts:
        add_vectors(ivf, read_vectors(store, part, vector),
                    np.arange(part.offset, part.offset + part.rows, dtype=np.int64))
    write_index(store, join(index_dir, f"{shard}.faissindex"), ivf)
    return shard, int(ivf.ntotal), time.perf_counter() - start


def merge_task(store: Store, index_dir: str, shards: list[str], expected_total: int) -> tuple[int, int, float]:
    """Merge the shard indexes into one index whose inverted lists are a file on disk."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="d2prune-merge-") as tmp:
        local_shards = [store.copy_to_local(join(index_dir, f"{s}.faissindex"), os.path.join(tmp, f"{s}.faissindex"))
                        for s in shards]
        trained = read_index(store, join(index_dir, TRAINED))
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
        store.write_local_file(join(index_dir, MERGED_DATA), data_path)
        store.write_local_file(join(index_dir, MERGED), index_path)
    return total, nbytes, time.perf_counter() - start


def search_task(store: Store, index_dir: str, graph_dir: str, vector: str, k: int, nprobe: int,
                parts: list[EmbeddingPart]) -> list[tuple[str, int, float]]:
    """Search k+1 neighbours of every row of `parts`; commit one graph part per embedding part."""
    ivf = open_merged(store, index_dir)
    done = []
    for part in parts:
        start = time.perf_counter()
        x = read_vectors(store, part, vector)
        ids = np.arange(part.offset, part.offset + part.rows, dtype=np.int64)
        neighbors, sq_distances, cells = search_knn(ivf, x, ids, k, nprobe)
        store.write_parquet(join(graph_dir, f"{part.name}.parquet"),
                            graph_part_table(ids, neighbors, sq_distances, cells))
        done.append((part.name, part.rows, time.perf_counter() - start))
    return done


def exact_task(store: Store, vector: str, k: int, queries: np.ndarray, parts: list[EmbeddingPart]):
    """Exact top-k of `queries` over the rows of `parts` (self not removed here)."""
    _faiss()
    d = np.full((queries.shape[0], k), np.inf, np.float32)
    i = np.full((queries.shape[0], k), -1, np.int64)
    for part in parts:
        x = read_vectors(store, part, vector)
        bd, bi = exact_topk_block(queries, x, np.arange(part.offset, part.offset + part.rows, dtype=np.int64), k)
        d, i = merge_topk(d, i, bd, bi, k)
    return d, i
