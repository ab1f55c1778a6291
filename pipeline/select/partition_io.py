"""A partition worker's reads and writes: its node records from the shuffle (or the embedding
parts when there is one partition), uids read back on demand, its run of picks for the merge, and
its share of the outputs (``nodes/part-P.parquet``, sorted subset runs, decision records)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..core.partition import positions_of
from ..formats.selection import PREFILTER_BETA, PREFILTER_KEPT, hex_uid_pairs
from ..formats.shuffle import write_columns
from .decisions import write_decision_records
from .outputs import read_ranks
from .phases import Finished, Picks, Pool
from .shuffle import ShuffleJob, read_basic_codes, read_group, read_nodes

# rows per row group of a partition's nodes file
NODES_FILE_ROWS = 1_000_000


def read_pool(job: ShuffleJob, pid: int) -> Pool:
    """Partition pid's owned nodes, raw scores and basic-filter codes."""
    if job.plan.direct:
        scores = [read_group(job, g, edges=False, uids=False)["score"] for g in range(job.plan.n_groups)]
        codes = read_basic_codes(job, 0, len(job.plan.parts)) if job.basic else None
        return Pool(pid, np.arange(job.plan.n_nodes, dtype=np.int64), np.concatenate(scores) if scores else np.zeros(0),
                    codes)
    got = read_nodes(job, pid, ["node", "score"] + (["basic"] if job.basic else []))
    pool = Pool(pid, got["node"].astype(np.int64), got["score"], got.get("basic"))
    if pool.owned.size > 1 and np.any(np.diff(pool.owned) <= 0):
        raise RuntimeError(f"partition {pid}: node records are not in node order")
    return pool


def read_uids(job: ShuffleJob, pid: int, positions):
    """uids of partition pid's owned nodes at ``positions`` (in its pool, any order), read back from
    the shuffle's node records (or the embedding parts when there is one partition)."""
    import pyarrow as pa

    positions = np.asarray(positions, np.int64)
    if not job.plan.direct:
        return read_nodes(job, pid, ["uid"])["uid"].take(positions)
    order = np.argsort(positions, kind="stable")
    ordered = positions[order]
    pieces = []
    for g in range(job.plan.n_groups):
        lo, hi = job.plan.group_range(g)
        sel = ordered[np.searchsorted(ordered, lo):np.searchsorted(ordered, hi)]
        if sel.size:
            pieces.append(read_group(job, g, edges=False, uids=True)["uid"].take(sel - lo))
    if not pieces:
        return pa.array([], pa.string())
    return pa.concat_arrays(pieces).take(np.argsort(order, kind="stable"))


def pool_uids(job: ShuffleJob, pool: Pool):
    """Every owned node's uid, in pool order: read on first use and kept with the pool."""
    if pool.uids is None:
        if job.plan.direct:
            groups = range(job.plan.n_groups)
            pool.uids = pa.concat_arrays([read_group(job, g, edges=False, uids=True)["uid"] for g in groups]) \
                if job.plan.n_groups else pa.array([], pa.string())
        else:
            pool.uids = read_nodes(job, pool.pid, ["uid"])["uid"]
        if len(pool.uids) != pool.owned.size:
            raise RuntimeError(f"partition {pool.pid}: {len(pool.uids)} uids read for {pool.owned.size} nodes")
    return pool.uids


def write_run(job: ShuffleJob, url: str, pool: Pool, picks: Picks) -> int:
    """The partition's sorted run of picks, for the merge (:mod:`.outputs`)."""
    uids = pool_uids(job, pool).take(positions_of(pool.owned, picks.nodes))
    write_columns(job.store, url, {
        "major": np.asarray(picks.major, np.int64), "minor": np.asarray(picks.minor, np.int64), "node": picks.nodes,
        "owner": np.full(picks.nodes.size, pool.pid, np.int32), "forward": np.asarray(picks.forward, np.float64),
        "final": np.asarray(picks.final, np.float64), "uid": uids})
    return int(picks.nodes.size)


def node_columns(done: Finished, ranked: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, dict]:
    """(rank of every owned node (-1: not ranked), its score columns) of a finished partition."""
    owned = done.pool.owned
    n = owned.size
    rank = np.full(n, -1, np.int64)
    rank[positions_of(owned, ranked)] = ranks
    columns = {"forward": np.full(n, np.nan), "final": np.full(n, np.nan),
               "blame_node": np.full(n, -1, np.int64), "blame_amount": np.zeros(n)}
    columns["forward"][done.keep] = done.forward
    columns["final"][done.keep] = done.final
    if done.blame_node is not None:
        columns["blame_node"][done.keep] = done.blame_node
        columns["blame_amount"][done.keep] = done.blame_amount
    return rank, columns


def write_outputs(job: ShuffleJob, done: Finished, ranks_url: str, nodes_url: str, subsets: list[str],
                  budgets: list[int], decisions: bool) -> dict:
    """``selection/nodes/part-P.parquet`` (every owned node: rank, scores, blame), one sorted run
    of subset uids per budget and (``decisions``) the records the decisions tasks join
    (:mod:`.decisions`); returns the non-hex uids met."""
    pool = done.pool
    got = read_ranks(job.store, ranks_url)
    ranked = done.picks.nodes[: got.size] if got.size else np.zeros(0, np.int64)
    rank, columns = node_columns(done, ranked, got)
    uids = pool_uids(job, pool)
    codes = np.full(pool.owned.size, PREFILTER_KEPT, np.int8) if pool.basic is None else pool.basic.copy()
    codes[~done.keep & (codes == PREFILTER_KEPT)] = PREFILTER_BETA  # passed the basic filter, not β
    write_nodes_file(job.store, nodes_url, pool.owned, uids, pool.raw, codes, rank, columns)
    requests = 0
    if decisions:
        requests = write_decision_records(job, pool.pid, pool.owned, codes, rank, pool.raw, columns["blame_node"],
                                          columns["blame_amount"], uids)
    bad: list[str] = []
    n_bad = 0
    for b, url in zip(budgets, subsets):
        sel = np.flatnonzero((rank >= 0) & (rank < b))
        hi, lo, ok = hex_uid_pairs(uids.take(sel))
        if not ok.all():
            n_bad = max(n_bad, int((~ok).sum()))
            bad = [str(u) for u in uids.take(sel[~ok][:5]).to_pylist()]
        order = np.lexsort((lo, hi))
        write_columns(job.store, url, {"hi": hi[order], "lo": lo[order]})
    return {"bad_uids": n_bad, "bad_examples": bad, "ranked": int(got.size),
            "blame_requests": requests}


def write_nodes_file(store, url: str, owned, uids, raw, prefilter_codes, rank, columns: dict) -> None:
    """``nodes/part-P.parquet``, NODES_FILE_ROWS rows per row group (a table of at most that
    many rows at a time)."""
    import pyarrow.parquet as pq

    from ..formats.selection import nodes_table

    def fill(path: str) -> None:
        writer = None
        for lo in range(0, max(len(owned), 1), NODES_FILE_ROWS):
            hi = min(len(owned), lo + NODES_FILE_ROWS)
            table = nodes_table(owned[lo:hi], uids.slice(lo, hi - lo), raw[lo:hi], prefilter_codes[lo:hi], rank[lo:hi],
                                columns["forward"][lo:hi], columns["final"][lo:hi], columns["blame_node"][lo:hi],
                                columns["blame_amount"][lo:hi])
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table)
        writer.close()

    store.write_file(url, fill)


__all__ = ["NODES_FILE_ROWS", "node_columns", "pool_uids", "read_pool", "read_uids", "write_nodes_file", "write_outputs",
           "write_run"]
