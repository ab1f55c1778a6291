"""The embed stage's precomputed encoder: DataComp's metadata (parquet + npz, :mod:`~pipeline.formats.datacomp`)
joined by uid to the samples that are actually in the input shards.

Why a shuffle and not a lookup table: the metadata's row order has nothing to do with the shards
(img2dataset re-cut them; some uids failed to download), so every sample must be looked up by
uid, and a table of a DataComp-medium pool's 1.28·10^8 uids and vectors (400 GB) fits in no
process. Both sides are therefore hash-bucketed by uid into files in the workdir
(:mod:`~pipeline.formats.buckets`), each bucket is joined by one Ray task (one bucket's rows in
memory), and the joined rows are bucketed again by group of consecutive input shards, so that one
task per group writes the group's parts in shard order. The driver only holds counts and file
names.

Steps, under ``WORKDIR/embeddings/_join/`` (every file committed atomically; a rerun skips the
files that exist, so a killed job resumes at the step it was in)::

    plan.json               metadata files with rows and array widths, buckets, shard tasks: fixed
                            by the first run (a resume never mixes two bucketings)
    samples-TTTTT.json      (1) per task of `shards_per_task` input shards: per shard, usable samples,
                                whether its img2dataset sidecar (``NNNNNNNN.parquet`` checked against
                                ``_stats.json``: :func:`read_sidecar`) or its tar was read, bytes read;
    samples-TTTTT.skipped.bkt   the samples the reader skips (shard, position, key, json uid, reason),
                                one bucket per shard of the task; every usable sample's uid, shard,
    samples-TTTTT.bkt           position, key, caption and original size, bucketed by uid (the .bkt commits)
    metadata-MMMMM.json     (1) per metadata file: rows, rows without a uid; its rows (uid, file, row,
    metadata-MMMMM.bkt          score, L2-normalised vectors, ok), bucketed by uid
    groups.json             consecutive shards grouped to at most `bucket_rows` usable samples
    joined-BBBBB.json       (2) per bucket: metadata rows whose uid is in no shard, repeated uids
    skipped-BBBBB.bkt           (shard, position, key, uid, reason) of samples not kept, bucketed by shard group
    joined-BBBBB.bkt            the kept rows, bucketed by shard group (commits the bucket)
    part-NNNNN.*            (3) per shard group: its rows from every joined file, in shard order, as
                                the usual parts (:func:`~.parts.commit_part`), one per input shard
    ../precomputed.json     the join's counts (not_in_shards, ...); then ``_join/`` is removed

Rules of the join (bucket task): a uid in several shards is kept in the earliest shard, position
(``duplicate_uid`` for the others, as for the open_clip encoder); a uid on several metadata rows
takes the first row (file order, row order; ``metadata_duplicate_uid``); a sample whose json has
no uid cannot be looked up (``no_uid``); a sample whose uid has no metadata row is
``no_embedding``; one whose vectors are not finite or zero is ``bad_embedding``; metadata rows
matching no sample are ``not_in_shards`` (failed downloads; not samples of the pool).

Every skipped sample travels as a record (shard, position, key, json uid, reason) through the same
files as its count would: the reader's skips in ``samples-TTTTT.skipped.bkt``, the join's in
``skipped-BBBBB.bkt``; a parts task reads only its own shards' records and writes them, in shard
position order, as ``_skipped/part-NNNNN.parquet`` (:func:`~.parts.commit_part` counts the stats
from them).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import Counter
from typing import Any

import numpy as np

from ..config import JobConfig, PrecomputedConfig
from ..core.runs import consecutive_runs
from ..formats.buckets import BucketedWriter, gather_bucket, read_bucket, uid_positions
from ..formats.columns import fixed_list_to_numpy, fixed_size_list
from ..formats.datacomp import (
    MetadataError,
    header_size,
    inspect_all,
    iter_metadata_chunks,
    json_original_size,
    metadata_files,
    valid_sha256,
)
from ..formats.embeddings import part_table
from ..formats.webdataset import DUPLICATE_UID, iter_shard_samples, json_uid, skip_record
from ..steps import Resources, Step, run_step, start_step
from ..storage import Store, join
from .parts import commit_part

log = logging.getLogger(__name__)

JOIN_DIR = "_join"
JOIN_LAYOUT = 3  # of the _join/ files (2: skip records, not counts; 3: sha256); a resume never mixes two
INFO = "precomputed.json"  # the join's counts, committed before _join/ is removed
NO_UID = "no_uid"  # the sample's json has no uid: it cannot be looked up in the metadata
NO_EMBEDDING = "no_embedding"  # in the shards, but its uid is on no metadata row
BAD_EMBEDDING = "bad_embedding"  # its metadata vectors are not finite, or zero
PRECOMPUTED_REASONS = (NO_UID, NO_EMBEDDING, BAD_EMBEDDING)
# What a join or parts task holds besides its bucket (the worker with pyarrow and pandas, ~0.5
# GB), and how many copies of a bucket's rows it makes on the way (decode, take, sort, encode):
# both measured (benchmarks/precomputed_join.py); declared as the steps' Resources so a node runs
# no more of them than its memory holds.
TASK_BASE_MEMORY = 600 * 2**20
BUCKET_COPIES = 6
METADATA_CHUNK_ROWS = 8192  # rows read at once: ~25 MB of l14 vectors (peak task RSS ~0.6 GB, measured)


def keys_of(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _all_keys(pc: PrecomputedConfig) -> list[str]:
    return list(dict.fromkeys(keys_of(pc.image_key) + keys_of(pc.text_key)))


# -- the driver's view of the inputs ---------------------------------------------------------------

def inspect_inputs(cfg: JobConfig, store: Store) -> dict[str, Any]:
    """Every metadata file found, checked (footer and npz headers) before any work: the files,
    their rows, and the widths of the image and text vectors."""
    pc = cfg.embed.precomputed
    infos = inspect_all(store, metadata_files(store, pc.metadata, pc.embeddings), _all_keys(pc))
    first = infos[0]
    if pc.score_column not in first.columns:
        raise MetadataError(f"embed.precomputed.score_column {pc.score_column!r} is not a column of {first.parquet} "
                            f"(columns: {list(first.columns)})")
    image_dim = sum(first.dims[k] for k in keys_of(pc.image_key))
    text_dim = sum(first.dims[k] for k in keys_of(pc.text_key))
    if image_dim != text_dim:
        raise MetadataError(f"image vectors ({pc.image_key}: {image_dim}) and text vectors ({pc.text_key}: "
                            f"{text_dim}) differ in width; choose keys of the same model")
    return {"files": [[i.parquet, i.npz, i.rows] for i in infos], "dim": image_dim,
            "sizes_in_metadata": all(c in first.columns for c in ("original_width", "original_height")),
            "sha256_in_metadata": "sha256" in first.columns}


def resumed_plan(store: Store, directory: str, layout: int) -> dict[str, Any] | None:
    """The plan.json of an interrupted run in `directory` when it is of `layout`; otherwise None,
    and intermediates of another layout (another version's files) are removed: never resumed."""
    url = join(directory, "plan.json")
    if not store.exists(url):
        return None
    plan = store.read_json(url)
    if plan.get("layout") == layout:
        return plan
    log.warning("%s holds intermediate files of another layout; starting over", directory)
    store.rm(directory, recursive=True)
    return None


def _plan(cfg: JobConfig, store: Store, join_dir: str, n_shards: int) -> dict[str, Any]:
    url = join(join_dir, "plan.json")
    resumed = resumed_plan(store, join_dir, JOIN_LAYOUT)
    if resumed is not None:
        return resumed
    pc = cfg.embed.precomputed
    plan = inspect_inputs(cfg, store)
    total = sum(rows for _, _, rows in plan["files"])
    plan["buckets"] = max(1, math.ceil(total / pc.bucket_rows))
    plan["bucket_rows"] = pc.bucket_rows
    plan["layout"] = JOIN_LAYOUT
    plan["shard_tasks"] = [[lo, min(lo + pc.shards_per_task, n_shards)] for lo in range(0, n_shards, pc.shards_per_task)]
    store.write_json(url, plan)
    return plan


# -- step 1: both sides, bucketed by uid ----------------------------------------------------------

def _samples_schema():
    import pyarrow as pa

    return pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("position", pa.int64()), ("key", pa.string()),
                      ("caption", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32())])


