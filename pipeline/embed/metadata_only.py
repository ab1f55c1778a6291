"""The embed stage without input shards ("filter before you download"): the pool is the rows of
the precomputed metadata, DataComp's (parquet + npz, :mod:`~pipeline.formats.datacomp`) or a
LAION / clip-retrieval embedding folder (:mod:`~pipeline.formats.laion`).

**Parts.** A part is a fixed row range of one metadata file (``embed.precomputed.part_rows``
rows; the last range of a file may be shorter), numbered over the files in name (laion: index)
order, so node = part offset + position among the part's kept rows, as for shard parts. A part's
``shard`` column is the metadata file's URL and ``key`` is the row number in that file (decimal,
no padding): the identity the skip records and ``decisions.parquet`` carry for a metadata row.

**Identity.** A sample is identified by ``embed.precomputed.id_column`` (``uid`` for DataComp,
``url`` for laion): a value of 32 hex digits is the uid as it is; any other value becomes the md5
of its UTF-8 text (DataComp's own uid is the md5 of the url, so a laion pool keyed by url gets the
uids DataComp would give it). ``subset.npy`` and every output carry that uid; the write stage's
``OUTPUT/metadata`` keeps the id value beside it (``id``) to map back.

Why not the shard join of :mod:`.precomputed`: no sample side, and the uid-duplicate check needs
only the uids, so the vectors are read once and written once (into the parts), never bucketed.
Steps, under ``WORKDIR/embeddings/_meta/`` (every file committed atomically; a rerun skips what
exists, ``../metadata_only.json`` holds the counts once the parts are committed)::

    plan.json               files, rows, width, columns found, part ranges (fixed by the first run)
    uids-FFFFF.bkt / .json  (1) per metadata file: (uid, file, row) of its rows that have an id,
                                bucketed by uid; rows and rows without id
    repeated-BBBBB.bkt      (2) per uid bucket: the rows whose uid an earlier row (file, row order)
                                already has, bucketed by file; .json: their count
    part-NNNNN.*            (3) per metadata file: its rows streamed once (vectors L2-normalised,
                                the score, caption, sizes, sha256), committed part by part
                                (:func:`~.parts.commit_part`) with skip records ``no_uid``,
                                ``duplicate_uid`` (the first row of a uid wins), ``bad_embedding``

A task holds one uid bucket (~60 bytes a row) or one chunk of one file; the driver holds file
names and counts. Every task returns the bytes it read and wrote; the sums per step are in
``_stats.json`` (``io``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import Counter
from typing import Any

import numpy as np

from ..config import JobConfig, PrecomputedConfig, output_settings
from ..formats.buckets import BucketedWriter, gather_bucket
from ..formats.datacomp import MetadataError, inspect_all, iter_metadata_chunks, metadata_files, valid_sha256
from ..formats.embeddings import part_table
from ..formats.laion import IMAGE_KEY, TEXT_KEY, inspect_laion_all, iter_laion_chunks, laion_files
from ..formats.webdataset import DUPLICATE_UID
from ..runtime import init_ray
from ..stage import StageContext
from ..steps import Resources, Step, run_step
from ..storage import Store, join
from ..workdir import EMBED, part_name, stage_dir
from .parts import commit_part, committed_indices
from .precomputed import (
    BAD_EMBEDDING,
    METADATA_CHUNK_ROWS,
    NO_UID,
    _all_keys,
    _first_per_uid,
    _normalised,
    keys_of,
    resumed_plan,
)

log = logging.getLogger(__name__)

META_DIR = "_meta"
INFO = "metadata_only.json"
LAYOUT = 1  # of the _meta/ files; a resume never mixes two
UID_BUCKET_ROWS = 2_000_000  # (uid, file, row) rows per bucket of step 2: ~150 MB in a task
TASK_MEMORY = 800 * 2**20  # a parts task: the worker, one chunk, one part's rows (measured < 0.7 GB at 768-d)
SHA256_INVALID = "sha256_invalid"  # a metadata sha256 that is not 64 hex digits (stored as null)
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


def is_metadata_only(cfg: JobConfig) -> bool:
    return cfg.input.shards is None


def id_column(pc: PrecomputedConfig) -> str:
    return pc.id_column or ("url" if pc.layout == "laion" else "uid")


def caption_column(pc: PrecomputedConfig) -> str:
    return pc.caption_column or ("caption" if pc.layout == "laion" else "text")


def uid_of(value: Any) -> str:
    """The uid of an id value ("" for none): 32 hex digits as they are, else md5 of the text."""
    if value is None:
        return ""
    text = str(value)
    if not text:
        return ""
    return text if _HEX32.match(text) else hashlib.md5(text.encode("utf-8")).hexdigest()


# -- the inputs -----------------------------------------------------------------------------------

def inspect_sources(cfg: JobConfig, store: Store) -> dict[str, Any]:
    """Every metadata file found and checked (footers, array headers, columns) before any work:
    files as [parquet, [vector files], rows], the width, and which optional columns exist."""
    pc = cfg.embed.precomputed
    if pc.layout == "laion":
        infos = inspect_laion_all(store, laion_files(store, pc.metadata))
        files = [[i.parquet, [i.image, i.text], i.rows] for i in infos]
        columns, dim = set(infos[0].columns), infos[0].dim
    else:
        infos = inspect_all(store, metadata_files(store, pc.metadata, pc.embeddings), _all_keys(pc))
        files = [[i.parquet, [i.npz], i.rows] for i in infos]
        columns = set(infos[0].columns)
        dim = sum(infos[0].dims[k] for k in keys_of(pc.image_key))
        text_dim = sum(infos[0].dims[k] for k in keys_of(pc.text_key))
        if dim != text_dim:
            raise MetadataError(f"image vectors ({pc.image_key}: {dim}) and text vectors ({pc.text_key}: {text_dim}) "
                                "differ in width; choose keys of the same model")
    first = files[0][0]
    needed = {"embed.precomputed.id_column": id_column(pc), "embed.precomputed.url_column": pc.url_column,
              "embed.precomputed.caption_column": caption_column(pc)}
    absent = [f"{field} {name!r}" for field, name in needed.items() if name not in columns]
    if absent:
        raise MetadataError(f"{first} has no column {', '.join(absent)} (columns: {sorted(columns)})")
    has_score = pc.score_column in columns
    if not has_score and pc.layout != "laion":
        raise MetadataError(f"embed.precomputed.score_column {pc.score_column!r} is not a column of {first} "
                            f"(columns: {sorted(columns)})")
    return {"files": files, "dim": int(dim), "score": pc.score_column if has_score else None,
            "sizes": all(c in columns for c in ("original_width", "original_height")),
            "sha256": "sha256" in columns}


def _chunks(store: Store, pc: PrecomputedConfig, entry: list, columns: list[str]):
    """(batch, arrays, image keys, text keys) per chunk of one metadata file."""
    parquet, vectors, _ = entry
    if pc.layout == "laion":
        for batch, arrays in iter_laion_chunks(store, parquet, vectors[0], vectors[1], columns, METADATA_CHUNK_ROWS):
            yield batch, arrays, [IMAGE_KEY], [TEXT_KEY]
    else:
        for batch, arrays in iter_metadata_chunks(store, parquet, vectors[0], columns, _all_keys(pc), METADATA_CHUNK_ROWS):
            yield batch, arrays, keys_of(pc.image_key), keys_of(pc.text_key)


def _size(store: Store, url: str) -> int:
    return int(store.size(url))


def _plan(cfg: JobConfig, store: Store, meta_dir: str) -> dict[str, Any]:
    resumed = resumed_plan(store, meta_dir, LAYOUT)
    if resumed is not None:
        return resumed
    plan = inspect_sources(cfg, store)
    rows_per_part = cfg.embed.precomputed.part_rows
    parts = []
    for f, (_, _, rows) in enumerate(plan["files"]):
        for lo in range(0, max(rows, 1), rows_per_part):
            parts.append([f, lo, min(lo + rows_per_part, rows)])
    total = sum(rows for _, _, rows in plan["files"])
    plan.update(layout=LAYOUT, parts=parts, buckets=max(1, math.ceil(total / UID_BUCKET_ROWS)))
    store.write_json(join(meta_dir, "plan.json"), plan)
    return plan


# -- step 1: uids bucketed -------------------------------------------------------------------------

def _uid_schema():
    import pyarrow as pa

    return pa.schema([("uid", pa.string()), ("file", pa.int32()), ("row", pa.int64())])


def uids_task(store: Store, pc: PrecomputedConfig, f: int, parquet: str, n_buckets: int, out_url: str) -> dict:
    """The uid of every row of metadata file `f` that has one, bucketed by uid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = BucketedWriter(_uid_schema(), n_buckets)
    position = without = 0
    with store.open(parquet, "rb") as fh:
        pf = pq.ParquetFile(fh)
        read = sum(chunk.total_compressed_size for g in range(pf.metadata.num_row_groups)
                   for chunk in (pf.metadata.row_group(g).column(c) for c in range(pf.metadata.num_columns))
                   if chunk.path_in_schema == id_column(pc))
        for batch in pf.iter_batches(batch_size=1 << 18, columns=[id_column(pc)]):
            uids = [uid_of(v) for v in batch.column(0).to_pylist()]
            has = np.array([bool(u) for u in uids], bool)
            without += int((~has).sum())
            rows = np.arange(position, position + batch.num_rows, dtype=np.int64)[has]
            table = pa.table({"uid": pa.array([u for u in uids if u], pa.string()),
                              "file": pa.array(np.full(len(rows), f, np.int32)), "row": pa.array(rows)},
                             schema=_uid_schema())
            writer.add_by_uid(table)
            position += batch.num_rows
    store.write_json(out_url[: -len(".bkt")] + ".json", {"rows": position, "without_uid": without})
    written = writer.commit(store, out_url)
    return {"bytes_read": int(read), "bytes_written": int(written)}  # the id column's chunks, not the file


