"""The pool as the report reads it: one embedding part at a time, never the whole pool.

The report needs, of a pool of any size: the CLIP-score histograms of kept and dropped samples, a
seeded sample of rows (the PCA map, the example thumbnails), the dropped rows with the lowest
scores, and the uid, shard, key and score of the few rows it shows. Each comes from passes over
the parts that hold one part's columns at a time, plus O(sample) rows:

1. :func:`scan_pool`: each part's scores and kept flags give the finite score range (the
   histogram's bins), the kept and dropped counts (what the seeded sample is drawn from) and the
   dropped rows with the lowest scores;
2. :func:`tally_pool`: each part again: the histogram counts in those bins, the kept flags of the
   map's rows and the rows of the sampled kept and dropped ordinals (the i-th kept row, ...);
3. :func:`read_samples`: uid, shard, key and score of the rows shown, read from their parts only.

A part's kept flags (:func:`kept_reader`) come from ``selection/decisions.parquet/part-NNNNN.parquet``
(same NNNNN as the embedding part; its first rows are the part's rows in order, decision
``selected`` = kept), so nothing is joined by uid. A selection committed before decisions.parquet
existed is joined by uid against selected.parquet (:class:`_KeptByUid`: the selected uids as one
Arrow array, O(budget), only for those older work directories).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..core import decide
from ..formats.embeddings import EmbeddingPart, rows_by_part
from ..formats.selection import DECISIONS_DIR, SELECTED, read_selected
from ..storage import Store, basename, damaged_on_error, join

SAMPLE_COLUMNS = ("uid", "shard", "key", "clip_score")
KEPT_DECISION, SKIPPED_DECISION = decide.DECISIONS[decide.SELECTED], decide.DECISIONS[decide.SKIPPED]

if TYPE_CHECKING:  # pyarrow is imported where it is used
    import pyarrow as pa

KeptOf = Callable[[EmbeddingPart], np.ndarray]  # a part's kept flags, one per row


@dataclass(frozen=True)
class Sample:
    """One pool row the report shows."""

    row: int  # its node id: row number of the parts in order
    uid: str
    shard: str
    key: str
    clip_score: float


def read_part_columns(store: Store, part: EmbeddingPart, columns) -> "pa.Table":
    """Columns of one part, checked to still hold the rows it was listed with."""
    table = store.read_parquet(part.url, columns=list(columns))
    if table.num_rows != part.rows:
        raise RuntimeError(f"{part.url} has {table.num_rows} rows, {part.rows} when the report listed it")
    return table


# ------------------------------------------------------------------------------------------------
# Kept flags
# ------------------------------------------------------------------------------------------------

def kept_reader(store: Store, selection_dir: str, parts: list[EmbeddingPart]) -> KeptOf | None:
    """How to read a part's kept flags; None when no selection is committed."""
    if not store.exists(join(selection_dir, SELECTED)):
        return None
    decisions = join(selection_dir, DECISIONS_DIR)
    found = {basename(u) for u in store.glob(join(decisions, "*.parquet"))} if store.exists(decisions) else set()
    if all(p.name + ".parquet" in found for p in parts):
        return lambda part: _kept_from_decisions(store, join(decisions, part.name + ".parquet"), part)
    return _KeptByUid(store, selection_dir)


def _flags(array, value: str) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.fill_null(pc.equal(array, value), False).to_numpy(zero_copy_only=False).astype(bool)


def _kept_from_decisions(store: Store, url: str, part: EmbeddingPart) -> np.ndarray:
    """`part`'s kept flags: the first rows of its decisions file are its rows in order (the rest,
    its shard's skip records, are checked to be only those)."""
    decision = store.read_parquet(url, columns=["decision"]).column("decision")
    skipped = _flags(decision, SKIPPED_DECISION)
    if len(decision) < part.rows or skipped[: part.rows].any() or not skipped[part.rows:].all():
        raise ValueError(f"{url} does not list the {part.rows} rows of {part.url} first, then only skip records")
    return _flags(decision.slice(0, part.rows), KEPT_DECISION)


class _KeptByUid:
    """Kept flags joined by uid with selected.parquet: for selections committed before
    decisions.parquet existed (the selected uids are held as one Arrow array, O(budget))."""

    def __init__(self, store: Store, selection_dir: str):
        import pyarrow as pa

        self.store = store
        uid = read_selected(store, selection_dir, columns=["uid"]).column("uid")
        self.selected = uid.combine_chunks().cast(pa.string())

    def __call__(self, part: EmbeddingPart) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        uid = read_part_columns(self.store, part, ["uid"]).column("uid").cast(pa.string())
        return pc.fill_null(pc.is_in(uid, value_set=self.selected), False).to_numpy(zero_copy_only=False).astype(bool)


