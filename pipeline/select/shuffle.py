"""The select stage's shuffle: the committed graph parts regrouped by partition, never through the
driver, as bucket files in the workdir (:mod:`pipeline.formats.shuffle`).

Why files and not Ray object refs: a partition's share comes from every range task, so refs would
mean P × G objects pinned in the object store until the last partition has read them (the whole
graph, twice, in shared memory), with the driver owning all of them; files are written once by each
task, read by exactly the partitions that need them, survive a killed job (a resumed stage skips
the tasks whose files exist) and live wherever the workdir lives.

A partition needs its nodes' rows of the *undirected* graph: every kNN entry i -> j is a neighbour
of i and of j. The task reading i's part knows i's partition (its cell) but, in general, not j's:
j's cell is in j's part. So, per range group g of parts (:mod:`.plan`):

1. **map** (:func:`map_group`): read g's graph parts, scores and uids; write ``nodes-g`` (node,
   uid, raw score and, with ``select.prefilter.basic``, the basic filter's code) bucketed by
   partition; the edge records whose both ends are in g, resolved
   (``edges-a-g``, bucketed by partition); the other entries ``pending-g`` (row, nbr, distance,
   row's partition) bucketed by the range group of nbr.
2. **reduce** (:func:`reduce_group`): read bucket g of every ``pending-*``, learn each nbr's
   partition from g's ``cell`` column, write the resolved records ``edges-b-g``.

A resolved record ``(row, nbr, distance, partition of nbr)`` goes to row's partition; when nbr is
in the same partition it travels once and the partition enters it in both rows (see
:class:`pipeline.core.partition.PartitionRows`), else a mirrored record goes to nbr's partition.
With one partition there is nothing to route: its worker reads the graph parts itself
(:func:`part_records`, the same code without files).

Scores come from the ``select.score`` column of the embedding parts (their rows are the graph's
nodes, checked) or, for ``select.score_file``, from a hash join by uid (:func:`score_file_map`,
:func:`uid_map`, :func:`join_scores`: the uid shuffle of :mod:`pipeline.formats.buckets`, the same
files and hash as every other join by uid) whose output is bucketed by range group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.d2 import NEGATIVE_DISTANCE_TOLERANCE
from ..formats.buckets import BucketedWriter, gather_bucket, repeated_uids, uid_positions
from ..formats.graph import NODES
from ..formats.shuffle import ColumnFile, bucket_order, read_buckets, write_columns
from ..storage import Store, join
from .plan import GraphPart, SelectPlan

# uid buckets of the score-file join per CPU
JOIN_BUCKETS_PER_CPU = 2
# rows of the score file read by one map task
SCORE_FILE_ROWS_PER_TASK = 2_000_000

# edge records a partition worker keeps between the two passes of its rows' build (read once):
# all of them up to ~10^6 nodes at k = 10 (20 bytes per record)
EDGE_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ShuffleJob:
    """What every shuffle task needs (picklable, O(plan))."""

    store: Store
    plan: SelectPlan
    graph_dir: str
    score_column: str
    distance: str  # "sqeuclidean" | "euclidean"
    score_file: str | None = None
    join_buckets: int = 0  # > 0: scores come from the score-file join
    basic: bool = False  # a pre-filter is on: node records carry each node's pre-filter code (.prefilter)
    # the file prefix of those codes: "basic" (the basic filter's own, when it is the only pre-filter)
    # or "prefilter" (every pre-filter's first failed rule, .prefilter.combine_part)
    codes: str = "basic"
    exact: bool = False  # select.prefilter.exact_duplicates (.duplicates)
    eval_sets: tuple = ()  # select.prefilter.decontaminate's sets (.eval_sets.EvalSource)

    @property
    def id_dtype(self):
        return np.int32 if self.plan.n_nodes < 2**31 else np.int64

    def path(self, name: str) -> str:
        return join(self.plan.work_dir, name)

    def files(self, prefix: str, count: int) -> list[str]:
        return [self.path(f"{prefix}-{i:05d}.col") for i in range(count)]


# --------------------------------------------------------------------------------------------
# Reading a range group
# --------------------------------------------------------------------------------------------


def _numeric(column, what: str) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_decimal(column.type)):
        raise ValueError(f"{what} must be numeric, got {column.type}")
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _check_uids(store: Store, graph_dir: str, part: GraphPart, uids) -> None:
    """The part's uids are nodes.parquet's for its node range (the graph's node order is the
    embedding parts' row order: a mismatch would give every node another sample's score)."""
    import pyarrow.parquet as pq

    with store.open(join(graph_dir, NODES), "rb") as fh:
        table = pq.read_table(fh, columns=["node", "uid"], filters=[("node", ">=", part.lo), ("node", "<", part.hi)])
    if table.num_rows != len(uids) or not table.column("uid").combine_chunks().cast(uids.type).equals(uids):
        raise ValueError(
            f"the embedding part {part.embedding.url} does not match the graph's {NODES} for nodes "
            f"{part.lo}..{part.hi - 1}: rerun with --force-from graph"
        )


def _group_scores(job: ShuffleJob, g: int) -> np.ndarray:
    """Scores of group g's nodes from the score-file join (every node must have one)."""
    lo, hi = job.plan.group_range(g)
    got = gather_bucket(job.store, [join_file(job, "joined", h) for h in range(job.join_buckets)], g)
    scores = np.full(hi - lo, np.nan)
    scores[got.column("node").to_numpy() - lo] = got.column("score").to_numpy()
    return scores