# -- step 2: the first row of each uid -------------------------------------------------------------

def repeated_task(store: Store, meta_dir: str, bucket: int, uid_files: list[str], n_files: int, out_url: str) -> dict:
    """Rows of uid bucket `bucket` whose uid an earlier row (file, row order) has, bucketed by file."""
    import pyarrow as pa

    table = gather_bucket(store, uid_files, bucket).combine_chunks()
    uids = table.column("uid").to_numpy(zero_copy_only=False)
    order, first = _first_per_uid(uids, [table.column("file").to_numpy(), table.column("row").to_numpy()])
    later = table.take(pa.array(order[~first], pa.int64()))
    writer = BucketedWriter(later.schema, n_files)
    writer.add(later, later.column("file").to_numpy().astype(np.int64))
    store.write_json(out_url[: -len(".bkt")] + ".json", {"repeated": later.num_rows})
    written = writer.commit(store, out_url)
    return {"bytes_read": int(table.nbytes), "bytes_written": int(written)}


# -- step 3: the parts of one metadata file --------------------------------------------------------

def parts_task(store: Store, pc: PrecomputedConfig, directory: str, f: int, entry: list,
               parts: list[tuple[int, int, int]], repeated_files: list[str], score: str | None, sizes: bool,
               sha256: bool, dim: int) -> dict:
    """Stream metadata file `f` once and commit its parts (`parts`: (index, lo, hi) row ranges,
    ascending); parts already committed are not written again. Returns each part's stats and the
    bytes read and written."""
    import pyarrow as pa

    parquet = entry[0]
    repeated = gather_bucket(store, repeated_files, f)
    repeated_rows = np.sort(repeated.column("row").to_numpy()) if repeated.num_rows else np.zeros(0, np.int64)
    columns = list(dict.fromkeys([id_column(pc), caption_column(pc)] + ([score] if score else [])
                                 + (["original_width", "original_height"] if sizes else [])
                                 + (["sha256"] if sha256 else [])))
    done = set(committed_indices(store, directory, parts[-1][0] + 1))
    out: dict[str, Any] = {"parts": {}, "sha256_invalid": 0, "bytes_written": 0,
                           "bytes_read": _size(store, parquet) + sum(_size(store, u) for u in entry[1])}
    rows: dict[str, list] = {}
    skips: list[tuple[str, str, str]] = []
    part_i = 0
    position = 0

    def commit(index: int) -> None:
        nonlocal rows, skips
        n = len(rows.get("uid", []))
        image = np.concatenate(rows["image"]) if n else np.zeros((0, dim), np.float16)
        text = np.concatenate(rows["text"]) if n else np.zeros((0, dim), np.float16)
        table = part_table(parquet, rows.get("uid", []), rows.get("key", []), np.asarray(rows.get("score", []), np.float32),
                           image, text, rows.get("caption", []), rows.get("width", []), rows.get("height", []),
                           rows.get("sha256", []))
        out["parts"][index] = commit_part(store, directory, index, parquet, table, skips)
        name = part_name(index)
        out["bytes_written"] += sum(_size(store, join(directory, name + s)) for s in (".parquet", ".stats.json"))
        rows, skips = {}, []

    def add(column: str, values) -> None:
        rows.setdefault(column, []).extend(values) if isinstance(values, list) else rows.setdefault(column, []).append(values)

    for batch, arrays, image_keys, text_keys in _chunks(store, pc, entry, columns):
        n = batch.num_rows
        row_ids = np.arange(position, position + n, dtype=np.int64)
        image, ok_image = _normalised(arrays, image_keys)
        text, ok_text = _normalised(arrays, text_keys)
        ok = ok_image & ok_text
        cosine = (image * text).sum(axis=1)
        if score:
            values = np.array(batch.column(score).cast(pa.float64()).to_numpy(zero_copy_only=False))
            values[~np.isfinite(values)] = cosine[~np.isfinite(values)]
        else:
            values = cosine
        uids = [uid_of(v) for v in batch.column(id_column(pc)).to_pylist()]
        captions = batch.column(caption_column(pc)).to_pylist()
        widths = batch.column("original_width").to_pylist() if sizes else [None] * n
        heights = batch.column("original_height").to_pylist() if sizes else [None] * n
        digests, bad = valid_sha256(batch.column("sha256").to_pylist()) if sha256 else ([None] * n, 0)
        where = np.searchsorted(repeated_rows, row_ids)
        is_repeated = (where < len(repeated_rows)) & (repeated_rows[np.minimum(where, len(repeated_rows) - 1)] == row_ids) \
            if len(repeated_rows) else np.zeros(n, bool)
        lo = 0
        while lo < n:
            index, _, hi_row = parts[part_i]
            hi = min(n, hi_row - position)
            if index not in done:
                for j in range(lo, hi):
                    key, uid = str(position + j), uids[j]
                    reason = NO_UID if not uid else DUPLICATE_UID if is_repeated[j] else None if ok[j] else BAD_EMBEDDING
                    if reason:
                        skips.append((key, uid, reason))
                        continue
                    add("uid", uid)
                    add("key", key)
                    add("score", float(values[j]))
                    add("caption", "" if captions[j] is None else str(captions[j]))
                    add("width", widths[j])
                    add("height", heights[j])
                    add("sha256", digests[j])
                kept = [j for j in range(lo, hi) if uids[j] and not is_repeated[j] and ok[j]]
                if kept:
                    rows.setdefault("image", []).append(image[kept].astype(np.float16))
                    rows.setdefault("text", []).append(text[kept].astype(np.float16))
            if position + hi == hi_row:
                if index not in done:
                    commit(index)
                part_i += 1
            lo = hi
        position += n
        out["sha256_invalid"] += bad
    while part_i < len(parts):  # an empty file's one empty part
        if parts[part_i][0] not in done:
            commit(parts[part_i][0])
        part_i += 1
    return out