def count_selected(store: Store, selection_dir: str) -> int:
    """How many samples selected.parquet selects, its ``selected`` column read a batch at a time
    (for a report without readable embedding parts, where no decisions are counted)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    url = join(selection_dir, SELECTED)
    with damaged_on_error(url), store.open(url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if "selected" not in pf.schema_arrow.names:  # written before keep rates: every row is selected
            return pf.metadata.num_rows
        return sum(int(pc.sum(b.column(0)).as_py() or 0) for b in pf.iter_batches(columns=["selected"]))


# ------------------------------------------------------------------------------------------------
# The two passes
# ------------------------------------------------------------------------------------------------

def _scores_and_kept(store: Store, parts: list[EmbeddingPart], kept_of: KeptOf
                     ) -> Iterator[tuple[EmbeddingPart, np.ndarray, np.ndarray]]:
    """Each part with its CLIP scores (float64, NaN where null) and kept flags."""
    for part in parts:
        column = read_part_columns(store, part, ["clip_score"]).column("clip_score")
        scores = column.to_numpy(zero_copy_only=False).astype(np.float64)
        kept = np.asarray(kept_of(part), bool)
        if len(kept) != part.rows:
            raise RuntimeError(f"{len(kept)} kept flags for the {part.rows} rows of {part.url}")
        yield part, scores, kept


@dataclass(frozen=True)
class PoolScan:
    """The first pass (:func:`scan_pool`)."""

    n: int
    kept_n: int
    low: float  # the finite CLIP scores' range (NaN when there is none)
    high: float
    lowest_dropped: np.ndarray  # dropped rows, lowest score first (ties: lower row first; NaN last)

    @property
    def dropped_n(self) -> int:
        return self.n - self.kept_n


def scan_pool(store: Store, parts: list[EmbeddingPart], kept_of: KeptOf, lowest: int) -> PoolScan:
    """Counts, score range and the `lowest` dropped rows by score (module docstring, step 1)."""
    kept_n, low, high = 0, np.inf, -np.inf
    best_rows, best_scores = np.zeros(0, np.int64), np.zeros(0)
    for part, scores, kept in _scores_and_kept(store, parts, kept_of):
        kept_n += int(kept.sum())
        finite = scores[np.isfinite(scores)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        # this part's dropped rows join the best so far: the `lowest` of the union are the pool's
        dropped = np.flatnonzero(~kept)
        rows = np.concatenate([best_rows, dropped + part.offset])
        values = np.concatenate([best_scores, scores[dropped]])
        order = np.lexsort((rows, values))[:lowest]
        best_rows, best_scores = rows[order], values[order]
    if low > high:
        low = high = np.nan
    return PoolScan(sum(p.rows for p in parts), kept_n, low, high, best_rows)


@dataclass(frozen=True)
class PoolTally:
    """The second pass (:func:`tally_pool`)."""

    kept_counts: np.ndarray | None  # per histogram bin (None without bins)
    dropped_counts: np.ndarray | None
    map_kept: np.ndarray  # the kept flag of each map row
    kept_rows: np.ndarray  # the rows of the kept ordinals asked for, ascending
    dropped_rows: np.ndarray


def _rows_of_ordinals(local: np.ndarray, ordinals: np.ndarray, before: int) -> np.ndarray:
    """The rows among `local` (one part's kept or dropped rows) of the sorted `ordinals`, counted
    over the whole pool, `before` of them in earlier parts."""
    lo, hi = np.searchsorted(ordinals, [before, before + len(local)])
    return local[ordinals[lo:hi] - before]


def tally_pool(store: Store, parts: list[EmbeddingPart], kept_of: KeptOf, edges: np.ndarray | None,
               map_rows: np.ndarray, kept_ordinals: np.ndarray, dropped_ordinals: np.ndarray) -> PoolTally:
    """Histogram counts in `edges`, kept flags of the sorted `map_rows` and the rows of the sorted
    kept and dropped ordinals (module docstring, step 2)."""
    bins = 0 if edges is None else len(edges) - 1
    counts = {True: np.zeros(bins, np.int64), False: np.zeros(bins, np.int64)}
    map_kept = np.zeros(len(map_rows), bool)
    found: dict[bool, list[np.ndarray]] = {True: [], False: []}
    before = {True: 0, False: 0}
    for part, scores, kept in _scores_and_kept(store, parts, kept_of):
        finite = np.isfinite(scores)
        lo, hi = np.searchsorted(map_rows, [part.offset, part.offset + part.rows])
        map_kept[lo:hi] = kept[map_rows[lo:hi] - part.offset]
        for flag, ordinals in ((True, kept_ordinals), (False, dropped_ordinals)):
            mine = kept == flag
            if edges is not None:
                counts[flag] += np.histogram(scores[mine & finite], edges)[0]
            local = np.flatnonzero(mine)
            found[flag].append(_rows_of_ordinals(local, ordinals, before[flag]) + part.offset)
            before[flag] += len(local)

    def rows(flag: bool) -> np.ndarray:
        return np.concatenate(found[flag]) if found[flag] else np.zeros(0, np.int64)

    return PoolTally(counts[True] if edges is not None else None, counts[False] if edges is not None else None,
                     map_kept, rows(True), rows(False))


# ------------------------------------------------------------------------------------------------
# The rows shown
# ------------------------------------------------------------------------------------------------

def read_samples(store: Store, parts: list[EmbeddingPart], rows) -> dict[int, Sample]:
    """uid, shard, key and score of the pool rows `rows`, each part read only if it holds some."""
    import pyarrow as pa

    ids = np.unique(np.asarray(list(rows), np.int64))
    n = parts[-1].offset + parts[-1].rows if parts else 0
    if ids.size and (ids[0] < 0 or ids[-1] >= n):
        raise ValueError(f"rows {int(ids[0])}..{int(ids[-1])} asked of a pool of {n}")
    out: dict[int, Sample] = {}
    for part, local in rows_by_part(parts, ids):
        table = read_part_columns(store, part, SAMPLE_COLUMNS).take(pa.array(local))
        columns = [table.column(c).to_pylist() for c in SAMPLE_COLUMNS]
        for row, uid, shard, key, score in zip((local + part.offset).tolist(), *columns):
            out[row] = Sample(row, str(uid), str(shard), str(key), float("nan") if score is None else float(score))
    return out


__all__ = ["PoolScan", "PoolTally", "Sample", "count_selected", "kept_reader", "read_samples", "scan_pool",
           "tally_pool"]