def read_group(job: ShuffleJob, g: int, edges: bool = True, uids: bool = True) -> dict:
    """Range group g as arrays:
    ``node``, ``cell``, ``score`` (raw, checked finite), ``uid`` (pyarrow) and, with ``edges``,
    the valid kNN entries ``row``, ``nbr``, ``dist`` (float32, clamped at 0, square-rooted for
    ``graph.distance: euclidean``). Checks every entry as :func:`pipeline.core.d2.symmetrize_knn`
    does, naming the part and the row."""
    import pyarrow as pa

    plan, store = job.plan, job.store
    a, b = plan.groups[g]
    out: dict[str, list] = {"node": [], "cell": [], "score": [], "uid": [], "row": [], "nbr": [], "dist": []}
    joined = _group_scores(job, g) if job.join_buckets else None
    glo = plan.group_range(g)[0]
    for part in plan.parts[a:b]:
        cols = ["node", "cell"] + (["neighbors", "sq_distances"] if edges else [])
        table = store.read_parquet(part.url, columns=cols)
        nodes = _part_nodes(part, table)
        cells = table.column("cell").to_numpy().astype(np.int64)
        if cells.size and cells.min() < 0:
            raise ValueError(f"{part.url}: negative cell id {int(cells.min())}")
        out["node"].append(nodes.astype(np.int64))
        out["cell"].append(cells)
        if uids or joined is None:
            emb = store.read_parquet(part.embedding.url, columns=["uid"] + ([] if joined is not None
                                                                             else [job.score_column]))
            if emb.num_rows != part.embedding.rows:
                raise RuntimeError(f"{part.embedding.url} has {emb.num_rows} rows, {part.embedding.rows} "
                                   "when the stage started")
            uid = emb.column("uid").combine_chunks()
            if uids:
                _check_uids(store, job.graph_dir, part, uid)
                out["uid"].append(uid)
        if joined is None:
            score = _numeric(emb.column(job.score_column), f"{part.embedding.url} column {job.score_column!r}")
        else:
            score = joined[part.lo - glo : part.hi - glo]
        bad = ~np.isfinite(score)
        if bad.any():
            examples = [str(u) for u in emb.column("uid").take(np.flatnonzero(bad)[:5]).to_pylist()] \
                if joined is None else np.flatnonzero(bad)[:5].tolist()
            source = f"{job.score_file}:{job.score_column}" if job.score_file else f"embeddings:{job.score_column}"
            raise ValueError(f"{int(bad.sum())} samples have a non-finite {job.score_column!r} score ({source}), "
                             f"e.g. {'uids' if joined is None else 'nodes'} {examples}")
        out["score"].append(score.astype(np.float64))
        if edges:
            nb = _list_column(table, "neighbors", part.url)
            sq = _list_column(table, "sq_distances", part.url)
            row, nbr, dist = _valid_entries(part, nodes, nb, sq, plan.n_nodes, job.distance)
            out["row"].append(row)
            out["nbr"].append(nbr)
            out["dist"].append(dist)
    res = {k: np.concatenate(v) if v and k != "uid" else v for k, v in out.items()}
    res["uid"] = pa.concat_arrays(out["uid"]) if out["uid"] else None
    if not edges:
        del res["row"], res["nbr"], res["dist"]
    return res