# -- the stage ------------------------------------------------------------------------------------

def settings(cfg: JobConfig) -> dict[str, Any]:
    """What the parts depend on: the input's metadata and the precomputed settings, no model."""
    pc = cfg.embed.precomputed
    marked = [name for name, f in type(pc).model_fields.items()
              if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("metadata_only")]
    return {"mode": "metadata-only", "embed": output_settings(pc), "metadata_only": {n: getattr(pc, n) for n in marked}}


def check(cfg: JobConfig, store: Store) -> None:
    """Every metadata file usable (before any work: a wrong path or a short file fails in seconds)."""
    inspect_sources(cfg, store)


def _io(results: list, into: dict[str, int]) -> None:
    for r in results:
        if r:
            into["bytes_read"] += int(r["bytes_read"])
            into["bytes_written"] += int(r["bytes_written"])


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Commit the parts of every metadata file (module docstring); the stage's stats."""
    pc = cfg.embed.precomputed
    directory = stage_dir(cfg.workdir, EMBED)
    meta_dir = join(directory, META_DIR)
    info_url = join(directory, INFO)
    init_ray(cfg.ray)
    started = time.perf_counter()
    io: dict[str, dict[str, int]] = {s: {"bytes_read": 0, "bytes_written": 0} for s in ("uids", "repeated", "parts")}
    if store.exists(info_url):
        info = store.read_json(info_url)
        n_parts = info["parts"]
    else:
        plan = _plan(cfg, store, meta_dir)
        files, n_buckets, dim = plan["files"], plan["buckets"], plan["dim"]
        n_parts = len(plan["parts"])
        uid_urls = [join(meta_dir, f"uids-{f:05d}.bkt") for f in range(len(files))]
        rep_urls = [join(meta_dir, f"repeated-{b:05d}.bkt") for b in range(n_buckets)]
        log.info("metadata-only embed: %d metadata file(s), %d rows, %d part(s), %d uid bucket(s)", len(files),
                 sum(r for _, _, r in files), n_parts, n_buckets)
        seconds = {}
        t = time.perf_counter()
        _io(run_step(Step("embed.meta.uids", uids_task, [(store, pc, f, e[0], n_buckets, u)
                                                         for f, (e, u) in enumerate(zip(files, uid_urls))],
                          outputs=uid_urls, unit="metadata files"), store), io["uids"])
        seconds["uids"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        _io(run_step(Step("embed.meta.repeated", repeated_task, [(store, meta_dir, b, uid_urls, len(files), u)
                                                                 for b, u in enumerate(rep_urls)],
                          outputs=rep_urls, resources=Resources(cpus=1, memory=TASK_MEMORY), unit="uid buckets"),
                     store), io["repeated"])
        seconds["repeated"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        by_file: dict[int, list[tuple[int, int, int]]] = {}
        for index, (f, lo, hi) in enumerate(plan["parts"]):
            by_file.setdefault(f, []).append((index, lo, hi))
        invalid = 0

        def committed(_: int, result: dict) -> None:
            nonlocal invalid
            invalid += result["sha256_invalid"]
            for index in sorted(result["parts"]):
                ctx.part_committed(EMBED, int(index))

        calls = [(store, pc, directory, f, files[f], by_file[f], rep_urls, plan["score"], plan["sizes"], plan["sha256"],
                  dim) for f in range(len(files))]
        outputs = [join(directory, part_name(by_file[f][-1][0]) + ".parquet") for f in range(len(files))]
        _io(run_step(Step("embed.meta.parts", parts_task, calls, outputs=outputs, on_result=committed,
                          resources=Resources(cpus=1, memory=TASK_MEMORY), unit="metadata files"), store), io["parts"])
        seconds["parts"] = round(time.perf_counter() - t, 3)
        counts = [store.read_json(u[: -len(".bkt")] + ".json") for u in uid_urls]
        info = {
            "encoder": "precomputed", "input": "metadata-only", "layout": pc.layout,
            "model": f"precomputed:{pc.layout}" if pc.layout == "laion" else
                     f"precomputed:{'+'.join(keys_of(pc.image_key))}/{'+'.join(keys_of(pc.text_key))}",
            "pretrained": None, "device": "none", "precision": "as stored",
            "id_column": id_column(pc), "score_column": plan["score"] or "cosine of the image and text vectors",
            "metadata_files": len(files), "metadata_rows": sum(r for _, _, r in files),
            "metadata_duplicate_uid": sum(store.read_json(u[: -len(".bkt")] + ".json")["repeated"] for u in rep_urls),
            "metadata_without_uid": sum(c["without_uid"] for c in counts),
            SHA256_INVALID: invalid, "parts": n_parts, "part_rows": pc.part_rows, "embedding_dim": dim,
            "join": {"buckets": n_buckets, "seconds": seconds}, "io": io,
        }
        store.write_json(info_url, info)
        store.rm(meta_dir, recursive=True)
    per_part = {i: store.read_json(join(directory, part_name(i) + ".stats.json")) for i in range(n_parts)}
    skipped: Counter = Counter()
    for s in per_part.values():
        skipped.update(s["skipped"])
    samples = sum(s["samples"] for s in per_part.values())
    seconds = time.perf_counter() - started
    stats = {
        **info, "shards": 0, "samples": samples, "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()), "shards_missing": 0, "missing_shards": [], "shards_empty": 0,
        "seconds": round(seconds, 3),
        "per_shard": [{"part": part_name(i), **per_part[i]} for i in sorted(per_part)],
    }
    log.info("metadata-only embed: %d samples of %d metadata rows in %d parts; skipped: %s", samples,
             info["metadata_rows"], n_parts, ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()) or "none")
    return stats
