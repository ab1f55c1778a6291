"""The write plan: which selected sample goes into which output shard, fixed before anything is
written, built by Ray tasks so the driver never holds the pool's or the selection's uids.

Kept samples in source order (embedding part = input shard, then position in it), cut into runs
of ``output.samples_per_shard``: each output shard then reads only a contiguous run of input
shards (usually one or two), and a resumed run writes exactly the same shards.

To put the selection (uids in rank order) into source order, it is joined by uid with the
committed embedding parts through bucketed files (the shuffle of :mod:`pipeline.formats.buckets`;
why: :mod:`pipeline.embed.precomputed`). Under ``WORKDIR/write/`` (every file committed
atomically; a rerun skips what exists)::

    _join/selected-CCCCC.*   (1) per row group of selected.parquet: (uid, rank) bucketed by uid (.bkt);
                                 .json: its rows and the sum of their uid hashes
    _join/pool-TTTTT.*       (1) per group of parts: (uid, part, position, key, clip_score) bucketed
                                 by uid; .json: each part's input shard
    _join/joined-BBBBB.*     (2) per bucket: the selected rows with their part and position,
                                 bucketed by group of parts; .json: selected rows per part. A
                                 selected uid in no part, in two parts, or selected twice is an error
    plan/part-NNNNN.parquet  (3) per group of parts: each part's selected rows in source order
                                 (uid, rank, clip_score, source_shard, source_key)
    plan.json                the commit: parts, selected rows per part, samples, output shards and
                             the selection's uid hash sum (the integrity check's reference)

Output shard ``j`` is global plan rows ``[j*S, (j+1)*S)`` (S = samples_per_shard): its task reads
the pieces of the parts those rows fall in (:func:`read_plan_rows`). The driver holds O(parts)
numbers and names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import JobConfig
from ..formats.buckets import BucketedWriter, gather_bucket, hash_sum, repeated_uids, uid_positions
from ..formats.embeddings import EmbeddingPart, list_parts
from ..formats.selection import SELECTED
from ..steps import Step, run_step, start_step
from ..storage import Store, join
from ..workdir import EMBED, SELECT, WRITE, stage_dir

PLAN = "plan.json"
PLAN_DIR = "plan"
JOIN_DIR = "_join"
# A join task holds one bucket of the pool side (~100 bytes a row: uid, key, numbers) and its
# share of the selection; 2·10^6 rows keep it near 200 MB.
POOL_ROWS_PER_BUCKET = 2_000_000
PARTS_PER_TASK = 16  # parts read per pool-side task, and parts per plan-writing task
PLAN_COLUMNS = ("uid", "rank", "clip_score", "source_shard", "source_key")


# -- step 1 ---------------------------------------------------------------------------------------

def selection_task(store: Store, selected_url: str, row_group: int, n_buckets: int, out_url: str) -> None:
    import pyarrow.parquet as pq

    with store.open(selected_url, "rb") as fh:
        file = pq.ParquetFile(fh)
        # rows ranked only for larger keep rates (selected false) are not written; files written
        # before keep rates existed have no such column and are all selection
        ranked = "selected" in file.schema_arrow.names
        table = file.read_row_group(row_group, columns=["uid", "rank"] + (["selected"] if ranked else []))
    if ranked:
        table = table.filter(table.column("selected")).select(["uid", "rank"])
    writer = BucketedWriter(table.schema, n_buckets)
    writer.add_by_uid(table)
    store.write_json(out_url[: -len(".bkt")] + ".json",
                     {"rows": table.num_rows, "hash_sum": str(hash_sum(table.column("uid")))})
    writer.commit(store, out_url)


def _pool_schema():
    import pyarrow as pa

    return pa.schema([("uid", pa.string()), ("part", pa.int32()), ("position", pa.int64()), ("key", pa.string()),
                      ("clip_score", pa.float32())])


def pool_task(store: Store, parts: list[tuple[int, EmbeddingPart]], n_buckets: int, out_url: str) -> None:
    """(uid, part ordinal, position, key, clip_score) of every row of `parts`, bucketed by uid."""
    import pyarrow as pa

    writer = BucketedWriter(_pool_schema(), n_buckets)
    shards = {}
    for ordinal, part in parts:
        table = store.read_parquet(part.url, columns=["uid", "shard", "key", "clip_score"])
        if table.num_rows != part.rows:
            raise RuntimeError(f"{part.url} has {table.num_rows} rows, {part.rows} when the plan started")
        names = set(table.column("shard").unique().to_pylist())
        if len(names) > 1:
            raise ValueError(f"embedding part {part.url} holds rows of several input shards: {sorted(names)[:3]}")
        shards[str(ordinal)] = names.pop() if names else None
        rows = pa.table({"uid": table.column("uid"), "part": pa.array(np.full(part.rows, ordinal, np.int32)),
                         "position": pa.array(np.arange(part.rows, dtype=np.int64)), "key": table.column("key"),
                         "clip_score": table.column("clip_score").cast(pa.float32())})
        writer.add_by_uid(rows)
    store.write_json(out_url[: -len(".bkt")] + ".json", {"shards": shards})
    writer.commit(store, out_url)


# -- step 2 ---------------------------------------------------------------------------------------

def _examples(values) -> list:
    return [str(v) for v in list(dict.fromkeys(values))[:5]]


def join_task(store: Store, join_dir: str, bucket: int, selected_urls: list[str], pool_urls: list[str],
              parts_per_group: int, n_groups: int) -> None:
    """The selected rows of bucket `bucket` with their part and position, bucketed by group of
    `parts_per_group` consecutive parts."""
    import pyarrow as pa

    selected = gather_bucket(store, selected_urls, bucket)
    pool = gather_bucket(store, pool_urls, bucket)
    uids = selected.column("uid").to_numpy(zero_copy_only=False)
    repeated = repeated_uids(uids)
    if repeated:
        raise ValueError(f"selected.parquet lists {len(repeated)} uids more than once, e.g. {_examples(repeated)}")
    where = uid_positions(pool.column("uid"), uids)
    lost = where < 0
    if lost.any():
        raise ValueError(f"{int(lost.sum())} selected uids are not in the embedding parts, "
                         f"e.g. {_examples(uids[lost])}")
    in_two = set(repeated_uids(pool.column("uid")))
    twice = [u for u in uids.tolist() if u in in_two]
    if twice:
        raise ValueError(f"{len(twice)} selected uids appear in more than one pool sample, e.g. {_examples(twice)}")
    found = pool.take(pa.array(where, pa.int64()))
    part = found.column("part").to_numpy().astype(np.int64)
    table = pa.table({"uid": selected.column("uid").cast(pa.string()),
                      "rank": selected.column("rank").cast(pa.int64()),
                      "clip_score": found.column("clip_score").cast(pa.float32()),
                      "part": found.column("part").cast(pa.int32()),
                      "position": found.column("position").cast(pa.int64()),
                      "key": found.column("key").cast(pa.string())})
    writer = BucketedWriter(table.schema, n_groups)
    writer.add(table, part // parts_per_group)
    ordinals, counts = np.unique(part, return_counts=True)
    store.write_json(join(join_dir, f"joined-{bucket:05d}.json"),
                     {"selected_per_part": {str(k): int(v) for k, v in zip(ordinals.tolist(), counts.tolist())}})
    writer.commit(store, join(join_dir, f"joined-{bucket:05d}.bkt"))


# -- step 3 ---------------------------------------------------------------------------------------

def piece_url(plan_dir: str, part_name: str) -> str:
    return join(plan_dir, part_name + ".parquet")


def plan_task(store: Store, join_dir: str, plan_dir: str, group: int, n_buckets: int,
              parts: dict[int, tuple[str, str]]) -> None:
    """Write the plan pieces of the parts of group `group` ({ordinal: (part name, shard URL)})."""
    import pyarrow as pa

    rows = gather_bucket(store, [join(join_dir, f"joined-{b:05d}.bkt") for b in range(n_buckets)], group)
    rows = rows.combine_chunks()
    part = rows.column("part").to_numpy()
    order = np.lexsort((rows.column("position").to_numpy(), part))
    rows, part = rows.take(pa.array(order, pa.int64())), part[order]
    for ordinal, (name, shard) in sorted(parts.items()):
        lo, hi = np.searchsorted(part, [ordinal, ordinal + 1])
        if hi == lo:
            continue
        piece = rows.slice(int(lo), int(hi - lo))
        store.write_parquet(piece_url(plan_dir, name), pa.table({
            "uid": piece.column("uid"), "rank": piece.column("rank"), "clip_score": piece.column("clip_score"),
            "source_shard": pa.array([shard] * piece.num_rows, pa.string()), "source_key": piece.column("key")}))


# -- the driver -----------------------------------------------------------------------------------

def build_plan(store: Store, cfg: JobConfig) -> dict[str, Any]:
    """The committed plan (plan.json), building it with Ray tasks when it is not there yet."""
    import pyarrow.parquet as pq

    write_dir = stage_dir(cfg.workdir, WRITE)
    plan_url = join(write_dir, PLAN)
    if store.exists(plan_url):
        return store.read_json(plan_url)
    join_dir, plan_dir = join(write_dir, JOIN_DIR), join(write_dir, PLAN_DIR)
    selected_url = join(stage_dir(cfg.workdir, SELECT), SELECTED)
    with store.open(selected_url, "rb") as fh:
        row_groups = pq.ParquetFile(fh).metadata.num_row_groups
    parts, _ = list_parts(store, stage_dir(cfg.workdir, EMBED))
    n_buckets = max(1, math.ceil(sum(p.rows for p in parts) / POOL_ROWS_PER_BUCKET))
    groups = [list(range(lo, min(lo + PARTS_PER_TASK, len(parts)))) for lo in range(0, len(parts), PARTS_PER_TASK)]

    # 1: both sides bucketed by uid, side by side
    selected_urls = [join(join_dir, f"selected-{r:05d}.bkt") for r in range(row_groups)]
    pool_urls = [join(join_dir, f"pool-{t:05d}.bkt") for t in range(len(groups))]
    selection = Step("write.plan.selection", selection_task,
                     [(store, selected_url, r, n_buckets, url) for r, url in enumerate(selected_urls)],
                     outputs=selected_urls, unit="row groups")
    pool = Step("write.plan.pool", pool_task,
                [(store, [(i, parts[i]) for i in group], n_buckets, url) for group, url in zip(groups, pool_urls)],
                outputs=pool_urls, unit="part groups")
    for side in [start_step(selection, store), start_step(pool, store)]:
        side.wait()

    # 2: the join, when there is a selection (an empty selected.parquet has no row group)
    joined_urls = [join(join_dir, f"joined-{b:05d}.bkt") for b in range(n_buckets if selected_urls else 0)]
    run_step(Step("write.plan.join", join_task, [(store, join_dir, b, selected_urls, pool_urls, PARTS_PER_TASK,
                                                  len(groups)) for b in range(len(joined_urls))],
                  outputs=joined_urls, unit="buckets"), store)

    shards: dict[str, str] = {}
    for url in pool_urls:
        shards.update(store.read_json(url[: -len(".bkt")] + ".json")["shards"])
    selected_per_part = np.zeros(len(parts), np.int64)
    for url in joined_urls:
        for ordinal, count in store.read_json(url[: -len(".bkt")] + ".json")["selected_per_part"].items():
            selected_per_part[int(ordinal)] += count
    selection_rows, selection_hash = 0, 0
    for url in selected_urls:
        info = store.read_json(url[: -len(".bkt")] + ".json")
        selection_rows += info["rows"]
        selection_hash = (selection_hash + int(info["hash_sum"])) % 2**64
    samples = int(selected_per_part.sum())
    if samples != selection_rows:  # the joins' own checks make this unreachable; a bug would show here
        raise RuntimeError(f"the write plan holds {samples} samples, selected.parquet {selection_rows}")

    # 3: the plan pieces; a task writes its group's missing pieces
    existing_pieces = set(store.ls(plan_dir))
    calls = []
    for g, group in enumerate(groups):
        todo = {i: (parts[i].name, shards[str(i)]) for i in group
                if selected_per_part[i] and parts[i].name + ".parquet" not in existing_pieces}
        if todo:
            calls.append((store, join_dir, plan_dir, g, n_buckets, todo))
    run_step(Step("write.plan.pieces", plan_task, calls, unit="part groups"), store)

    samples_per_shard = cfg.output.samples_per_shard
    plan = {"parts": [p.name for p in parts], "selected_per_part": selected_per_part.tolist(),
            "samples": samples, "samples_per_shard": samples_per_shard,
            "output_shards": -(-samples // samples_per_shard), "hash_sum": str(selection_hash),
            "buckets": n_buckets}
    store.write_json(plan_url, plan)
    store.rm(join_dir, recursive=True)
    return plan


def read_plan_rows(store: Store, write_dir: str, plan: dict[str, Any], index: int) -> dict[str, list]:
    """The plan rows of output shard `index` (:data:`PLAN_COLUMNS`), in output order."""
    import pyarrow as pa

    size = plan["samples_per_shard"]
    lo, hi = index * size, min((index + 1) * size, plan["samples"])
    counts = np.asarray(plan["selected_per_part"], np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    pieces = []
    for ordinal in np.flatnonzero((starts < hi) & (ends > lo) & (counts > 0)).tolist():
        table = store.read_parquet(piece_url(join(write_dir, PLAN_DIR), plan["parts"][ordinal]))
        if table.num_rows != counts[ordinal]:
            raise RuntimeError(f"plan piece {plan['parts'][ordinal]} has {table.num_rows} rows, the plan "
                               f"says {counts[ordinal]}")
        first = max(lo, int(starts[ordinal])) - int(starts[ordinal])
        last = min(hi, int(ends[ordinal])) - int(starts[ordinal])
        pieces.append(table.slice(first, last - first))
    if not pieces:
        return {c: [] for c in PLAN_COLUMNS}
    return pa.concat_tables(pieces).select(list(PLAN_COLUMNS)).to_pydict()