def _part_nodes(part: GraphPart, table) -> np.ndarray:
    """A graph part's ``node`` column, checked to be its node range in order."""
    nodes = table.column("node").to_numpy()
    if not np.array_equal(nodes, np.arange(part.lo, part.hi)):
        raise ValueError(f"{part.url}: nodes are not {part.lo}..{part.hi - 1} in order (the rows of "
                         f"{part.embedding.url}): rerun with --force-from graph")
    return nodes


def _list_column(table, name: str, url: str) -> np.ndarray:
    from ..formats.columns import fixed_list_to_numpy

    return fixed_list_to_numpy(table.column(name), name, url)


def _valid_entries(part: GraphPart, nodes, nb, sq, n_total: int, distance: str):
    """(row, nbr, dist) of the valid entries of a part's kNN lists (-1 and self entries dropped),
    checked like symmetrize_knn checks its input (``sq`` None: the ids only, ``dist`` None; which
    entries are valid depends on the ids alone)."""
    if sq is not None and nb.shape != sq.shape:
        raise ValueError(f"{part.url}: neighbors {nb.shape} and sq_distances {sq.shape} differ")
    bad = (nb < -1) | (nb >= n_total)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{part.url}: neighbors[{r}, {c}] = {int(nb[r, c])}: ids must be in 0..{n_total - 1}, "
                         "or -1 for missing")
    rows = np.broadcast_to(nodes[:, None], nb.shape)
    keep = (nb >= 0) & (nb != rows)
    if sq is None:
        return rows[keep].astype(np.int64), nb[keep].astype(np.int64), None
    d = np.asarray(sq, np.float32)
    bad = (nb >= 0) & ~((d >= -NEGATIVE_DISTANCE_TOLERANCE) & np.isfinite(d))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{part.url}: sq_distances[{r}, {c}] = {float(d[r, c])!r}: distances of valid "
                         "neighbours must be finite and >= 0")
    dist = np.maximum(d[keep], np.float32(0))  # FAISS's tiny negatives for near-duplicates
    if distance == "euclidean":
        dist = np.sqrt(dist)
    return rows[keep].astype(np.int64), nb[keep].astype(np.int64), dist


def partition_records(row, nbr, dist, row_part, nbr_part):
    """Resolved edge records for entries whose both partitions are known: (destination, row, nbr,
    dist, partition of nbr). Inside a partition an entry travels once; across two, once to each
    side (mirrored)."""
    cross = row_part != nbr_part
    dest = np.concatenate([row_part, nbr_part[cross]])
    return (dest, np.concatenate([row, nbr[cross]]), np.concatenate([nbr, row[cross]]),
            np.concatenate([dist, dist[cross]]), np.concatenate([nbr_part, row_part[cross]]))


def _write_records(job: ShuffleJob, url: str, dest, row, nbr, dist, owner) -> int:
    order, offsets = bucket_order(dest, job.plan.n_partitions)
    ids = job.id_dtype
    return write_columns(job.store, url, {"row": row[order].astype(ids), "nbr": nbr[order].astype(ids),
                                          "dist": dist[order], "owner": owner[order].astype(np.int32)}, offsets)


