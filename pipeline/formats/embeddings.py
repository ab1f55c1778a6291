"""``WORKDIR/embeddings/part-NNNNN.parquet``: one part per input shard, written by the embed stage.

Schema (column order and types are part of the contract)::

    uid              string   the sample's identity (json ``uid``, else md5 of shard/key)
    shard            string   the input shard URL
    key              string   the sample's key in that shard
    clip_score       float32  cosine of image and text embedding (or the precomputed score)
    image_embedding  fixed_size_list<float16>[D]  L2-normalised
    text_embedding   fixed_size_list<float16>[D]  L2-normalised
    caption          string   the caption (the sample's caption member, as the model saw it)
    original_width   int32    the image's size before img2dataset resized it: the json's
    original_height  int32    ``original_width/height`` when present, else the image's own size
                              (null when neither is known)
    sha256           string   64 lowercase hex digits: the sha256 of the image member's bytes (the
                              embed stage's reader; DataComp's metadata ``sha256`` on the
                              precomputed path), null when unknown. Read by
                              ``select.prefilter.exact_duplicates`` (:func:`read_sha256`); parts
                              written before it existed lack it, and that reader names the part

The last three are what DataComp's basic filter reads (:mod:`pipeline.core.basic_filter`). Parts
written before they existed lack them; every reader except :func:`read_filter_columns` works on
such parts, and that one names the part and says to re-embed (``--force-from embed``).

Node ids of the graph are row numbers of the parts concatenated in part-name order
(:func:`list_parts` gives each part's offset).

``WORKDIR/embeddings/_skipped/part-NNNNN.parquet``: the input samples of shard NNNNN that are not
in its part, one row each (written before the stats json and the part, for every committed part;
empty when nothing was skipped). They have a folder of their own, named with a leading ``_`` as
Hive, Spark and ``pyarrow.dataset`` name what is not data, so a dataset over ``embeddings/`` (or a
glob of ``part-*.parquet``) sees the parts' one schema. Workdirs embedded before this folder
existed hold them beside the parts as ``part-NNNNN.skipped.parquet``; :func:`part_skipped_url`
reads either. Schema (a contract: the select stage reads it for ``decisions.parquet``)::

    shard   string  the input shard URL (as in the part's ``shard`` column)
    key     string  the sample's tar key ("" when unknown: a ``truncated_tar`` row, whose sample
                    cannot be told, or a ``bad_key`` whose name is not UTF-8 and cannot be stored)
    uid     string  the sample's json ``uid`` when it has one (a string), else ""
    reason  string  why it was skipped: the names counted in the part's stats json ``skipped``
                    (:data:`~pipeline.formats.webdataset.SKIP_REASONS`, and for the precomputed
                    encoder ``no_uid``, ``no_embedding``, ``bad_embedding``)

Per shard the rows per reason are exactly the stats json's ``skipped`` counts (the stats are
counted from these records). A shard skipped as missing (``input.allow_missing_shards``) has no
samples and an empty file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core.knn import prepare_vectors
from ..storage import Store, basename, damaged_on_error, join
from ..workdir import committed_parts
from .columns import fixed_list_to_numpy, fixed_size_list

if TYPE_CHECKING:  # pyarrow is imported where it is used (a reader of the schema alone needs none)
    import pyarrow as pa

COLUMNS = ("uid", "shard", "key", "clip_score", "image_embedding", "text_embedding", "caption",
           "original_width", "original_height", "sha256")
SKIPPED_COLUMNS = ("shard", "key", "uid", "reason")
SKIPPED_DIR = "_skipped"
SKIPPED_SUFFIX_BEFORE = ".skipped.parquet"  # beside the part: the layout before SKIPPED_DIR
FILTER_COLUMNS = ("caption", "original_width", "original_height")
VECTOR_COLUMNS = {"image": ("image_embedding",), "text": ("text_embedding",),
                  "image+text": ("image_embedding", "text_embedding")}


def part_table(shard: str, uids, keys, scores, image_emb: np.ndarray, text_emb: np.ndarray,
               captions, widths, heights, sha256s=None):
    """A part in the contract's schema (`widths`/`heights`: ints, None where unknown; `sha256s`:
    64-hex strings, None (all, or per row) where unknown)."""
    import pyarrow as pa

    n = len(uids)
    return pa.table({
        "uid": pa.array(list(uids), type=pa.string()),
        "shard": pa.array([shard] * n, type=pa.string()),
        "key": pa.array(list(keys), type=pa.string()),
        "clip_score": pa.array(np.asarray(scores, dtype=np.float32), type=pa.float32()),
        "image_embedding": fixed_size_list(image_emb, np.float16),
        "text_embedding": fixed_size_list(text_emb, np.float16),
        "caption": pa.array(list(captions), type=pa.string()),
        "original_width": _sizes(widths, n),
        "original_height": _sizes(heights, n),
        "sha256": _digests(sha256s, n),
    })


def write_part(store: Store, url: str, table) -> None:
    """Write a part atomically. Dictionary encoding only for the string columns: on float16 vectors
    it costs 3x the write time and 5-10x the read time (measured) for nothing."""
    import pyarrow as pa

    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    store.write_parquet(url, table, use_dictionary=strings)


def skipped_table(shard: str, records) -> "pa.Table":
    """The skip records of one input shard (`records`: (key, uid, reason) tuples, in shard order)
    in the contract's schema."""
    import pyarrow as pa

    records = list(records)
    return pa.table({
        "shard": pa.array([shard] * len(records), type=pa.string()),
        "key": pa.array([r[0] for r in records], type=pa.string()),
        "uid": pa.array([r[1] for r in records], type=pa.string()),
        "reason": pa.array([r[2] for r in records], type=pa.string()),
    })


