"""The write stage of a metadata-only job: the kept rows' metadata, ready to download.

``OUTPUT/metadata/part-NNNNN.parquet``, one file per embedding part with kept rows (NNNNN: the
part; a part is a row range of one metadata file, :mod:`pipeline.embed.metadata_only`), rows in
metadata order, columns :data:`COLUMNS` (+ ``id``, the id column's value, when the pool is not
keyed by DataComp uids)::

    img2dataset --url_list OUTPUT/metadata --input_format parquet --url_col url --caption_col text \\
        --save_additional_columns '["uid"]' --output_format webdataset ...

The rows come from the write plan (:mod:`.plan`: the selection joined by uid with the parts,
in source order) and the metadata files themselves (url, caption, sizes, sha256 of exactly the
planned rows: only the row groups holding them are read). A file is committed atomically; a
rerun writes only the missing ones. Integrity: the files hold as many rows as the selection,
with the same uid hash sum (else an error naming the counts).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..config import JobConfig
from ..embed.metadata_only import caption_column, id_column
from ..formats.datacomp import valid_sha256
from ..formats.buckets import hash_sum
from ..storage import Store, join
from ..workdir import WRITE, stage_dir
from .plan import PLAN_DIR, build_plan, piece_url

log = logging.getLogger(__name__)

METADATA_DIR = "metadata"
COLUMNS = ("uid", "url", "text", "original_width", "original_height", "sha256", "clip_score", "rank")


def metadata_url(output_url: str, part: str) -> str:
    return join(output_url, METADATA_DIR, part + ".parquet")


def _read_rows(store: Store, parquet: str, rows: np.ndarray, columns: list[str]):
    """`columns` of metadata file `parquet` at `rows` (ascending), reading only their row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with store.open(parquet, "rb") as fh:
        pf = pq.ParquetFile(fh)
        sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = sorted(set((np.searchsorted(starts, rows, side="right") - 1).tolist()))
        table = pf.read_row_groups(groups, columns=columns)
    first = np.concatenate([[0], np.cumsum(sizes[groups])])[:-1]
    local = np.empty(len(rows), np.int64)
    offset_of = dict(zip(groups, first.tolist()))
    group_of = np.searchsorted(starts, rows, side="right") - 1
    for g in groups:
        mask = group_of == g
        local[mask] = rows[mask] - starts[g] + offset_of[g]
    return table.take(pa.array(local)), int(sum(pf.metadata.row_group(g).total_byte_size for g in groups))


def metadata_task(store: Store, cfg: JobConfig, part: str) -> dict[str, Any]:
    """Write ``OUTPUT/metadata/<part>.parquet`` from the plan piece of embedding part `part`."""
    import pyarrow as pa

    pc = cfg.embed.precomputed
    piece = store.read_parquet(piece_url(join(stage_dir(cfg.workdir, WRITE), PLAN_DIR), part))
    sources = set(piece.column("source_shard").unique().to_pylist())
    if len(sources) != 1:
        raise RuntimeError(f"plan piece {part} names {len(sources)} metadata files")
    parquet = sources.pop()
    rows = np.array([int(k) for k in piece.column("source_key").to_pylist()], np.int64)
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise RuntimeError(f"plan piece {part}: rows not in metadata order")
    ident, caption = id_column(pc), caption_column(pc)
    wanted = list(dict.fromkeys([ident, pc.url_column, caption]))
    with store.open(parquet, "rb") as fh:
        import pyarrow.parquet as pq

        names = pq.ParquetFile(fh).schema_arrow.names
    optional = [c for c in ("original_width", "original_height", "sha256") if c in names]
    meta, read = _read_rows(store, parquet, rows, wanted + optional)
    n = piece.num_rows
    digests = valid_sha256(meta.column("sha256").to_pylist())[0] if "sha256" in optional else [None] * n
    columns = {
        "uid": piece.column("uid"),
        "url": meta.column(pc.url_column).cast(pa.string()),
        "text": meta.column(caption).cast(pa.string()),
        **{c: (meta.column(c).cast(pa.int64()) if c in optional else pa.nulls(n, pa.int64()))
           for c in ("original_width", "original_height")},
        "sha256": pa.array(digests, pa.string()),
        "clip_score": piece.column("clip_score"),
        "rank": piece.column("rank"),
    }
    if ident != "uid":
        columns["id"] = meta.column(ident).cast(pa.string())
    table = pa.table(columns)
    url = metadata_url(cfg.output.url, part)
    store.write_parquet(url, table)
    return {"part": part, "rows": n, "hash_sum": str(hash_sum(table.column("uid"))),
            "bytes_read": read + int(piece.nbytes), "bytes_written": int(store.size(url))}


def write_metadata(cfg: JobConfig, store: Store) -> dict[str, Any]:
    """The metadata files of the kept rows (module docstring); the stage's stats."""
    from ..steps import Step, run_step

    started = time.perf_counter()
    plan = build_plan(store, cfg)
    parts = [name for name, count in zip(plan["parts"], plan["selected_per_part"]) if count]
    urls = [metadata_url(cfg.output.url, p) for p in parts]
    todo = [i for i, u in enumerate(urls) if not store.exists(u)]
    results = run_step(Step("write.metadata", metadata_task, [(store, cfg, p) for p in parts], outputs=urls,
                            unit="metadata files"), store)
    io = {"bytes_read": sum(r["bytes_read"] for r in results if r),
          "bytes_written": sum(r["bytes_written"] for r in results if r)}
    # the integrity check reads every file's uids back (one column; a task's worth per file)
    rows, total = 0, 0
    for url in urls:
        uids = store.read_parquet(url, columns=["uid"]).column("uid")
        rows += len(uids)
        total = (total + hash_sum(uids)) % 2**64
    if rows != plan["samples"] or str(total) != plan["hash_sum"]:
        raise RuntimeError(f"integrity check failed in {join(cfg.output.url, METADATA_DIR)}: {rows} rows with uid "
                           f"hash sum {total}, the selection {plan['samples']} with {plan['hash_sum']}")
    log.info("write stage (metadata-only): %d kept rows in %d files under %s", rows, len(urls),
             join(cfg.output.url, METADATA_DIR))
    return {"output_url": cfg.output.url, "metadata_url": join(cfg.output.url, METADATA_DIR),
            "metadata_files": len(urls), "files": [p + ".parquet" for p in parts], "samples_written": rows,
            "files_written_this_run": len(todo), "output_shards": 0,
            "integrity": "ok: every selected uid written exactly once", "io": io,
            "seconds": round(time.perf_counter() - started, 3)}