def labels_of(plan: SelectPlan, cells: np.ndarray) -> np.ndarray:
    if plan.n_partitions == 1:
        return np.zeros(len(cells), np.int32)
    if cells.size and cells.max() >= len(plan.cell_partition):
        raise ValueError(f"cell id {int(cells.max())} was not counted when the stage was planned")
    return plan.cell_partition[cells]


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def count_cells(job: ShuffleJob, g: int) -> np.ndarray:
    """Nodes per cell in range group g (the driver sums these: O(nlist))."""
    a, b = job.plan.groups[g]
    counts = np.zeros(0, np.int64)
    for part in job.plan.parts[a:b]:
        cells = job.store.read_parquet(part.url, columns=["cell"]).column("cell").to_numpy().astype(np.int64)
        if cells.size and cells.min() < 0:
            raise ValueError(f"{part.url}: negative cell id {int(cells.min())}")
        c = np.bincount(cells)
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    return counts


def _report(written: int) -> dict:
    from ..runtime import peak_rss_bytes

    return {"bytes": int(written), "rss": peak_rss_bytes()}


def map_group(job: ShuffleJob, g: int, edges: bool = True) -> dict:
    """Step 1 for range group g (module docstring); returns the bytes written and the task's
    peak memory."""
    plan = job.plan
    glo, ghi = plan.group_range(g)
    data = read_group(job, g, edges=edges)
    label = labels_of(plan, data["cell"])
    order, offsets = bucket_order(label, plan.n_partitions)
    records = {"node": data["node"][order], "uid": data["uid"].take(order), "score": data["score"][order]}
    if job.basic:  # each node's pre-filter code travels with its record to its partition
        records["basic"] = read_basic_codes(job, *plan.groups[g])[order]
    written = write_columns(job.store, job.path(f"nodes-{g:05d}.col"), records, offsets)
    if not edges:
        return _report(written)
    row, nbr, dist = data["row"], data["nbr"], data["dist"]
    del data, order
    row_part = label[row - glo]
    inside = (nbr >= glo) & (nbr < ghi)
    nbr_part = np.full(len(nbr), -1, np.int32)
    nbr_part[inside] = label[nbr[inside] - glo]
    written += _write_records(job, job.path(f"edges-a-{g:05d}.col"),
                              *partition_records(row[inside], nbr[inside], dist[inside], row_part[inside],
                                                 nbr_part[inside]))
    out = ~inside
    dest_group = np.searchsorted(plan.group_starts, nbr[out], side="right") - 1
    order, offsets = bucket_order(dest_group, plan.n_groups)
    ids = job.id_dtype
    written += write_columns(job.store, job.path(f"pending-{g:05d}.col"),
                             {"row": row[out][order].astype(ids), "nbr": nbr[out][order].astype(ids),
                              "dist": dist[out][order], "row_part": row_part[out][order].astype(np.int32)}, offsets)
    return _report(written)


def reduce_group(job: ShuffleJob, g: int) -> dict:
    """Step 2 for range group g: the entries pointing into g, resolved."""
    plan = job.plan
    glo, _ = plan.group_range(g)
    got = read_buckets(job.store, job.files("pending", plan.n_groups), g, ["row", "nbr", "dist", "row_part"])
    a, b = plan.groups[g]
    cells = np.concatenate([job.store.read_parquet(p.url, columns=["cell"]).column("cell").to_numpy()
                            for p in plan.parts[a:b]]).astype(np.int64)
    label = labels_of(plan, cells)
    row, nbr = got["row"].astype(np.int64), got["nbr"].astype(np.int64)
    return _report(_write_records(job, job.path(f"edges-b-{g:05d}.col"),
                                  *partition_records(row, nbr, got["dist"], got["row_part"], label[nbr - glo])))


def part_records(job: ShuffleJob, part: int, dists: bool = True):
    """One partition only: a graph part's edge records straight from the file (what the shuffle
    files would hold): (rows, nbrs, dists, owners=None); without ``dists`` (the counting pass of
    :meth:`~pipeline.core.partition.PartitionRows.build`) only the ``neighbors`` column is read
    and ``dists`` is None. Part by part, so that a worker building its rows holds one part's
    records at a time; nothing else of the part (cells, scores, uids: the pool has them) is read."""
    gp = job.plan.parts[part]
    table = job.store.read_parquet(gp.url, columns=["node", "neighbors"] + (["sq_distances"] if dists else []))
    nodes = _part_nodes(gp, table)
    nb = _list_column(table, "neighbors", gp.url)
    sq = _list_column(table, "sq_distances", gp.url) if dists else None
    row, nbr, dist = _valid_entries(gp, nodes.astype(np.int64), nb, sq, job.plan.n_nodes, job.distance)
    return row, nbr, dist, None


