"""The graph stage's Ray task bodies (plain functions; :mod:`.stage` runs them as steps, :mod:`pipeline.steps`).

Every task reads what it needs from the work directory (embedding parts, scratch blocks, small
arrays), commits what it makes there, and returns only small things (counts, seconds) to the
driver. The maths is :mod:`pipeline.core.ivf`; the files are :mod:`.layout` (names) and
:mod:`.scratch` (blocked scratch files).

Vectors travel as the embedding parts store them (float16 columns side by side, "raw"), never as
prepared float32: half the bytes, and :func:`~pipeline.core.knn.prepare_raw` turns any subset of
rows into exactly the rows the whole pool's prepared vectors hold, so every task computes on the
same float32 values the in-process reference :func:`~pipeline.core.ivf.sharded_knn_graph` sees.
"""

from __future__ import annotations

import io
import time

import numpy as np

from ..core import ivf
from ..core.knn import exact_topk_block, merge_topk, prepare_raw, remove_self
from ..formats.embeddings import EmbeddingPart, read_raw_vectors, read_vectors, rows_by_part
from ..formats.graph import graph_part_table, write_nodes
from ..runtime import peak_rss_bytes, task_cpus
from ..storage import Store, join
from . import scratch
from .layout import Layout

# Rows prepared (float16 -> normalised float32) at a time: bounds the temporary copies.
PREPARE_BLOCK = 65_536


def _threads() -> int:
    """FAISS uses exactly the CPUs Ray reserved for this task (the results do not depend on it)."""
    import faiss

    cpus = task_cpus()
    faiss.omp_set_num_threads(cpus)
    return cpus


