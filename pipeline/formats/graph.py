"""``WORKDIR/graph/``: the kNN graph as the graph stage commits it.

``nodes.parquet``: ``node`` int64 (0..N-1, the row order of the embedding parts), ``uid`` string,
``part`` string (the embedding part the node came from).

``part-NNNNN.parquet`` (one per embedding part)::

    node          int64                       global node id
    neighbors     fixed_size_list<int64>[k]   k nearest other nodes, -1 where fewer exist
    sq_distances  fixed_size_list<float32>[k] squared L2 distances (inf for -1)
    cell          int32                       the node's IVF list (0 for the exact index)

``lists.parquet`` (one row per IVF list, in list order; O(sqrt N) rows): what a reader that groups
cells into partitions needs without reading the graph::

    list          int32   the list id (a node's ``cell``)
    nodes         int64   nodes whose cell it is
    coarse_cell   int32   the coarse cell of the two-level training it was split from (lists of one
                          coarse cell are numbered consecutively, neighbouring cells get nearby ids)
    group         int32   the graph stage's search group (contiguous runs of lists)
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from ..storage import Store, join
from ..workdir import committed_parts
from .columns import fixed_list_to_numpy, fixed_size_list
from .embeddings import EmbeddingPart

NODES = "nodes.parquet"
LISTS = "lists.parquet"


def graph_part_table(nodes: np.ndarray, neighbors: np.ndarray, sq_distances: np.ndarray, cells: np.ndarray):
    """A graph part in the contract's schema."""
    import pyarrow as pa

    return pa.table({
        "node": pa.array(np.asarray(nodes, dtype=np.int64)),
        "neighbors": fixed_size_list(neighbors, np.int64),
        "sq_distances": fixed_size_list(sq_distances, np.float32),
        "cell": pa.array(np.asarray(cells, dtype=np.int32)),
    })


def write_nodes(store: Store, url: str, parts: list[EmbeddingPart]) -> None:
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


def write_lists(store: Store, url: str, nodes: np.ndarray, coarse_cell: np.ndarray, group: np.ndarray) -> None:
    """lists.parquet from per-list arrays (list id = position)."""
    import pyarrow as pa

    store.write_parquet(url, pa.table({
        "list": pa.array(np.arange(len(nodes), dtype=np.int32)),
        "nodes": pa.array(np.asarray(nodes, dtype=np.int64)),
        "coarse_cell": pa.array(np.asarray(coarse_cell, dtype=np.int32)),
        "group": pa.array(np.asarray(group, dtype=np.int32)),
    }))


def read_lists(store: Store, directory: str) -> dict[str, np.ndarray]:
    """lists.parquet as arrays indexed by list id: nodes, coarse_cell, group (checked 0..L-1 in order)."""
    table = store.read_parquet(join(directory, LISTS), columns=["list", "nodes", "coarse_cell", "group"])
    if not np.array_equal(table.column("list").to_numpy(), np.arange(table.num_rows)):
        raise ValueError(f"{directory}/{LISTS}: list ids are not 0..{table.num_rows - 1} in order")
    return {name: table.column(name).to_numpy() for name in ("nodes", "coarse_cell", "group")}


def read_nodes(store: Store, directory: str) -> np.ndarray:
    """The uid of every node (object array, node order), checked to be 0..N-1 in order."""
    nodes = store.read_parquet(join(directory, NODES), columns=["node", "uid"])
    n = nodes.num_rows
    if not np.array_equal(nodes.column("node").to_numpy(), np.arange(n)):
        raise ValueError(f"{directory}/{NODES}: node ids are not 0..{n - 1} in order")
    return nodes.column("uid").to_numpy(zero_copy_only=False).astype(object)


def read_part(store: Store, url: str, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One graph part as arrays: node, neighbors [n,k], sq_distances [n,k], cell."""
    table = store.read_parquet(url, columns=["node", "neighbors", "sq_distances", "cell"])
    if rows is not None:
        table = table.take(np.asarray(rows, dtype=np.int64))
    return {"node": table.column("node").to_numpy(),
            "neighbors": fixed_list_to_numpy(table.column("neighbors"), "neighbors", url),
            "sq_distances": fixed_list_to_numpy(table.column("sq_distances"), "sq_distances", url),
            "cell": table.column("cell").to_numpy()}


def read_graph(store: Store, directory: str) -> dict[str, Any]:
    """nodes.parquet + every graph part, as arrays in node order: uids, neighbors, sq_distances,
    cells. Checks every node has exactly one row and all parts the same k."""
    uids = read_nodes(store, directory)
    n = len(uids)
    neighbors = sq = cells = None
    seen = np.zeros(n, bool)
    for url in committed_parts(store, directory):
        part = read_part(store, url)
        part_nodes, nb = part["node"], part["neighbors"]
        if neighbors is None:
            k = nb.shape[1]
            neighbors = np.full((n, k), -1, np.int64)
            sq = np.full((n, k), np.inf, np.float32)
            cells = np.zeros(n, np.int32)
        if nb.shape[1] != neighbors.shape[1]:
            raise ValueError(f"{url}: {nb.shape[1]} neighbours per node, earlier parts {neighbors.shape[1]}")
        if part_nodes.size and (part_nodes.min() < 0 or part_nodes.max() >= n):
            raise ValueError(f"{url}: node ids outside 0..{n - 1}")
        if seen[part_nodes].any():
            raise ValueError(f"{url}: node {int(part_nodes[seen[part_nodes]][0])} appears in two graph parts")
        seen[part_nodes] = True
        neighbors[part_nodes] = nb
        sq[part_nodes] = part["sq_distances"]
        cells[part_nodes] = part["cell"]
    if neighbors is None or not seen.all():
        missing = np.flatnonzero(~seen)
        raise ValueError(
            f"{directory}: {len(missing)} of {n} nodes have no graph row (e.g. nodes {missing[:5].tolist()})"
        )
    return {"uids": uids, "neighbors": neighbors, "sq_distances": sq, "cells": cells}