# --------------------------------------------------------------------------------------------
# select.score_file: a hash join by uid, bucketed by range group
# --------------------------------------------------------------------------------------------


def join_file(job: ShuffleJob, kind: str, i: int) -> str:
    """A bucketed file of the score-file join (:mod:`pipeline.formats.buckets`), each its task's
    last write: ``scorefile`` (map task i's rows of the score file, by uid), ``uids`` (range group
    i's (node, uid), by uid) or ``joined`` (join bucket i's (node, score), by range group)."""
    return job.path(f"{kind}-{i:05d}.bkt")


def score_file_chunks(store: Store, url: str) -> list[tuple[int, int]]:
    """Row-group ranges of the score file, about SCORE_FILE_ROWS_PER_TASK rows each."""
    import pyarrow.parquet as pq

    with store.open(url, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
    chunks, start, rows = [], 0, 0
    for i in range(meta.num_row_groups):
        rows += meta.row_group(i).num_rows
        if rows >= SCORE_FILE_ROWS_PER_TASK:
            chunks.append((start, i + 1))
            start, rows = i + 1, 0
    if start < meta.num_row_groups or not chunks:
        chunks.append((start, meta.num_row_groups))
    return chunks


def score_file_map(job: ShuffleJob, index: int, row_groups: tuple[int, int]) -> int:
    """The (uid, score) rows of some row groups of the score file, bucketed by uid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with job.store.open(job.score_file, "rb") as fh:
        table = pq.ParquetFile(fh).read_row_groups(list(range(*row_groups)), columns=["uid", job.score_column])
    uid = table.column("uid").combine_chunks().cast(pa.string())
    if uid.null_count:
        raise ValueError(f"select.score_file {job.score_file}: {uid.null_count} rows have a null uid")
    score = _numeric(table.column(job.score_column), f"{job.score_file} column {job.score_column!r}")
    rows = pa.table({"uid": uid, "score": pa.array(score, pa.float64())})
    writer = BucketedWriter(rows.schema, job.join_buckets)
    writer.add_by_uid(rows)
    return writer.commit(job.store, join_file(job, "scorefile", index))


def uid_map(job: ShuffleJob, g: int) -> int:
    """Range group g's (node, uid), bucketed by uid."""
    import pyarrow as pa

    plan = job.plan
    a, b = plan.groups[g]
    nodes, uids = [], []
    for part in plan.parts[a:b]:
        uid = job.store.read_parquet(part.embedding.url, columns=["uid"]).column("uid").combine_chunks()
        _check_uids(job.store, job.graph_dir, part, uid)
        uids.append(uid.cast(pa.string()))
        nodes.append(np.arange(part.lo, part.hi, dtype=np.int64))
    rows = pa.table({"node": np.concatenate(nodes), "uid": pa.concat_arrays(uids)})
    writer = BucketedWriter(rows.schema, job.join_buckets)
    writer.add_by_uid(rows)
    return writer.commit(job.store, join_file(job, "uids", g))


def join_scores(job: ShuffleJob, h: int, n_file_chunks: int) -> dict:
    """Bucket h of the join: each node's score, bucketed by range group. Returns the missing and
    repeated uids (counts and examples) for the driver's error message."""
    import pyarrow as pa

    plan = job.plan
    file_side = gather_bucket(job.store, [join_file(job, "scorefile", i) for i in range(n_file_chunks)], h)
    node_side = gather_bucket(job.store, [join_file(job, "uids", g) for g in range(plan.n_groups)], h)
    report = {"missing": 0, "missing_examples": [], "repeated": 0, "repeated_examples": []}
    repeated = repeated_uids(file_side.column("uid"))
    if repeated:
        report.update(repeated=len(repeated), repeated_examples=repeated[:5])
        return report
    node_uids = node_side.column("uid").to_numpy(zero_copy_only=False)
    where = uid_positions(file_side.column("uid"), node_uids)
    missing = np.flatnonzero(where < 0)
    if missing.size:
        report.update(missing=int(missing.size), missing_examples=[str(node_uids[i]) for i in missing[:5]])
        return report
    node = node_side.column("node").to_numpy()
    rows = pa.table({"node": node, "score": file_side.column("score").take(pa.array(where, pa.int64()))})
    writer = BucketedWriter(rows.schema, plan.n_groups)
    writer.add(rows, np.searchsorted(plan.group_starts, node, side="right") - 1)
    writer.commit(job.store, join_file(job, "joined", h))
    return report


def join_bucket_count(n_nodes: int, cpus: int) -> int:
    return max(1, min(max(1, n_nodes), max(JOIN_BUCKETS_PER_CPU * max(1, cpus), math.ceil(n_nodes / 2_000_000))))


def basic_codes_url(job: ShuffleJob, index: int, prefix: str | None = None) -> str:
    """Plan part ``index``'s pre-filter codes: the ones the node records carry (``job.codes``), or
    those of ``prefix`` ("basic": :func:`.prefilter.filter_part`'s)."""
    return job.path(f"{prefix or job.codes}-{index:05d}.col")


def read_basic_codes(job: ShuffleJob, first: int, end: int, prefix: str | None = None) -> np.ndarray:
    """The pre-filter codes (int8, -1 = passes) of plan parts ``first..end-1``, concatenated
    (their node range), each checked to cover its part's rows (``prefix``: as :func:`basic_codes_url`)."""
    pieces = []
    for i in range(first, end):
        with ColumnFile(job.store, basic_codes_url(job, i, prefix)) as f:
            codes = f.read_rows(0, f.rows, ["code"])["code"]
        if codes.size != job.plan.parts[i].embedding.rows:
            raise RuntimeError(f"{basic_codes_url(job, i, prefix)} has {codes.size} codes for the "
                               f"{job.plan.parts[i].embedding.rows} rows of its part")
        pieces.append(codes)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int8)


