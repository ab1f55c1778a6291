"""``selection/decisions.parquet/part-NNNNN.parquet``: one row per input sample saying what happened
to it (:mod:`pipeline.formats.selection`), written by tasks at the end of the select stage.

The per-node results live with the partitions (cells: scattered over the node range), a part's
rows are a contiguous node range, and a pruned node's blame names another node whose uid lives in
yet another part. So the rows are brought together by range group (:mod:`.plan`, consecutive
parts, at most ``GROUP_MAX_NODES`` nodes) in three steps through the work directory, never
through the driver:

1. each partition, while writing its nodes file (:func:`.partition_io.write_outputs`),
   writes ``decide-P`` (node, pre-filter code, rank, raw score, blame node and amount, and the
   blame uid when the blamed node is its own: it holds its nodes' uids) bucketed by the node's
   range group, and ``blame-req-P`` (blamed node, node) for the blamed nodes owned elsewhere,
   bucketed by the *blamed* node's range group (most blame stays inside a partition: with one
   partition there are no requests);
2. :func:`resolve_blame` per range group g: the uids of the requested blamed nodes in g (from g's
   embedding parts, read only when there are requests), written to ``blame-uid-g`` (node, blame
   uid) bucketed by the blamed-for node's group;
3. :func:`write_decisions` per range group: bucket g of every ``decide-*`` and ``blame-uid-*``
   (exactly g's nodes), joined by row with g's embedding parts (uid, shard, key) and followed by
   each part's skip records; one file per part. A file already there is kept (a resumed stage
   counts it and writes only the missing ones).

A task holds one range group's rows; the driver holds O(groups + partitions).
"""

from __future__ import annotations

import numpy as np

from ..core.decide import DECISIONS, SKIPPED, decide
from ..core.partition import positions_of
from ..formats.embeddings import part_skipped_url, read_part_skipped
from ..formats.selection import (
    DECISIONS_DIR,
    PREFILTER_EVAL,
    PREFILTER_EXACT,
    PREFILTER_KEPT,
    decisions_table,
    prefilter_labels,
)
from ..formats.shuffle import bucket_order, read_buckets, write_columns
from ..storage import join
from . import duplicates
from .shuffle import ShuffleJob

RECORD_COLUMNS = ["node", "code", "rank", "score", "blame_node", "blame_amount", "blame_uid"]


def decide_url(job: ShuffleJob, pid: int) -> str:
    return job.path(f"decide-{pid:05d}.col")


def request_url(job: ShuffleJob, pid: int) -> str:
    return job.path(f"blame-req-{pid:05d}.col")


def blame_url(job: ShuffleJob, g: int) -> str:
    return job.path(f"blame-uid-{g:05d}.col")


def decisions_url(out_dir: str, part) -> str:
    """The decisions file of a plan part (named after its embedding part, = its input shard)."""
    return join(out_dir, DECISIONS_DIR, f"{part.embedding.name}.parquet")


def _group_of(job: ShuffleJob, nodes: np.ndarray) -> np.ndarray:
    return np.searchsorted(job.plan.group_starts, nodes, side="right") - 1


def write_decision_records(job: ShuffleJob, pid: int, owned, codes, rank, raw, blame_node, blame_amount,
                           uids) -> int:
    """Step 1 for partition ``pid`` (module docstring); `uids` are the owned nodes' uids. Returns the
    blame requests written (blamed nodes owned by other partitions)."""
    import pyarrow as pa

    at = positions_of(owned, blame_node)  # -1: no blame, or a node owned elsewhere
    local = at >= 0
    # "" = no blame here: none, or resolved by the blamed node's owner (step 2)
    blame_uid = pa.concat_arrays([uids, pa.array([""], pa.string())]).take(np.where(local, at, owned.size))
    order, offsets = bucket_order(_group_of(job, owned), job.plan.n_groups)
    write_columns(job.store, decide_url(job, pid), {
        "node": owned[order], "code": np.asarray(codes, np.int8)[order], "rank": rank[order],
        "score": np.asarray(raw, np.float64)[order], "blame_node": blame_node[order],
        "blame_amount": np.asarray(blame_amount, np.float64)[order], "blame_uid": blame_uid.take(order)}, offsets)
    remote = (blame_node >= 0) & ~local
    order, offsets = bucket_order(_group_of(job, blame_node[remote]), job.plan.n_groups)
    write_columns(job.store, request_url(job, pid), {"blamed": blame_node[remote][order],
                                                     "node": owned[remote][order]}, offsets)
    return int(remote.sum())