def skipped_url(directory: str, name: str) -> str:
    """Where the embed stage writes part `name`'s (``part-NNNNN``) skip records."""
    return join(directory, SKIPPED_DIR, name + ".parquet")


def write_skipped(store: Store, url: str, table) -> None:
    store.write_parquet(url, table)


def read_skipped(store: Store, url: str):
    """One part's skip records, checked to have the contract's columns."""
    table = store.read_parquet(url)
    if tuple(table.column_names) != SKIPPED_COLUMNS:
        raise ValueError(f"{url}: columns {table.column_names}, expected {list(SKIPPED_COLUMNS)}")
    return table


def _sizes(values, n: int):
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(pa.int32())
    values = [None if v is None or int(v) <= 0 else int(v) for v in list(values)] if n else []
    return pa.array(values, type=pa.int32())


def _digests(values, n: int):
    import pyarrow as pa

    if values is None:
        return pa.nulls(n, type=pa.string())
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(pa.string())
    return pa.array([v or None for v in list(values)], type=pa.string())


@dataclass(frozen=True)
class EmbeddingPart:
    name: str  # "part-NNNNN"
    url: str
    rows: int
    offset: int  # global node id of its first row

    @property
    def index(self) -> int:
        """The input shard index the part belongs to (NNNNN)."""
        return int(self.name.split("-")[1])


def _schema_widths(url: str, schema, vector: str | None) -> tuple[int, ...]:
    """Widths of the columns of `vector` in a part's schema (checked to exist and be fixed-size lists)."""
    import pyarrow as pa

    vector_columns = VECTOR_COLUMNS[vector] if vector else ()
    for col in ("uid",) + vector_columns:
        if col not in schema.names:
            raise ValueError(f"embedding part {url} has no column {col!r} (columns: {schema.names})")
    widths = []
    for col in vector_columns:
        typ = schema.field(col).type
        if not pa.types.is_fixed_size_list(typ):
            raise ValueError(f"embedding part {url}: column {col} must be fixed_size_list, got {typ}")
        widths.append(typ.list_size)
    return tuple(widths)


def _layout(store: Store, urls: list[str], vector: str | None) -> tuple[list[int], int]:
    """Row counts of the parts (from parquet footers, no data read) and the dimension of `vector`
    (0 when None: a reader that needs no vectors does not check them)."""
    import pyarrow.parquet as pq

    rows, widths = [], None
    for url in urls:
        with damaged_on_error(url), store.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            rows.append(pf.metadata.num_rows)
        part_widths = _schema_widths(url, schema, vector)
        if widths is None:
            widths = part_widths
        elif widths != part_widths:
            raise ValueError(f"embedding part {url} has graph vector columns {part_widths} wide, earlier parts {widths}")
    return rows, int(sum(widths or ()))


def vector_widths(store: Store, part: EmbeddingPart, vector: str) -> tuple[int, ...]:
    """Widths of the embedding columns `vector` is made of (``image+text``: image, text), as
    :func:`read_raw_vectors` puts them side by side (:func:`list_parts` checked every part agrees)."""
    import pyarrow.parquet as pq

    with damaged_on_error(part.url), store.open(part.url, "rb") as fh:
        return _schema_widths(part.url, pq.ParquetFile(fh).schema_arrow, vector)