def save_arrays(store: Store, url: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.write_bytes(url, buf.getvalue())


def load_arrays(store: Store, url: str, names: list[str]) -> list[np.ndarray]:
    """Members `names` of an .npz (an object store serves only the members read: np.load is lazy)."""
    with store.open(url, "rb") as fh, np.load(fh) as npz:
        return [npz[name] for name in names]


# ------------------------------------------------------------------------------------------------
# training (two-level k-means, ivf.train_two_level split into tasks)
# ------------------------------------------------------------------------------------------------

def gather_sample(store: Store, layout: Layout, unit: int, parts: list[EmbeddingPart],
                  fine_ids: np.ndarray, coarse_ids: np.ndarray) -> int:
    """The unit's rows of the seeded training samples: block 0 the coarse rows, block 1 the fine rows
    (ascending ids; the coarse sample is a subset of the fine one)."""
    pieces = [read_raw_vectors(store, part, layout.vector, rows) for part, rows in rows_by_part(parts, fine_ids)]
    raw = np.concatenate(pieces) if pieces else np.zeros((0, layout.dim), np.float16)
    coarse = np.isin(fine_ids, coarse_ids)
    scratch.write(store, layout.sample(unit), layout.rows_schema,
                  [{"id": fine_ids[coarse], "raw": raw[coarse]}, {"id": fine_ids, "raw": raw}])
    return int(len(fine_ids))


def train_coarse(store: Store, layout: Layout) -> float:
    """k1 coarse centroids from the coarse sample (every unit's block 0, ascending ids)."""
    _threads()
    start = time.perf_counter()
    rows = scratch.read_blocks(store, [layout.sample(u) for u in range(layout.n_units)], layout.rows_schema, 0)
    centroids = ivf.coarse_level(prepare_raw(rows["raw"], layout.vector, layout.widths), layout.k1, layout.seed)
    save_arrays(store, layout.coarse_url, centroids=centroids)
    return time.perf_counter() - start


def split_sample(store: Store, layout: Layout, unit: int, coarse: np.ndarray) -> np.ndarray:
    """The unit's fine-sample rows split by coarse cell (k1 blocks); returns the rows per cell."""
    _threads()
    rows = scratch.read_blocks(store, [layout.sample(unit)], layout.rows_schema, 1)
    home, _ = ivf.probe_lists(coarse, rows["raw"], 1, prepare=layout.prepare)
    order = np.argsort(home, kind="stable")  # within a cell: ascending id
    bounds = np.searchsorted(home[order], np.arange(layout.k1 + 1))
    blocks = ({"id": rows["id"][order[a:b]], "raw": rows["raw"][order[a:b]]} for a, b in zip(bounds[:-1], bounds[1:]))
    return scratch.write(store, layout.split(unit), layout.rows_schema, blocks)


def train_fine(store: Store, layout: Layout, cell: int, count: int) -> float:
    """Coarse cell `cell`'s `count` fine centroids from its fine-sample rows (ascending ids)."""
    _threads()
    start = time.perf_counter()
    rows = scratch.read_blocks(store, [layout.split(u) for u in range(layout.n_units)], layout.rows_schema, cell)
    points = prepare_raw(rows["raw"], layout.vector, layout.widths)
    centroids = ivf.fine_level(points, count, ivf.fine_seed(layout.seed, cell))
    save_arrays(store, layout.fine(cell), centroids=centroids)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# assign, shuffle, search, merge
# ------------------------------------------------------------------------------------------------

def assign_unit(store: Store, layout: Layout, unit: int, parts: list[EmbeddingPart],
                quantizer: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Home list and probes of every row of the unit, computed once through the coarse level
    (ivf.probe_lists_two_level; `quantizer` is (coarse centroids, fine centroids, coarse cell of each
    list)); committed with the unit's list sizes and probe counts, which are returned."""
    _threads()
    coarse, centroids, coarse_cell = quantizer
    raw = np.concatenate([read_raw_vectors(store, part, layout.vector) for part in parts])
    home, probes = ivf.probe_lists_two_level(coarse, centroids, coarse_cell, raw, layout.nprobe,
                                             prepare=layout.prepare)
    sizes = np.bincount(home, minlength=layout.nlist).astype(np.int64)
    probe_counts = np.bincount(probes.ravel(), minlength=layout.nlist).astype(np.int64)
    # the raw rows too (uncompressed) when planned: the shuffle reads them back instead of decoding the parts again
    copy = {"raw": raw} if layout.raw_copy else {}
    save_arrays(store, layout.assign(unit), home=home, probes=probes, sizes=sizes, probe_counts=probe_counts, **copy)
    return sizes, probe_counts


def count_pairs(store: Store, layout: Layout, unit: int, list_group: np.ndarray) -> np.ndarray:
    """(query, group) pairs the unit's rows will send to each search group: what the shuffle writes
    as queries, counted from the committed probes alone (the waves are cut on these counts)."""
    (probes,) = load_arrays(store, layout.assign(unit), ["probes"])
    _, pair_group, _ = ivf.probes_by_group(probes, list_group)
    return np.bincount(pair_group, minlength=int(list_group.max()) + 1).astype(np.int64)


def shuffle_unit(store: Store, layout: Layout, unit: int, parts: list[EmbeddingPart], list_group: np.ndarray,
                 wave: int, groups: tuple[int, int]) -> int:
    """Send the unit's rows to the search groups ``groups[0] <= g < groups[1]`` (one wave): as base
    rows to the group holding their home list, as queries once to each group their probes fall in
    (with only that group's probes). Returns the bytes written."""
    lo, _ = layout.unit_range(unit)
    if layout.raw_copy:
        home, probes, raw = load_arrays(store, layout.assign(unit), ["home", "probes", "raw"])
    else:
        home, probes = load_arrays(store, layout.assign(unit), ["home", "probes"])
        raw = np.concatenate([read_raw_vectors(store, part, layout.vector) for part in parts])
    ids = np.arange(lo, lo + len(home), dtype=np.int64)
    wanted = np.arange(groups[0], groups[1] + 1)  # the wave's block edges
    # only the wave's rows and pairs are sorted (each wave's work is its share of the unit's)
    base_group = list_group[home]
    order = np.flatnonzero((base_group >= groups[0]) & (base_group < groups[1]))
    order = order[np.argsort(base_group[order], kind="stable")]
    b = np.searchsorted(base_group[order], wanted)
    pair_query, pair_group, pair_probes = ivf.probes_by_group(probes, list_group, groups)
    p = np.searchsorted(pair_group, wanted)
    base = ({"id": ids[order[b[g]:b[g + 1]]], "list": home[order[b[g]:b[g + 1]]], "raw": raw[order[b[g]:b[g + 1]]]}
            for g in range(len(wanted) - 1))
    rows = scratch.write(store, layout.base(unit, wave), layout.base_schema, base)
    queries = ({"id": ids[pair_query[p[g]:p[g + 1]]], "probes": pair_probes[p[g]:p[g + 1]],
                "raw": raw[pair_query[p[g]:p[g + 1]]]} for g in range(len(wanted) - 1))
    pairs = scratch.write(store, layout.query(unit, wave), layout.query_schema, queries)
    return int(rows.sum() * layout.base_schema.row_bytes + pairs.sum() * layout.query_schema.row_bytes)


def search_group(store: Store, layout: Layout, group: int, wave: int, block: int) -> dict:
    """Top-(k+1) of every query sent to `group` (block `block` of wave `wave`'s buckets) over the
    group's lists (ivf.search_group), written as candidates split by merge unit."""
    threads = _threads()
    start = time.perf_counter()
    units = range(layout.n_units)
    base = scratch.read_blocks(store, [layout.base(u, wave) for u in units], layout.base_schema, block)
    queries = scratch.read_blocks(store, [layout.query(u, wave) for u in units], layout.query_schema, block)
    read_s = time.perf_counter() - start
    # Each query is scanned against every list it probes here (13 of 16 on average at N = 10^6):
    # prepare it once (float32, 2*d bytes more per query) rather than once per list.
    raw = queries.pop("raw")
    prepared = np.empty(raw.shape, np.float32)
    for lo in range(0, len(raw), PREPARE_BLOCK):
        prepared[lo:lo + PREPARE_BLOCK] = layout.prepare(raw[lo:lo + PREPARE_BLOCK])
    del raw
    d, i = ivf.search_group(base["id"], base["raw"], base["list"], queries["id"], prepared, queries["probes"],
                            layout.k + 1, prepare=layout.prepare, prepare_queries=False)
    del prepared
    base_rows, query_rows = len(base["id"]), len(queries["id"])
    pairs = int((queries["probes"] >= 0).sum())
    del base
    qids = queries.pop("id")
    del queries
    # queries arrive in ascending id (units in order, ascending within): one contiguous run per unit
    cut = np.searchsorted(qids, np.asarray(layout.unit_starts, np.int64))
    cut[-1] = len(qids)
    blocks = ({"id": qids[a:b], "d": d[a:b], "i": i[a:b]} for a, b in zip(cut[:-1], cut[1:]))
    scratch.write(store, layout.candidates(group), layout.candidate_schema, blocks)
    return {"group": group, "base_rows": base_rows, "queries": query_rows, "pairs": pairs, "threads": threads,
            "read_s": read_s, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_bytes() / 2**20}


def merge_unit(store: Store, layout: Layout, unit: int, parts: list[EmbeddingPart], n_groups: int,
               graph_dir: str, write: list[str]) -> list[int]:
    """Merge every group's candidates of the unit's nodes, drop self by id, keep k, and commit the
    graph parts named in `write` (cell = home list). Returns the indices of the parts written."""
    lo, hi = layout.unit_range(unit)
    kk = layout.k + 1
    best_d = np.full((hi - lo, kk), np.inf, np.float32)
    best_i = np.full((hi - lo, kk), -1, np.int64)
    for group in range(n_groups):  # lexicographic (distance, id) top-kk: the order of groups is irrelevant
        c = scratch.read_blocks(store, [layout.candidates(group)], layout.candidate_schema, unit)
        ivf.merge_group_results(best_d, best_i, c["id"] - lo, c["d"], c["i"])
    ids = np.arange(lo, hi, dtype=np.int64)
    neighbors, sq_distances = remove_self(best_i, best_d, ids, layout.k)
    (home,) = load_arrays(store, layout.assign(unit), ["home"])
    written = []
    for part in parts:
        if part.name not in write:
            continue
        rows = slice(part.offset - lo, part.offset - lo + part.rows)
        store.write_parquet(join(graph_dir, f"{part.name}.parquet"),
                            graph_part_table(ids[rows], neighbors[rows], sq_distances[rows], home[rows]))
        written.append(part.index)
    return written


def nodes_file(store: Store, url: str, parts: list[EmbeddingPart]) -> None:
    """nodes.parquet, streamed part by part in a task (never through the driver)."""
    write_nodes(store, url, parts)


# ------------------------------------------------------------------------------------------------
# recall against exact search
# ------------------------------------------------------------------------------------------------

def gather_prepared(store: Store, vector: str, items: list[tuple[EmbeddingPart, np.ndarray]]):
    """Prepared vectors of selected rows of some parts: (global ids, float32 vectors)."""
    ids, vecs = [], []
    for part, rows in items:
        vecs.append(read_vectors(store, part, vector, rows))
        ids.append(np.asarray(rows, dtype=np.int64) + part.offset)
    return np.concatenate(ids), np.concatenate(vecs)


def exact_topk(store: Store, vector: str, k: int, queries: np.ndarray, parts: list[EmbeddingPart]):
    """Exact top-k of `queries` over the rows of `parts` (self not removed here)."""
    _threads()
    d = np.full((queries.shape[0], k), np.inf, np.float32)
    i = np.full((queries.shape[0], k), -1, np.int64)
    for part in parts:
        x = read_vectors(store, part, vector)
        bd, bi = exact_topk_block(queries, x, np.arange(part.offset, part.offset + part.rows, dtype=np.int64), k)
        d, i = merge_topk(d, i, bd, bi, k)
    return d, i


__all__ = ["gather_sample", "train_coarse", "split_sample", "train_fine", "assign_unit", "count_pairs", "shuffle_unit",
           "search_group", "merge_unit", "nodes_file", "gather_prepared", "exact_topk"]