def _group_columns(job: ShuffleJob, g: int, columns: list[str]) -> dict:
    """Columns of range group g's embedding parts, concatenated (strings as pyarrow arrays)."""
    import pyarrow as pa

    a, b = job.plan.groups[g]
    out: dict[str, list] = {c: [] for c in columns}
    for part in job.plan.parts[a:b]:
        table = job.store.read_parquet(part.embedding.url, columns=columns)
        if table.num_rows != part.embedding.rows:
            raise RuntimeError(f"{part.embedding.url} has {table.num_rows} rows, {part.embedding.rows} when the "
                               "stage started")
        for c in columns:
            out[c].append(table.column(c).combine_chunks().cast(pa.string()))
    return {c: pa.concat_arrays(v) for c, v in out.items()}


def resolve_blame(job: ShuffleJob, g: int) -> int:
    """Step 2 for range group g: the uids of the blamed nodes of g, to their requesters' groups."""
    plan = job.plan
    lo, _ = plan.group_range(g)
    got = read_buckets(job.store, [request_url(job, p) for p in range(plan.n_partitions)], g, ["blamed", "node"])
    if got["node"].size:
        uids = _group_columns(job, g, ["uid"])["uid"].take(got["blamed"] - lo)
    else:  # every blame of this group was resolved by its partition: nothing to read
        import pyarrow as pa

        uids = pa.array([], pa.string())
    order, offsets = bucket_order(_group_of(job, got["node"]), plan.n_groups)
    write_columns(job.store, blame_url(job, g), {"node": got["node"][order], "blame_uid": uids.take(order)}, offsets)
    return int(got["node"].size)


def _eval_ids(job: ShuffleJob) -> list:
    """Each evaluation set's item ids (a task loads the small sets once)."""
    from .eval_sets import load_set

    return [load_set(job.store, source)[0] for source in job.eval_sets]


def _eval_columns(job: ShuffleJob, index: int, code: np.ndarray, eval_ids: list) -> tuple:
    """(eval_set, eval_id, eval_similarity) of plan part ``index``'s rows: the match of each
    ``eval_duplicate`` row, null elsewhere."""
    import pyarrow as pa

    from .eval_sets import read_matches

    got = read_matches(job, index)
    rows = np.flatnonzero(code == PREFILTER_EVAL)
    names: list = [None] * code.size
    ids: list = [None] * code.size
    sims = np.full(code.size, np.nan)
    for r in rows.tolist():
        k = int(got["set"][r])
        names[r], ids[r], sims[r] = job.eval_sets[k].name, eval_ids[k][int(got["item"][r])], got["similarity"][r]
    mask = np.ones(code.size, bool)
    mask[rows] = False
    return pa.array(names, pa.string()), pa.array(ids, pa.string()), pa.array(sims, pa.float64(), mask=mask)


def _no_eval_columns(n: int) -> tuple:
    import pyarrow as pa

    return pa.nulls(n, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.float64())


def _count(table) -> dict[str, int]:
    import pyarrow.compute as pc

    counts = {d: 0 for d in DECISIONS}
    for row in pc.value_counts(table.column("decision")).to_pylist():
        counts[row["values"]] += int(row["counts"])
    return counts