def list_parts(store: Store, directory: str, vector: str | None = None) -> tuple[list[EmbeddingPart], int]:
    """The committed parts in `directory` in part-name order with their node offsets, and the
    dimension of the `vector` the graph is built on (0 when no vector is asked for)."""
    urls = committed_parts(store, directory)  # sorted: one directory, so name order
    if not urls:
        raise FileNotFoundError(f"no embedding parts (part-*.parquet) in {directory}")
    names = [basename(u)[: -len(".parquet")] for u in urls]
    rows, dim = _layout(store, urls, vector)
    offsets = np.concatenate([[0], np.cumsum(rows)])[:-1]
    return [EmbeddingPart(n, u, int(r), int(o)) for n, u, r, o in zip(names, urls, rows, offsets)], dim


def _vector_arrays(store: Store, part: EmbeddingPart, vector: str, rows: np.ndarray | None) -> list[np.ndarray]:
    """The columns of `vector` of one part (optionally some rows) as [n, width] arrays, as stored.
    A whole-part read checks the part still holds the rows it was listed with."""
    columns = list(VECTOR_COLUMNS[vector])
    table = store.read_parquet(part.url, columns=columns)
    if rows is None and table.num_rows != part.rows:
        raise RuntimeError(f"{part.url} has {table.num_rows} rows, {part.rows} when the stage started")
    if rows is not None:
        table = table.take(np.asarray(rows, dtype=np.int64))
    return [fixed_list_to_numpy(table.column(c), c, part.url) for c in columns]