def read_nodes(job: ShuffleJob, p: int, columns: list[str]) -> dict:
    """Partition p's node records (node order) from the map outputs."""
    return read_buckets(job.store, job.files("nodes", job.plan.n_groups), p, columns)


def edge_sources(job: ShuffleJob, p: int) -> list:
    """Callables ``source(full)`` returning partition p's edge-record chunks (rows, nbrs, dists,
    owners); without ``full`` only (rows, nbrs) are read (dists, owners None): the counting pass
    of :meth:`~pipeline.core.partition.PartitionRows.build` needs no more."""
    plan = job.plan
    if plan.direct:
        return _read_once([lambda full, i=i: part_records(job, i, full) for i in range(len(plan.parts))])

    def source(url: str, full: bool):
        with ColumnFile(job.store, url) as f:
            got = f.read_bucket(p, ["row", "nbr", "dist", "owner"] if full else ["row", "nbr"])
        return got["row"], got["nbr"], got.get("dist"), got.get("owner")

    urls = job.files("edges-a", job.plan.n_groups) + job.files("edges-b", job.plan.n_groups)
    return _read_once([lambda full, u=u: source(u, full) for u in urls])


def _read_once(sources: list, budget: int | None = None) -> list:
    """The sources, each chunk read whole by the counting pass and kept for the filling pass, as long
    as all of them total at most ``budget`` bytes (EDGE_CACHE_BYTES): a small partition's records are
    read and decoded once. Past the budget every kept chunk is let go and the rest are read twice,
    as without this, so a large partition's worker never holds records beside its rows (its peak,
    in the filling pass, is unchanged). The chunks are the same either way, so the rows are too."""
    left = EDGE_CACHE_BYTES if budget is None else budget
    kept: dict[int, tuple] = {}

    def cached(i: int, source, full: bool):
        nonlocal left
        if full and i in kept:
            return kept.pop(i)
        if full or left < 0:
            return source(full)
        got = source(True)
        left -= sum(a.nbytes for a in got if a is not None)
        if left >= 0:
            kept[i] = got
        else:  # over the budget: none kept
            kept.clear()
        return got

    return [lambda full, i=i, s=s: cached(i, s, full) for i, s in enumerate(sources)]