def _skips_schema():
    """A skipped sample on its way to its part's skip records (:mod:`~pipeline.formats.embeddings`)."""
    import pyarrow as pa

    return pa.schema([("shard", pa.int32()), ("position", pa.int64()), ("key", pa.string()), ("uid", pa.string()),
                      ("reason", pa.string())])


def _skips_table(rows: list[tuple[int, int, str, str, str]]):
    import pyarrow as pa

    return pa.table([pa.array([r[i] for r in rows], f.type) for i, f in enumerate(_skips_schema())],
                    schema=_skips_schema())


def skips_url(samples_url: str) -> str:
    """The reader's skip records of a samples task (one bucket per shard of the task)."""
    return samples_url[: -len(".bkt")] + ".skipped.bkt"


def sidecar_urls(shard_url: str) -> tuple[str, str] | None:
    """img2dataset's ``NNNNNNNN.parquet`` and ``NNNNNNNN_stats.json`` beside a ``NNNNNNNN.tar``."""
    if not shard_url.endswith(".tar"):
        return None
    stem = shard_url[: -len(".tar")]
    return stem + ".parquet", stem + "_stats.json"


def read_sidecar(store: Store, shard_url: str) -> tuple[Any, str | None]:
    """The shard's img2dataset parquet rows with status ``success`` (uid, key, caption, original
    sizes), in its order, when they can stand for the tar: both sidecar files there, the columns
    there, as many success rows as ``_stats.json`` ``successes``, every key present. Otherwise
    (None, why) and the join reads the tar."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = sidecar_urls(shard_url)
    if names is None:
        return None, "not a .tar name"
    parquet, stats_url = names
    try:
        with store.open(parquet, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = set(pf.schema_arrow.names)
            missing = [c for c in ("uid", "key", "status", "caption") if c not in have]
            if missing:
                return None, f"{parquet} has no column {missing}"
            sizes = [c for c in ("original_width", "original_height") if c in have]
            table = pf.read(columns=["uid", "key", "status", "caption"] + sizes)
        successes = store.read_json(stats_url).get("successes")
    except FileNotFoundError as err:
        return None, f"missing {err.filename or parquet}"
    except Exception as err:  # noqa: BLE001 - an unreadable sidecar is one more reason to read the tar
        return None, f"{parquet} unreadable ({type(err).__name__}: {err})"
    table = table.filter(pc.equal(table.column("status"), "success"))
    if successes is None or int(successes) != table.num_rows:
        return None, f"{parquet} has {table.num_rows} success rows, {stats_url} says successes={successes}"
    if table.column("key").null_count:
        return None, f"{parquet}: success rows without a key"
    return table, None


def _sidecar_rows(table, shard: int, rows: dict[str, list], skips: list) -> None:
    """The usable samples and skip records of a shard from its sidecar rows, as the tar reader
    gives them for img2dataset's successes: caption stripped (empty: ``missing_caption``), a
    uid that is no non-empty string ``no_uid``, a uid repeated in the shard ``duplicate_uid``."""
    from ..formats.webdataset import MISSING_CAPTION

    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    seen: set[str] = set()
    for i, key in enumerate(cols["key"]):
        uid = cols["uid"][i]
        uid = uid if isinstance(uid, str) and uid else ""
        caption = (cols["caption"][i] or "").strip()
        if not caption:
            skips.append((shard, i, key, uid, MISSING_CAPTION))
            continue
        if not uid:
            skips.append((shard, i, key, "", NO_UID))
            continue
        if uid in seen:
            skips.append((shard, i, key, uid, DUPLICATE_UID))
            continue
        seen.add(uid)
        size = json_original_size({c: cols[c][i] for c in ("original_width", "original_height") if c in cols})
        width, height = size or (None, None)
        for name, value in (("uid", uid), ("shard", shard), ("position", i), ("key", key), ("caption", caption),
                            ("original_width", width), ("original_height", height)):
            rows[name].append(value)


def samples_task(store: Store, cfg: JobConfig, urls: list[str], lo: int, hi: int, n_buckets: int,
                 out_url: str) -> None:
    """Stream input shards lo..hi-1 (the embed stage's reader: same samples, skips and uids; or,
    with ``use_sidecar``, img2dataset's parquet beside the tar when it agrees with its stats:
    :func:`read_sidecar`) and write their usable samples bucketed by uid, per shard the count,
    where it was read from and the bytes read, and the skipped samples' records with one bucket
    per shard (so a parts task reads only its shard's)."""
    import pyarrow as pa

    writer = BucketedWriter(_samples_schema(), n_buckets)
    skips_writer = BucketedWriter(_skips_schema(), hi - lo)
    counts = {}
    for shard in range(lo, hi):
        url = urls[shard]
        skips: list[tuple[int, int, str, str, str]] = []
        rows: dict[str, list] = {name: [] for name in _samples_schema().names}
        sidecar, why = read_sidecar(store, url) if cfg.embed.precomputed.use_sidecar else (None, "use_sidecar: false")
        if sidecar is not None:
            _sidecar_rows(sidecar, shard, rows, skips)
            table = pa.table(rows, schema=_samples_schema())
            writer.add_by_uid(table)
            skips_writer.add(_skips_table(skips), np.full(len(skips), shard - lo, np.int64))
            counts[str(shard)] = {"usable": table.num_rows, "read": "sidecar",
                                  "bytes_read": sum(store.size(u) for u in sidecar_urls(url))}
            continue
        for sample in iter_shard_samples(store, url, cfg.input, dedupe=True):
            if sample.problem is not None:
                skips.append((shard, sample.index, *skip_record(sample, cfg.input)))
                continue
            if not json_uid(sample, cfg.input):
                skips.append((shard, sample.index, *skip_record(sample, cfg.input, NO_UID)))
                continue
            width, height = json_original_size(sample.meta) or header_size(sample.image_bytes) or (None, None)
            for name, value in (("uid", sample.uid), ("shard", shard), ("position", sample.index),
                                ("key", sample.key), ("caption", sample.caption),
                                ("original_width", width), ("original_height", height)):
                rows[name].append(value)
        table = pa.table(rows, schema=_samples_schema())
        writer.add_by_uid(table)
        skips_writer.add(_skips_table(skips), np.full(len(skips), shard - lo, np.int64))
        counts[str(shard)] = {"usable": table.num_rows, "read": "tar", "sidecar_problem": why,
                              "bytes_read": store.size(url)}
    skips_writer.commit(store, skips_url(out_url))
    store.write_json(out_url[: -len(".bkt")] + ".json", counts)
    writer.commit(store, out_url)


def _metadata_schema(dim: int):
    import pyarrow as pa

    return pa.schema([("uid", pa.string()), ("file", pa.int32()), ("row", pa.int64()), ("clip_score", pa.float32()),
                      ("image_embedding", pa.list_(pa.float16(), dim)), ("text_embedding", pa.list_(pa.float16(), dim)),
                      ("ok", pa.bool_()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                      ("sha256", pa.string())])


def _normalised(arrays: dict[str, np.ndarray], keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The L2-normalised concatenation of `keys`' vectors (each key normalised, then the whole) and
    whether every key's vector was finite and non-zero."""
    pieces, ok = [], None
    for key in keys:
        vectors = arrays[key].astype(np.float32)
        norm = np.linalg.norm(vectors, axis=1)
        good = np.isfinite(norm) & (norm > 0)
        ok = good if ok is None else ok & good
        pieces.append(np.divide(vectors, norm[:, None], out=np.zeros_like(vectors), where=good[:, None]))
    joined = np.concatenate(pieces, axis=1) / np.sqrt(len(keys))
    joined[~ok] = 0
    return joined, ok


def metadata_task(store: Store, pc: PrecomputedConfig, file_index: int, parquet: str, npz: str, dim: int,
                  n_buckets: int, sizes_in_metadata: bool, out_url: str, sha256_in_metadata: bool = False) -> None:
    """Stream one metadata file in row chunks and write its rows bucketed by uid: the score (the
    cosine of the vectors where null), the normalised vectors as float16, and the ``sha256``
    (null where absent or not 64 hex digits; those counted)."""
    import pyarrow as pa

    image_keys, text_keys = keys_of(pc.image_key), keys_of(pc.text_key)
    columns = ["uid", pc.score_column] + (["original_width", "original_height"] if sizes_in_metadata else []) \
        + (["sha256"] if sha256_in_metadata else [])
    writer = BucketedWriter(_metadata_schema(dim), n_buckets)
    position = 0
    without_uid = 0
    sha256_invalid = 0
    for batch, arrays in iter_metadata_chunks(store, parquet, npz, columns, _all_keys(pc), METADATA_CHUNK_ROWS):
        n = batch.num_rows
        uids = batch.column("uid").to_pylist()
        has_uid = np.array([u is not None and str(u) != "" for u in uids], dtype=bool)
        without_uid += int((~has_uid).sum())
        image, ok_image = _normalised(arrays, image_keys)
        text, ok_text = _normalised(arrays, text_keys)
        ok = ok_image & ok_text
        score = np.array(batch.column(pc.score_column).cast(pa.float64()).to_numpy(zero_copy_only=False))
        missing = ~np.isfinite(score)
        score[missing] = (image[missing] * text[missing]).sum(axis=1)
        sizes = {c: (batch.column(c).cast(pa.int32()) if sizes_in_metadata else pa.nulls(n, pa.int32()))
                 for c in ("original_width", "original_height")}
        digests, bad = valid_sha256(batch.column("sha256").to_pylist()) if sha256_in_metadata else ([None] * n, 0)
        sha256_invalid += bad
        table = pa.table({
            "uid": pa.array([str(u) if h else "" for u, h in zip(uids, has_uid)], pa.string()),
            "file": pa.array(np.full(n, file_index, np.int32)),
            "row": pa.array(np.arange(position, position + n, dtype=np.int64)),
            "clip_score": pa.array(score.astype(np.float32)),
            "image_embedding": fixed_size_list(image, np.float16),
            "text_embedding": fixed_size_list(text, np.float16),
            "ok": pa.array(ok),
            **sizes,
            "sha256": pa.array(digests, pa.string()),
        })
        keep = np.flatnonzero(has_uid)
        table = table.take(keep)
        writer.add_by_uid(table)
        position += n
    store.write_json(out_url[: -len(".bkt")] + ".json", {"rows": position, "without_uid": without_uid,
                                                         "sha256_invalid": sha256_invalid,
                                                         "bytes_read": store.size(parquet) + store.size(npz)})
    writer.commit(store, out_url)


# -- step 2: one bucket joined --------------------------------------------------------------------

def _first_per_uid(uids, order_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by `order_keys` (most significant first); for each row in that order whether it
    is the first of its uid."""
    import pandas as pd

    order = np.lexsort(tuple(reversed(order_keys))) if len(uids) else np.zeros(0, np.int64)
    first = ~pd.Series(np.asarray(uids, dtype=object)[order]).duplicated(keep="first").to_numpy()
    return order, first


def join_task(store: Store, join_dir: str, bucket: int, sample_files: list[str], metadata_files_: list[str],
              group_of_shard: list[int]) -> None:
    """Join bucket `bucket` of both sides by uid; write the kept rows and the skip counts, each
    bucketed by shard group, then the bucket's own counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    samples = gather_bucket(store, sample_files, bucket).combine_chunks()
    meta = gather_bucket(store, metadata_files_, bucket)  # vectors: no copy

    s_uid = samples.column("uid").to_numpy(zero_copy_only=False)
    s_shard = samples.column("shard").to_numpy()
    s_order, s_first = _first_per_uid(s_uid, [s_shard, samples.column("position").to_numpy()])
    m_uid = meta.column("uid").to_numpy(zero_copy_only=False)
    m_order, m_first = _first_per_uid(m_uid, [meta.column("file").to_numpy(), meta.column("row").to_numpy()])

    winners = s_order[s_first]
    meta_rows = m_order[m_first]
    where = uid_positions(m_uid[meta_rows], s_uid[winners])  # -1: no metadata row
    matched = where >= 0
    meta_of = np.where(matched, meta_rows[np.maximum(where, 0)], -1)
    ok = np.zeros(len(winners), bool)
    ok[matched] = meta.column("ok").to_numpy(zero_copy_only=False)[meta_of[matched]]

    s_position = samples.column("position").to_numpy()
    s_key = samples.column("key").to_numpy(zero_copy_only=False)
    skipped = _skips_table([(int(s_shard[r]), int(s_position[r]), s_key[r], s_uid[r], reason)
                            for rows_, reason in ((s_order[~s_first], DUPLICATE_UID), (winners[~matched], NO_EMBEDDING),
                                                  (winners[matched & ~ok], BAD_EMBEDDING))
                            for r in rows_.tolist()])
    groups = np.asarray(group_of_shard, np.int64)
    n_groups = int(groups.max()) + 1
    skipped_writer = BucketedWriter(skipped.schema, n_groups)
    skipped_writer.add(skipped, groups[skipped.column("shard").to_numpy()] if skipped.num_rows else np.zeros(0, np.int64))
    skipped_writer.commit(store, join(join_dir, f"skipped-{bucket:05d}.bkt"))

    keep = winners[ok]
    rows = meta_of[ok]
    kept_meta = meta.take(pa.array(rows, pa.int64()))
    kept = samples.take(pa.array(keep, pa.int64()))
    # the json's (or the image header's) size, else the metadata's
    sizes = {c: pc.coalesce(kept.column(c), kept_meta.column(c)) for c in ("original_width", "original_height")}
    table = pa.table({
        "shard": kept.column("shard"), "position": kept.column("position"), "uid": kept.column("uid"),
        "key": kept.column("key"), "clip_score": kept_meta.column("clip_score"),
        "image_embedding": kept_meta.column("image_embedding"), "text_embedding": kept_meta.column("text_embedding"),
        "caption": kept.column("caption"), **sizes, "sha256": kept_meta.column("sha256"),
    })
    writer = BucketedWriter(table.schema, n_groups)
    writer.add(table, groups[table.column("shard").to_numpy()] if table.num_rows else np.zeros(0, np.int64))
    store.write_json(join(join_dir, f"joined-{bucket:05d}.json"), {
        "not_in_shards": int(len(meta_rows) - matched.sum()),
        "metadata_duplicate_uid": int((~m_first).sum()),
    })
    writer.commit(store, join(join_dir, f"joined-{bucket:05d}.bkt"))


# -- step 3: the parts of one shard group ---------------------------------------------------------

def _bucket_task_resources(bucket_rows: int, dim: int) -> Resources:
    """A join or parts task: one CPU, and the memory of a bucket's rows (1.2: hash imbalance)
    times the copies it makes, besides the worker's own."""
    row_bytes = 2 * dim * 2 + 256  # two float16 vectors, uid, key, caption
    return Resources(cpus=1, memory=TASK_BASE_MEMORY + BUCKET_COPIES * int(bucket_rows * 1.2) * row_bytes)


def _bucket_files(join_dir: str, prefix: str, n_buckets: int) -> list[str]:
    """The join tasks' files of one kind (``joined``, ``skipped``), one per uid bucket."""
    return [join(join_dir, f"{prefix}-{b:05d}.bkt") for b in range(n_buckets)]


def parts_task(store: Store, directory: str, join_dir: str, group: int, urls: list[str], shards: list[int],
               tar_skips: dict[str, tuple[str, int]], n_buckets: int, dim: int) -> dict[int, dict[str, Any]]:
    """Commit the parts of `shards` (pending shards of shard group `group`) from the group's rows
    of every joined bucket, and their skip records from the group's skipped rows of every bucket
    and (`tar_skips`: shard -> (file, bucket)) the reader's; returns each part's stats."""
    import pyarrow as pa

    kept = gather_bucket(store, _bucket_files(join_dir, "joined", n_buckets), group).combine_chunks()
    skipped = gather_bucket(store, _bucket_files(join_dir, "skipped", n_buckets), group).combine_chunks()
    shard_col = kept.column("shard").to_numpy()
    order = np.lexsort((kept.column("position").to_numpy(), shard_col)) if kept.num_rows else np.zeros(0, np.int64)
    kept = kept.take(pa.array(order, pa.int64()))
    shard_col = shard_col[order]
    join_skips: dict[int, list[tuple[int, str, str, str]]] = {}
    for shard, *record in zip(*(skipped.column(c).to_pylist() for c in ("shard", "position", "key", "uid", "reason"))):
        join_skips.setdefault(shard, []).append(tuple(record))
    out = {}
    for shard in shards:
        lo, hi = np.searchsorted(shard_col, [shard, shard + 1])
        rows = kept.slice(int(lo), int(hi - lo))
        image = fixed_list_to_numpy(rows.column("image_embedding"), "image_embedding", join_dir) if rows.num_rows \
            else np.zeros((0, dim), np.float16)
        text = fixed_list_to_numpy(rows.column("text_embedding"), "text_embedding", join_dir) if rows.num_rows \
            else np.zeros((0, dim), np.float16)
        table = part_table(urls[shard], rows.column("uid").to_pylist(), rows.column("key").to_pylist(),
                           rows.column("clip_score").to_numpy(), image, text, rows.column("caption").to_pylist(),
                           rows.column("original_width"), rows.column("original_height"), rows.column("sha256"))
        skips_file, bucket = tar_skips[str(shard)]
        reader_skips = read_bucket(store, skips_file, bucket)
        records = list(zip(*(reader_skips.column(c).to_pylist() for c in ("position", "key", "uid", "reason"))))
        records += join_skips.get(shard, [])
        records.sort(key=lambda r: r[0])  # shard order (positions are unique within a shard)
        out[shard] = commit_part(store, directory, shard, urls[shard], table, [r[1:] for r in records])
    return out


# -- the driver -----------------------------------------------------------------------------------

def _reader_skips(task_starts: list[int], sample_urls: list[str], shard: int) -> tuple[str, int]:
    """(file, bucket) of input shard `shard`'s reader skip records (:func:`samples_task`);
    `task_starts`: the first shard of each samples task, ascending."""
    task = bisect.bisect_right(task_starts, shard) - 1
    return skips_url(sample_urls[task]), shard - task_starts[task]


def run_precomputed(cfg: JobConfig, store: Store, directory: str, urls: list[str], pending: list[int],
                    on_part_committed) -> tuple[dict[str, Any], dict[int, dict[str, Any]], int]:
    """Join the metadata to the input shards and commit the parts of `pending` shards (module
    docstring). Returns the stage info, the stats of the parts committed now, and the width."""
    import ray

    pc = cfg.embed.precomputed
    join_dir = join(directory, JOIN_DIR)
    info_url = join(directory, INFO)
    if not pending and store.exists(info_url):  # every part and the join's counts are committed
        store.rm(join_dir, recursive=True)
        return store.read_json(info_url), {}, None
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = _plan(cfg, store, join_dir, len(urls))
    n_buckets, dim, files = plan["buckets"], plan["dim"], plan["files"]

    # step 1: both sides bucketed by uid, side by side
    sample_urls = [join(join_dir, f"samples-{t:05d}.bkt") for t in range(len(plan["shard_tasks"]))]
    meta_urls = [join(join_dir, f"metadata-{m:05d}.bkt") for m in range(len(files))]
    urls_ref = ray.put(urls)  # O(shards) names: shipped once, not once per task
    log.info("precomputed join: %d metadata file(s), %d bucket(s), %d shard task(s)",
             len(files), n_buckets, len(sample_urls))
    samples = Step("embed.join.samples", samples_task,
                   [(store, cfg, urls_ref, lo, hi, n_buckets, url)
                    for (lo, hi), url in zip(plan["shard_tasks"], sample_urls)],
                   outputs=sample_urls, unit="shard tasks")
    metadata = Step("embed.join.metadata", metadata_task,
                    [(store, pc, m, parquet, npz, dim, n_buckets, plan["sizes_in_metadata"], url,
                      plan["sha256_in_metadata"])
                     for m, ((parquet, npz, _), url) in enumerate(zip(files, meta_urls))],
                    outputs=meta_urls, unit="metadata files")
    for side in [start_step(samples, store), start_step(metadata, store)]:
        side.wait()
    seconds["bucket_by_uid"] = round(time.perf_counter() - t0, 3)

    counts: dict[str, dict[str, Any]] = {}
    for url in sample_urls:
        counts.update(store.read_json(url[: -len(".bkt")] + ".json"))
    usable = [int(counts[str(i)]["usable"]) for i in range(len(urls))]
    groups_url = join(join_dir, "groups.json")
    if store.exists(groups_url):
        groups = store.read_json(groups_url)
    else:
        # consecutive shards [lo, hi) of at most bucket_rows usable samples (a larger shard alone)
        groups = [[lo, hi] for lo, hi in consecutive_runs(usable, plan["bucket_rows"])]
        store.write_json(groups_url, groups)
    group_of_shard = [g for g, (lo, hi) in enumerate(groups) for _ in range(lo, hi)]

    # step 2: one task per bucket
    t1 = time.perf_counter()
    bucket_task = _bucket_task_resources(plan["bucket_rows"], dim)
    groups_ref = ray.put(group_of_shard)
    run_step(Step("embed.join", join_task, [(store, join_dir, b, sample_urls, meta_urls, groups_ref)
                                            for b in range(n_buckets)],
                  outputs=_bucket_files(join_dir, "joined", n_buckets), resources=bucket_task, unit="buckets"), store)
    seconds["join"] = round(time.perf_counter() - t1, 3)

    # step 3: one task per shard group with pending parts, each committing its parts in shard order
    t2 = time.perf_counter()
    todo = set(pending)
    task_starts = [lo for lo, _ in plan["shard_tasks"]]
    calls = []
    for g, (lo, hi) in enumerate(groups):
        shards = [i for i in range(lo, hi) if i in todo]
        if shards:
            tar_skips = {str(i): _reader_skips(task_starts, sample_urls, i) for i in shards}
            calls.append((store, directory, join_dir, g, urls_ref, shards, tar_skips, n_buckets, dim))
    new_stats: dict[int, dict[str, Any]] = {}

    def committed(_: int, done: dict[int, dict[str, Any]]) -> None:
        for shard, stats in sorted(done.items()):
            new_stats[int(shard)] = stats
            on_part_committed(int(shard))

    run_step(Step("embed.parts", parts_task, calls, resources=bucket_task, on_result=committed, unit="shard groups"),
             store)
    seconds["parts"] = round(time.perf_counter() - t2, 3)

    totals: Counter = Counter()
    metadata_without_uid = sha256_invalid = metadata_bytes = 0
    for b in range(n_buckets):
        totals.update(store.read_json(join(join_dir, f"joined-{b:05d}.json")))
    for url in meta_urls:
        counted = store.read_json(url[: -len(".bkt")] + ".json")
        metadata_without_uid += counted["without_uid"]
        sha256_invalid += counted["sha256_invalid"]
        metadata_bytes += counted["bytes_read"]
    read_from = Counter(c["read"] for c in counts.values())
    sidecar_problems = [f"{urls[int(i)]}: {c['sidecar_problem']}" for i, c in sorted(counts.items(), key=lambda x: int(x[0]))
                        if c["read"] == "tar"]
    info = {
        "encoder": "precomputed",
        "model": f"precomputed:{'+'.join(keys_of(pc.image_key))}/{'+'.join(keys_of(pc.text_key))}",
        "pretrained": None, "device": "none", "precision": "as stored",
        "score_column": pc.score_column,
        "metadata_files": len(files),
        "metadata_rows": sum(rows for _, _, rows in files),
        "not_in_shards": int(totals["not_in_shards"]),
        "metadata_duplicate_uid": int(totals["metadata_duplicate_uid"]),
        "metadata_without_uid": int(metadata_without_uid),
        "sha256_invalid": int(sha256_invalid),
        "shards_read_from": {"sidecar": read_from["sidecar"], "tar": read_from["tar"]},
        "sidecar_problems": sidecar_problems[:20],
        "join": {"buckets": n_buckets, "shard_groups": len(groups), "seconds": seconds,
                 "bytes_read": {"shards": sum(c["bytes_read"] for c in counts.values()), "metadata": metadata_bytes}},
    }
    if read_from["tar"] and pc.use_sidecar:
        log.warning("precomputed join: %d of %d shards read from their tar (no usable img2dataset sidecar), e.g. %s",
                    read_from["tar"], len(urls), sidecar_problems[0])
    store.write_json(info_url, info)  # the join's counts outlive _join/ (a resume after this point reads them)
    store.rm(join_dir, recursive=True)
    log.info("precomputed join: %d metadata rows, %d not in the shards (failed downloads), %d repeated, %d without uid",
             info["metadata_rows"], info["not_in_shards"], info["metadata_duplicate_uid"], metadata_without_uid)
    return info, new_stats, dim


def verify_precomputed_inputs(cfg: JobConfig, store: Store) -> None:
    """Every metadata file found and usable (before any work: a wrong path fails in seconds)."""
    inspect_inputs(cfg, store)
