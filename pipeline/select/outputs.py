"""The select stage's outputs, written by tasks from the partitions' sorted runs, never holding the
selection in one process: ``selected.parquet`` (:func:`merge_selection`), the per-partition ranks
the workers turn into ``nodes/part-*.parquet`` and ``subset*.npy`` (:func:`merge_subset`).

Both merges are streamed k-way merges of sorted runs read block by block: every buffered key at or
before the earliest *last buffered key* of the runs not yet read to the end is final (what is still
unread in a run comes after its buffer), so each round emits at least one whole buffer and the
task holds P blocks, never the selection.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from ..formats.selection import DATACOMP_UID_DTYPE, npy_header, selected_schema, selected_table
from ..formats.shuffle import ColumnFile
from ..storage import Store

# rows read per run per block, and rows per row group of selected.parquet (fixed, so the file's
# bytes do not depend on how many runs it was merged from)
BLOCK_ROWS = 65_536
ROW_GROUP_ROWS = 1_048_576


class _Run:
    """One sorted run read block by block; keys as ascending tuples of arrays."""

    def __init__(self, store: Store, url: str, columns: list[str], key):
        self.file = ColumnFile(store, url)
        self.columns, self.key = columns, key
        self.pos = 0
        self.block: dict | None = None
        self.keys: tuple | None = None
        self.refill()

    def refill(self) -> None:
        hi = min(self.file.rows, self.pos + BLOCK_ROWS)
        self.block = self.file.read_rows(self.pos, hi, self.columns) if hi > self.pos else None
        self.keys = self.key(self.block) if self.block is not None else None
        self.pos = hi

    @property
    def more(self) -> bool:
        """Rows left beyond the current block."""
        return self.pos < self.file.rows

    def close(self) -> None:
        self.file.__exit__(None, None, None)


def _at_or_before(keys: tuple, bound: tuple) -> np.ndarray:
    k1, k2 = keys
    return (k1 < bound[0]) | ((k1 == bound[0]) & (k2 <= bound[1]))


def _merge(runs: list[_Run], emit, limit: int | None = None) -> int:
    """Feed ``emit(run index array, block rows per run...)`` the runs' rows in key order, block
    by block, up to ``limit`` rows; returns the rows emitted."""
    done = 0
    while limit is None or done < limit:
        live = [r for r in runs if r.block is not None]
        if not live:
            break
        bounds = [(r.keys[0][-1], r.keys[1][-1]) for r in live if r.more]
        bound = min(bounds) if bounds else None
        take = []
        for i, r in enumerate(runs):
            if r.block is None:
                continue
            n = len(r.keys[0]) if bound is None else int(np.count_nonzero(_at_or_before(r.keys, bound)))
            take.append((i, n))
        k1 = np.concatenate([runs[i].keys[0][:n] for i, n in take])
        k2 = np.concatenate([runs[i].keys[1][:n] for i, n in take])
        which = np.concatenate([np.full(n, i, np.int64) for i, n in take])
        row = np.concatenate([np.arange(n, dtype=np.int64) for _, n in take])
        order = np.lexsort((k2, k1))
        if limit is not None:
            order = order[: limit - done]
        emit(which[order], row[order])
        done += len(order)
        for i, n in take:
            r = runs[i]
            if n == len(r.keys[0]):
                r.refill()
            else:
                r.block = {c: v[n:] for c, v in r.block.items()}
                r.keys = tuple(k[n:] for k in r.keys)
    return done


def _take(runs: list[_Run], which: np.ndarray, row: np.ndarray, column: str):
    """Column values of the emitted (run, row) pairs, in emit order."""
    import pyarrow as pa

    first = runs[0].block[column] if runs and runs[0].block is not None else None
    pieces, index = [], np.empty(len(which), np.int64)
    start = 0
    for i in np.unique(which):
        sel = np.flatnonzero(which == i)
        values = runs[i].block[column]
        pieces.append(values.take(pa.array(row[sel])) if isinstance(values, pa.Array) else values[row[sel]])
        index[sel] = np.arange(start, start + sel.size)
        start += sel.size
    if not pieces:
        return first[:0] if first is not None else np.zeros(0)
    if isinstance(pieces[0], pa.Array):
        return pa.concat_arrays(pieces).take(pa.array(index))
    return np.concatenate(pieces)[index]


def merge_selection(store: Store, run_urls: list[str], selected_url: str, ranks_template: str, limit: int,
                    budget: int) -> dict:
    """``selected.parquet`` (the first ``limit`` picks of the runs in ranking order, ``selected``
    = rank < ``budget``; ``partition`` -1: the selection does not depend on the partitions) and,
    per run owner p, the ranks of its emitted rows (raw int64, ``ranks_template.format(p)``).
    Returns the rows written and the key of rank ``budget - 1``."""
    import pyarrow.parquet as pq

    columns = ["major", "minor", "owner", "forward", "final", "uid"]
    runs = [_Run(store, u, columns, lambda b: (~b["major"], b["minor"])) for u in run_urls]
    tmp = tempfile.mkdtemp(prefix="d2prune-merge-")
    rank_files = {}
    state = {"rank": 0, "last": None, "pending": []}
    try:
        def fill(path: str) -> None:
            with pq.ParquetWriter(path, selected_schema(), compression="zstd") as writer:
                def flush(final: bool) -> None:
                    import pyarrow as pa

                    if not state["pending"]:
                        return
                    table = pa.concat_tables(state["pending"])
                    cut = table.num_rows if final else table.num_rows - table.num_rows % ROW_GROUP_ROWS
                    for lo in range(0, cut, ROW_GROUP_ROWS):
                        # one contiguous chunk per column: the pages, hence the bytes, do not depend
                        # on the merge's block boundaries (which depend on P)
                        group = table.slice(lo, min(ROW_GROUP_ROWS, cut - lo)).combine_chunks()
                        writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
                    state["pending"] = [table.slice(cut)] if cut < table.num_rows else []

                def emit(which, row):
                    start = state["rank"]
                    owner = _take(runs, which, row, "owner")
                    part_col = np.full(len(which), -1, np.int32)
                    state["pending"].append(selected_table(_take(runs, which, row, "uid"), start,
                                                           _take(runs, which, row, "forward"),
                                                           _take(runs, which, row, "final"), part_col, budget))
                    ranks = np.arange(start, start + len(which), dtype=np.int64)
                    for p in np.unique(owner):
                        p = int(p)
                        if p not in rank_files:
                            rank_files[p] = open(os.path.join(tmp, f"ranks-{p}"), "wb")
                        rank_files[p].write(ranks[owner == p].tobytes())
                    if start <= budget - 1 < start + len(which):
                        i = budget - 1 - start
                        state["last"] = (int(_take(runs, which[i:i + 1], row[i:i + 1], "major")[0]),
                                         int(_take(runs, which[i:i + 1], row[i:i + 1], "minor")[0]))
                    state["rank"] = start + len(which)
                    if sum(t.num_rows for t in state["pending"]) >= ROW_GROUP_ROWS:
                        flush(False)

                _merge(runs, emit, limit)
                flush(True)

        store.write_file(selected_url, fill)
        for fh in rank_files.values():
            fh.close()
        for p in range(len(run_urls)):
            src = os.path.join(tmp, f"ranks-{p}")
            store.write_file(ranks_template.format(p), lambda path, src=src: (
                shutil.copyfile(src, path) if os.path.exists(src) else open(path, "wb").close()))
    finally:
        for fh in rank_files.values():
            fh.close()
        for r in runs:
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": state["rank"], "last": state["last"]}


def read_ranks(store: Store, url: str) -> np.ndarray:
    return np.frombuffer(store.read_bytes(url), np.int64)


def merge_subset(store: Store, run_urls: list[str], url: str) -> dict:
    """One ``subset*.npy`` from the partitions' sorted (hi, lo) runs, streamed into the file np.save
    would write for the whole array. Returns its length; a uid met twice is an error."""
    runs = [_Run(store, u, ["hi", "lo"], lambda b: (b["hi"], b["lo"])) for u in run_urls]
    total = sum(r.file.rows for r in runs)
    state = {"last": None, "n": 0}
    try:
        def fill(path: str) -> None:
            with open(path, "wb") as fh:
                fh.write(npy_header(total))

                def emit(which, row):
                    out = np.empty(len(which), DATACOMP_UID_DTYPE)
                    out["f0"] = _take(runs, which, row, "hi")
                    out["f1"] = _take(runs, which, row, "lo")
                    prev = state["last"]
                    dup = (out["f0"][1:] == out["f0"][:-1]) & (out["f1"][1:] == out["f1"][:-1])
                    if dup.any() or (prev is not None and len(out) and (int(out["f0"][0]), int(out["f1"][0])) == prev):
                        raise ValueError("a selected uid appears more than once in the pool (uids must be unique)")
                    if len(out):
                        state["last"] = (int(out["f0"][-1]), int(out["f1"][-1]))
                    fh.write(out.tobytes())
                    state["n"] += len(out)

                _merge(runs, emit)
                if state["n"] != total:  # pragma: no cover - the merge emits every row
                    raise RuntimeError(f"subset merge wrote {state['n']} of {total} uids")

        store.write_file(url, fill)
    finally:
        for r in runs:
            r.close()
    return {"rows": total}


def write_single_run(store: Store, url: str, nodes: np.ndarray, owners: np.ndarray) -> None:
    """A one-task baseline's order as a run the workers adopt (major = -position: first first)."""
    from ..formats.shuffle import write_columns

    write_columns(store, url, {"node": np.asarray(nodes, np.int64), "major": -np.arange(len(nodes), dtype=np.int64),
                               "owner": np.asarray(owners, np.int32)})