def write_decisions(job: ShuffleJob, g: int, out_dir: str, budget: int) -> dict:
    """Step 3 for range group g: the decisions file of each of g's parts that is not there yet.
    Returns the decisions counted (every part's, written or found) and how many parts had no
    skip records."""
    import pyarrow as pa
    import pyarrow.compute as pc

    plan, store = job.plan, job.store
    a, b = plan.groups[g]
    counts = {d: 0 for d in DECISIONS}
    without = 0
    todo = [i for i in range(a, b) if not store.exists(decisions_url(out_dir, plan.parts[i]))]
    eval_ids = _eval_ids(job) if todo and job.eval_sets else None
    if todo:
        lo, hi = plan.group_range(g)
        rec = read_buckets(store, [decide_url(job, p) for p in range(plan.n_partitions)], g, RECORD_COLUMNS)
        order = np.argsort(rec["node"], kind="stable")
        rec = {k: v[order] if isinstance(v, np.ndarray) else v.take(order) for k, v in rec.items()}
        if not np.array_equal(rec["node"], np.arange(lo, hi)):
            raise RuntimeError(f"the partitions' decision records of range group {g} are not its nodes {lo}..{hi - 1}")
        got = read_buckets(store, [blame_url(job, h) for h in range(plan.n_groups)], g, ["node", "blame_uid"])
        remote = np.zeros(hi - lo, bool)
        remote[got["node"] - lo] = True
        if np.any(rec["blame_node"][remote] < 0):
            raise RuntimeError(f"range group {g}: blame uids do not match the blamed nodes")
        # the owners' answers (step 2) where the blamed node was another partition's
        where = np.arange(hi - lo)
        where[got["node"] - lo] = hi - lo + np.arange(got["node"].size)
        blame_uid = pa.concat_arrays([rec["blame_uid"], got["blame_uid"]]).take(where)
        emb = _group_columns(job, g, ["uid", "shard", "key"])
    for i in range(a, b):
        part = plan.parts[i]
        url = decisions_url(out_dir, part)
        if i not in todo:
            without += part_skipped_url(store, part.embedding) is None
            found = _count(store.read_parquet(url, columns=["decision"]))
            for d in DECISIONS:
                counts[d] += found[d]
            continue
        skipped = read_part_skipped(store, part.embedding)
        without += skipped is None
        s, e = part.lo - lo, part.hi - lo
        code, rank = rec["code"][s:e], rec["rank"][s:e]
        decision = decide(code != PREFILTER_KEPT, rank, budget)
        blamed = blame_uid.slice(s, e - s)
        if job.exact:  # an exact duplicate names the sample with the same bytes that stayed
            kept = duplicates.read_kept(job, i)
            blamed = pc.if_else(pa.array(code == PREFILTER_EXACT), kept, blamed)
        evals = _eval_columns(job, i, code, eval_ids) if job.eval_sets else None
        tables = [decisions_table(emb["shard"].slice(s, e - s), emb["key"].slice(s, e - s), emb["uid"].slice(s, e - s),
                                  decision, prefilter_labels(code), rank, rec["score"][s:e],
                                  blamed, rec["blame_amount"][s:e], evals)]
        for d, c in zip(*np.unique(decision, return_counts=True)):
            counts[DECISIONS[d]] += int(c)
        if skipped is not None and skipped.num_rows:
            k = skipped.num_rows
            tables.append(decisions_table(skipped.column("shard").combine_chunks(), skipped.column("key").combine_chunks(),
                                          skipped.column("uid").combine_chunks(), np.full(k, SKIPPED, np.int8),
                                          skipped.column("reason").combine_chunks(), np.full(k, -1, np.int64),
                                          np.full(k, np.nan), pa.array([""] * k, pa.string()), np.zeros(k),
                                          _no_eval_columns(k) if job.eval_sets else None))
            counts["skipped"] += k
        store.write_parquet(url, pa.concat_tables(tables))
    return {"counts": counts, "without_skip_records": int(without)}
