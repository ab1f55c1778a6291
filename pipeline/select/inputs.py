"""What the select stage reads: the committed graph (node order) and the importance scores."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import JobConfig
from ..formats.embeddings import list_parts, numeric_columns, read_column, read_vectors_at
from ..formats.graph import read_graph
from ..storage import Store
from ..workdir import stage_dir


def _numeric(column, what: str) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_decimal(column.type)):
        raise ValueError(f"{what} must be numeric, got {column.type}")
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def check_unique(uids: np.ndarray) -> None:
    import pandas as pd

    index = pd.Index(uids)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"the graph's nodes.parquet lists uids more than once, e.g. {dup}: uids must be unique")


def _scores_from_file(store: Store, url: str, column: str, uids: np.ndarray) -> np.ndarray:
    import pandas as pd
    import pyarrow.parquet as pq

    if not store.exists(url):
        raise FileNotFoundError(f"select.score_file {url} does not exist")
    with store.open(url, "rb") as fh:  # one open: check the schema, then read from the same file
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        for needed in ("uid", column):
            if needed not in names:
                raise ValueError(f"select.score_file {url} has no column {needed!r} (columns: {names})")
        table = pf.read(columns=["uid", column])
    file_uids = pd.Index(table.column("uid").to_numpy(zero_copy_only=False).astype(str))
    values = _numeric(table.column(column), f"{url} column {column!r}")
    if not file_uids.is_unique:
        dup = file_uids[file_uids.duplicated()].unique()[:5].tolist()
        raise ValueError(f"select.score_file {url}: uids appear more than once, e.g. {dup}")
    where = file_uids.get_indexer(pd.Index(uids.astype(str)))
    missing = np.flatnonzero(where < 0)
    if missing.size:
        raise ValueError(
            f"select.score_file {url} has no {column!r} for {missing.size} of {len(uids)} samples, "
            f"e.g. uids {[str(uids[i]) for i in missing[:5]]}"
        )
    return values[where]


def read_scores(store: Store, cfg: JobConfig, uids: np.ndarray) -> tuple[np.ndarray, str]:
    """The raw ``select.score`` value of every node (float64, node order) and where it came from."""
    column = cfg.select.score
    if cfg.select.score_file:
        scores, source = _scores_from_file(store, cfg.select.score_file, column, uids), \
            f"{cfg.select.score_file}:{column}"
    else:
        parts, _ = list_parts(store, stage_dir(cfg.workdir, "embed"))
        numeric = numeric_columns(store, parts[0])
        if column not in numeric:
            raise ValueError(
                f"select.score={column!r} is not a column of the embedding parts ({parts[0].url}); numeric columns "
                f"there: {numeric}; or give select.score_file"
            )
        scores = read_column(store, parts, column).astype(np.float64)
        emb_uids = read_column(store, parts, "uid").astype(object)
        # The graph's node order is the embedding parts' row order; check it rather than trust it
        # (a mismatch would silently give every node another sample's score).
        if len(emb_uids) != len(uids) or not np.array_equal(emb_uids, uids):
            raise ValueError(
                f"the embedding parts in {stage_dir(cfg.workdir, 'embed')} do not match the graph's nodes.parquet "
                f"({len(emb_uids)} vs {len(uids)} rows or another order): rerun with --force-from graph"
            )
        source = f"embeddings:{column}"
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} samples have a non-finite {column!r} score ({source}), "
            f"e.g. uids {[str(uids[i]) for i in np.flatnonzero(bad)[:5]]}"
        )
    return scores.astype(np.float64), source


def read_inputs(store: Store, cfg: JobConfig) -> dict[str, Any]:
    """The graph as arrays in node order, the raw scores, and a reader of graph vectors by node id
    (for the embedding-based baselines)."""
    graph = read_graph(store, stage_dir(cfg.workdir, "graph"))
    check_unique(graph["uids"])
    scores, source = read_scores(store, cfg, graph["uids"])

    def vectors_of(rows: np.ndarray) -> np.ndarray:
        parts, _ = list_parts(store, stage_dir(cfg.workdir, "embed"), cfg.graph.vector)
        return read_vectors_at(store, parts, cfg.graph.vector, rows)

    return {**graph, "scores": scores, "score_source": source, "vectors_of": vectors_of}
