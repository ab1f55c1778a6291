"""``select.prefilter.exact_duplicates``: samples whose image bytes are identical keep one, as Ray
tasks before the select stage's shuffle, with no process holding the pool's digests.

The digest is the embedding parts' ``sha256`` column (the image member's bytes; DataComp's
metadata on the precomputed path); a row without one (null) is never a duplicate (counted as
``sha256_unknown``). Only rows the basic filter keeps take part (it runs first), so a copy is
never dropped for a sample that left the pool anyway. Like the uid checks
(:mod:`pipeline.formats.buckets`), by hash buckets through the work directory:

1. :func:`map_part` per embedding part: (digest words, node, uid) of its candidate rows, bucketed
   by digest (``sha-map-IIIII.col``);
2. :func:`find_duplicates` per digest bucket: the groups of equal digests, each keeping its
   earliest node (node order = (shard, position): :func:`pipeline.core.exact_duplicates.first_of_groups`);
   the other rows with the kept row's uid, bucketed by their part (``sha-dup-HHHHH.col``);
3. :func:`gather_part` per embedding part: its duplicates as a column per row (``exact-IIIII.col``:
   ``kept_uid``, "" for rows that stay), the last write of the part.
"""

from __future__ import annotations

import numpy as np

from ..core.exact_duplicates import HEX_DIGITS, digest_words, first_of_groups
from ..formats.embeddings import read_sha256
from ..formats.shuffle import ColumnFile, bucket_order, read_buckets, write_columns
from .shuffle import ShuffleJob, read_basic_codes

BASIC = "basic"  # the basic filter's own codes (:func:`.prefilter.filter_part`, prefix of its file)


def map_url(job: ShuffleJob, index: int) -> str:
    return job.path(f"sha-map-{index:05d}.col")


def dup_url(job: ShuffleJob, bucket: int) -> str:
    return job.path(f"sha-dup-{bucket:05d}.col")


def kept_url(job: ShuffleJob, index: int) -> str:
    return job.path(f"exact-{index:05d}.col")


def map_part(job: ShuffleJob, index: int, n_buckets: int, basic: bool) -> dict:
    """Step 1 for plan part ``index``; returns its rows without a digest (``sha256_unknown``).
    A digest that is not 64 hex digits is an error naming the part and how many."""
    import pyarrow as pa

    plan_part = job.plan.parts[index]
    part = plan_part.embedding
    digests = read_sha256(job.store, part)
    texts = digests.to_pylist()
    words, valid = digest_words(texts)
    known = np.array([t is not None for t in texts], bool)
    bad = known & ~valid
    if bad.any():
        example = texts[int(np.flatnonzero(bad)[0])]
        raise ValueError(f"embedding part {part.url}: {int(bad.sum())} sha256 values are not {HEX_DIGITS} hex digits, "
                         f"e.g. {example!r}")
    candidate = valid.copy()
    if basic:  # rows the basic filter drops are out of the pool already
        candidate &= read_basic_codes(job, index, index + 1, BASIC) < 0
    rows = np.flatnonzero(candidate)
    uids = job.store.read_parquet(part.url, columns=["uid"]).column("uid").combine_chunks().cast(pa.string())
    bucket = (words[rows, 0] % np.uint64(n_buckets)).astype(np.int64)
    order, offsets = bucket_order(bucket, n_buckets)
    picked = rows[order]
    write_columns(job.store, map_url(job, index), {
        "w0": words[picked, 0], "w1": words[picked, 1], "w2": words[picked, 2], "w3": words[picked, 3],
        "node": (plan_part.lo + picked).astype(np.int64), "uid": uids.take(pa.array(picked, pa.int64()))}, offsets)
    return {"sha256_unknown": int((~known).sum())}


def find_duplicates(job: ShuffleJob, bucket: int) -> dict:
    """Step 2 for digest bucket ``bucket``: returns the duplicates and the groups they fall in."""
    plan = job.plan
    got = read_buckets(job.store, [map_url(job, i) for i in range(len(plan.parts))], bucket,
                       ["w0", "w1", "w2", "w3", "node", "uid"])
    words = np.stack([got[c] for c in ("w0", "w1", "w2", "w3")], axis=1) if got["node"].size \
        else np.zeros((0, 4), np.uint64)
    rows, kept = first_of_groups(words, got["node"])
    nodes = got["node"][rows]
    part_starts = np.array([p.lo for p in plan.parts], np.int64)
    order, offsets = bucket_order(np.searchsorted(part_starts, nodes, side="right") - 1, len(plan.parts))
    import pyarrow as pa

    write_columns(job.store, dup_url(job, bucket), {
        "node": nodes[order], "kept_uid": got["uid"].take(pa.array(kept[order], pa.int64()))}, offsets)
    return {"duplicates": int(rows.size), "groups": int(np.unique(kept).size)}


def gather_part(job: ShuffleJob, index: int, n_buckets: int) -> int:
    """Step 3 for plan part ``index``: ``exact-IIIII.col`` (``kept_uid`` per row, "" when the row
    stays); returns its duplicates."""
    import pyarrow as pa

    plan_part = job.plan.parts[index]
    got = read_buckets(job.store, [dup_url(job, h) for h in range(n_buckets)], index, ["node", "kept_uid"])
    rows = got["node"] - plan_part.lo
    where = np.full(plan_part.embedding.rows, rows.size, np.int64)  # the "" appended below: stays
    where[rows] = np.arange(rows.size)
    kept = pa.concat_arrays([got["kept_uid"].cast(pa.string()), pa.array([""], pa.string())]).take(pa.array(where))
    write_columns(job.store, kept_url(job, index), {"kept_uid": kept})
    return int(rows.size)


def read_kept(job: ShuffleJob, index: int):
    """Plan part ``index``'s ``kept_uid`` column (pyarrow strings, "" where the row stays)."""
    with ColumnFile(job.store, kept_url(job, index)) as f:
        got = f.read_rows(0, f.rows, ["kept_uid"])["kept_uid"]
    if len(got) != job.plan.parts[index].embedding.rows:
        raise RuntimeError(f"{kept_url(job, index)} has {len(got)} rows for the "
                           f"{job.plan.parts[index].embedding.rows} of its part")
    return got


__all__ = ["dup_url", "find_duplicates", "gather_part", "kept_url", "map_part", "map_url", "read_kept"]