def read_vectors(store: Store, part: EmbeddingPart, vector: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The graph vectors (:func:`~pipeline.core.knn.prepare_vectors`) of one part, optionally only
    some of its rows. A whole-part read checks the part still holds the rows it was listed with."""
    arrays = dict(zip(VECTOR_COLUMNS[vector], _vector_arrays(store, part, vector, rows)))
    return prepare_vectors(arrays.get("image_embedding"), arrays.get("text_embedding"), vector)


def read_raw_vectors(store: Store, part: EmbeddingPart, vector: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The embedding columns of `vector` side by side, float16 as stored (half the bytes of the
    prepared float32 vectors: what the graph stage moves between its tasks);
    :func:`~pipeline.core.knn.prepare_raw` with :func:`vector_widths` turns any of its rows into
    exactly the rows :func:`read_vectors` gives."""
    arrays = _vector_arrays(store, part, vector, rows)
    return np.ascontiguousarray(np.concatenate(arrays, axis=1) if len(arrays) > 1 else arrays[0], dtype=np.float16)


def rows_by_part(parts: list[EmbeddingPart], ids: np.ndarray) -> list[tuple[EmbeddingPart, np.ndarray]]:
    """Split sorted global node ids into (part, local rows) pairs."""
    starts = np.array([p.offset for p in parts], dtype=np.int64)
    where = np.searchsorted(starts, ids, side="right") - 1
    out = []
    for idx in np.unique(where):
        sel = ids[where == idx]
        out.append((parts[idx], sel - parts[idx].offset))
    return out


def read_vectors_at(store: Store, parts: list[EmbeddingPart], vector: str, ids: np.ndarray) -> np.ndarray:
    """The graph vectors of the sorted global node ids `ids`, reading one part at a time (a
    sample of the pool need not hold the pool's vectors in memory)."""
    ids = np.asarray(ids, np.int64)
    pieces = [read_vectors(store, part, vector, rows) for part, rows in rows_by_part(parts, ids)]
    if not pieces:  # no rows asked: an empty array of the right width
        return read_vectors(store, parts[0], vector, np.zeros(0, np.int64))
    return np.concatenate(pieces)


SAMPLE_BATCH_ROWS = 1024  # rows :func:`read_vectors_sample` decodes at once


def _sampled_vector_arrays(store: Store, part: EmbeddingPart, vector: str, rows: np.ndarray) -> list[np.ndarray]:
    """The columns of `vector` at the sorted `rows` of one part, decoded SAMPLE_BATCH_ROWS rows at
    a time and read no further than the last of them. pyarrow decodes a whole fixed-size-list column
    at ~8x its size (measured: +320 MB for 25,000 rows of 768-d float16); a batch at a time it is
    ~+90 MB whatever the part's size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(VECTOR_COLUMNS[vector])
    picked: dict[str, list] = {c: [] for c in columns}
    start = 0
    with damaged_on_error(part.url), store.open(part.url, "rb") as fh:
        pf = pq.ParquetFile(fh, pre_buffer=False, buffer_size=1 << 20)
        if pf.metadata.num_rows != part.rows:
            raise RuntimeError(f"{part.url} has {pf.metadata.num_rows} rows, {part.rows} when the stage started")
        types = {c: pf.schema_arrow.field(c).type for c in columns}
        if len(rows):
            for batch in pf.iter_batches(batch_size=SAMPLE_BATCH_ROWS, columns=columns):
                lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
                for c in columns:
                    picked[c].append(batch.column(c).take(pa.array(rows[lo:hi] - start)))
                start += batch.num_rows
                if hi == len(rows):
                    break
    return [fixed_list_to_numpy(pa.chunked_array(picked[c], type=types[c]), c, part.url) for c in columns]


def read_vectors_sample(store: Store, parts: list[EmbeddingPart], vector: str, ids: np.ndarray) -> np.ndarray:
    """:func:`read_vectors_at` for a sample of rows (the report's map): the same vectors, each part
    decoded a batch of rows at a time, so memory does not grow with the parts' size."""
    ids = np.asarray(ids, np.int64)
    pieces = []
    for part, rows in rows_by_part(parts, ids) or [(parts[0], np.zeros(0, np.int64))]:
        arrays = dict(zip(VECTOR_COLUMNS[vector], _sampled_vector_arrays(store, part, vector, rows)))
        pieces.append(prepare_vectors(arrays.get("image_embedding"), arrays.get("text_embedding"), vector))
    return np.concatenate(pieces)


def read_column(store: Store, parts: list[EmbeddingPart], column: str) -> np.ndarray:
    """One scalar column of every part, concatenated in node order (object dtype for strings)."""
    pieces = []
    for part in parts:
        table = store.read_parquet(part.url, columns=[column])
        if table.num_rows != part.rows:
            raise RuntimeError(f"{part.url} has {table.num_rows} rows, {part.rows} when the stage started")
        pieces.append(table.column(column).to_numpy(zero_copy_only=False))
    return np.concatenate(pieces) if pieces else np.zeros(0)


def numeric_columns(store: Store, part: EmbeddingPart) -> list[str]:
    """Names of the numeric scalar columns of a part (what ``select.score`` may name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with damaged_on_error(part.url), store.open(part.url, "rb") as fh:
        schema = pq.ParquetFile(fh).schema_arrow
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]


def read_filter_columns(store: Store, part: EmbeddingPart) -> dict[str, np.ndarray]:
    """What DataComp's basic filter reads of one part: caption (object), original_width and
    original_height (float64, NaN where unknown), in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with damaged_on_error(part.url), store.open(part.url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        missing = [c for c in FILTER_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(
                f"embedding part {part.url} has no column(s) {missing}: it was written before the embed "
                "stage recorded captions and image sizes; rerun with --force-from embed"
            )
        table = pf.read(columns=list(FILTER_COLUMNS))
    if table.num_rows != part.rows:
        raise RuntimeError(f"{part.url} has {table.num_rows} rows, {part.rows} when the stage started")
    sizes = {c: table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
             for c in ("original_width", "original_height")}
    return {"caption": table.column("caption").to_numpy(zero_copy_only=False), **sizes}


def read_sha256(store: Store, part: EmbeddingPart):
    """One part's ``sha256`` column (pyarrow string array, null where unknown), in row order; a
    part written before the column existed is an error naming it and ``--force-from embed``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with damaged_on_error(part.url), store.open(part.url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if "sha256" not in pf.schema_arrow.names:
            raise ValueError(
                f"embedding part {part.url} has no column 'sha256': it was written before the embed stage "
                "recorded the images' sha256 (select.prefilter.exact_duplicates needs it); rerun with --force-from embed"
            )
        table = pf.read(columns=["sha256"])
    if table.num_rows != part.rows:
        raise RuntimeError(f"{part.url} has {table.num_rows} rows, {part.rows} when the stage started")
    return table.column("sha256").combine_chunks().cast(pa.string())


def part_skipped_url(store: Store, part: EmbeddingPart) -> str | None:
    """Where the skip records of `part`'s shard are: in the skip-records folder, else beside the
    part (a workdir embedded before that folder existed); None when the embed stage wrote none (a
    workdir embedded before skip records existed)."""
    directory = part.url.rsplit("/", 1)[0]
    for url in (skipped_url(directory, part.name), join(directory, part.name + SKIPPED_SUFFIX_BEFORE)):
        if store.exists(url):
            return url
    return None


def read_part_skipped(store: Store, part: EmbeddingPart):
    """The skip records of `part`'s shard (:func:`part_skipped_url`), or None when there are none."""
    url = part_skipped_url(store, part)
    return read_skipped(store, url) if url is not None else None
