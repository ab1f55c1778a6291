"""Bucketed files and the uid shuffle: the intermediate format and the helpers of every join by uid
that must not hold a pool in one process (the precomputed embeddings, ``WORKDIR/embeddings/_join/``;
the write plan, ``WORKDIR/write/_join/``; the select stage's ``select.score_file``).

Why a file-based hash shuffle: joining two sides by uid in one process needs both sides' uids
in memory (1.28·10^8 DataComp-medium uids alone are several GB in Python, and the precomputed
vectors 400 GB). Instead every map task writes its rows into *buckets* (a uid's bucket is a hash
of the uid, so all rows of a uid, from either side, land in the same bucket); one task per
bucket then joins a small slice of the pool; its output is bucketed again by where the rows go
next (a group of consecutive shards). Each step's files are committed atomically and kept until
the stage commits, so a killed job resumes from the last finished step.

The three pieces every such join is made of: the map side writes its rows with
:meth:`BucketedWriter.add_by_uid` (the bucket of a uid is :func:`uid_buckets` of the one uid hash,
:mod:`pipeline.core.uids`); the join task reads its bucket of every file of each side with
:func:`gather_bucket` and matches the sides with :func:`uid_positions`.

Why the select stage's record shuffle (:mod:`.shuffle`) and the graph's scratch blocks
(:mod:`pipeline.graph.scratch`) keep formats of their own: they move billions of plain numeric
rows (edges, vectors) that a reader takes raw by row range or with one ranged read per block,
where a parquet blob would add a decode per block; a uid join's rows are any Arrow schema (nulls,
float16 vector lists), which is what parquet blobs carry.

A bucketed file (``*.bkt``) holds one small parquet blob per non-empty bucket behind a fixed-size
header, so that a reader fetches one bucket with two ranged reads (the header up to its entry,
then its blob), whatever the number of buckets. (One parquet file with a row group per bucket
would make every reader fetch the whole footer, which grows with the number of buckets: with
hundreds of buckets and files that is hundreds of GB of footer reads.) ::

    b"D2PBKT01"  n_buckets: uint64 LE
    entry 0: (offset, length) uint64 LE of a parquet blob with the schema and no rows
    entry 1 + b: (offset, length) of bucket b's parquet blob (length 0: no rows)
    the blobs

:class:`BucketedWriter` spills sorted runs (in the same format) to local disk when its rows
exceed a memory limit and merges them bucket by bucket on :meth:`~BucketedWriter.commit`, so a
map task's memory is bounded by that limit, not by its input.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile

import numpy as np

from ..core import uids as core_uids
from ..storage import Store

MAGIC = b"D2PBKT01"
_ENTRY = struct.Struct("<QQ")
_HEAD = len(MAGIC) + 8


def uid_hashes(uids) -> np.ndarray:
    """The 64-bit hash (:mod:`pipeline.core.uids`) of each uid: a pyarrow string array (hashed in
    place) or a sequence of str."""
    import pyarrow as pa

    from .shuffle import _string_buffers

    if isinstance(uids, (pa.Array, pa.ChunkedArray)):
        return core_uids.hash_utf8(*_string_buffers(uids.cast(pa.string())))
    return core_uids.uid_hashes(uids)


def uid_buckets(hashes: np.ndarray, n_buckets: int) -> np.ndarray:
    """The bucket (0..n_buckets-1) of each uid hash (:func:`uid_hashes`)."""
    return core_uids.hash_buckets(hashes, n_buckets)


def hash_sum(uids) -> int:
    """Order-independent fingerprint of a set of uids: the sum of their hashes mod 2^64."""
    return core_uids.hash_sum(uid_hashes(uids))


def gather_bucket(store: Store, urls: list[str], bucket: int):
    """Bucket `bucket` of every bucketed file of `urls` (at least one), concatenated in url order:
    one side of a join task's share."""
    import pyarrow as pa

    if not urls:
        raise ValueError("gather_bucket needs at least one file")
    return pa.concat_tables([read_bucket(store, url, bucket) for url in urls])


def uid_positions(keys, uids) -> np.ndarray:
    """The join of a bucket: position in `keys` (one side's uids) of each of `uids` (the other
    side's), the first where a uid repeats in `keys`, -1 where it is not there. Both: pyarrow
    string arrays, numpy object arrays or lists."""
    import pandas as pd

    index = pd.Index(_objects(keys))
    if index.is_unique:
        return index.get_indexer(pd.Index(_objects(uids))).astype(np.int64)
    first = np.flatnonzero(~index.duplicated(keep="first"))
    where = index[first].get_indexer(pd.Index(_objects(uids)))
    return np.where(where >= 0, first[where], -1).astype(np.int64)


def repeated_uids(uids) -> list[str]:
    """The distinct uids that occur more than once, in order of their second occurrence."""
    import pandas as pd

    values = pd.Series(_objects(uids))
    return [str(u) for u in values[values.duplicated()].unique()]


def _objects(uids) -> np.ndarray:
    import pyarrow as pa

    if isinstance(uids, (pa.Array, pa.ChunkedArray)):
        return uids.to_numpy(zero_copy_only=False)
    return np.asarray(uids, dtype=object)


def _blob(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    # no dictionary encoding: on float16 vectors it triples the write time and slows reads 5-10x
    pq.write_table(table, buf, compression="zstd", use_dictionary=False)
    return buf.getvalue()


def _parse(blob: bytes):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(blob))


class _FileWriter:
    """A local bucketed file: blobs appended bucket by bucket, the header filled on close."""

    def __init__(self, path: str, schema, n_buckets: int):
        self.path, self.n_buckets = path, n_buckets
        self.entries = [(0, 0)] * (n_buckets + 1)
        self._fh = open(path, "wb")
        self._fh.write(bytes(_HEAD + _ENTRY.size * (n_buckets + 1)))
        self._append(0, _blob(schema.empty_table()))

    def _append(self, entry: int, blob: bytes) -> None:
        self.entries[entry] = (self._fh.tell(), len(blob))
        self._fh.write(blob)

    def write(self, bucket: int, table) -> None:
        if table.num_rows:
            self._append(bucket + 1, _blob(table))

    def close(self) -> None:
        self._fh.seek(0)
        self._fh.write(MAGIC + struct.pack("<Q", self.n_buckets))
        self._fh.write(b"".join(_ENTRY.pack(*e) for e in self.entries))
        self._fh.close()


def _read_local(path: str, bucket: int):
    with open(path, "rb") as fh:
        fh.seek(_HEAD + _ENTRY.size * (bucket + 1))
        offset, length = _ENTRY.unpack(fh.read(_ENTRY.size))
        if not length:
            return None
        fh.seek(offset)
        return _parse(fh.read(length))


class BucketedWriter:
    """Collects (table, buckets) pieces and commits them as one bucketed file at `url`.

    Rows are held in memory up to `memory_limit` bytes (pyarrow then holds about three times that
    while sorting; measured), then sorted by bucket and spilled to a local run file;
    :meth:`commit` merges the runs bucket by bucket (one bucket in memory at a time) into the
    final file and writes it atomically. Rows of one bucket keep the order they were added in."""

    def __init__(self, schema, n_buckets: int, memory_limit: int = 64 * 2**20):
        self.schema = schema
        self.n_buckets = n_buckets
        self.memory_limit = memory_limit
        self._pieces: list = []
        self._buckets: list[np.ndarray] = []
        self._bytes = 0
        self._tmp = tempfile.mkdtemp(prefix="d2prune-buckets-")
        self._runs: list[str] = []

    def add_by_uid(self, table, column: str = "uid") -> None:
        """Add `table`'s rows, each to the bucket of its uid (column `column`)."""
        self.add(table, uid_buckets(uid_hashes(table.column(column)), self.n_buckets))

    def add(self, table, buckets: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        buckets = np.asarray(buckets, np.int64)
        if buckets.size and (buckets.min() < 0 or buckets.max() >= self.n_buckets):
            raise ValueError(f"bucket ids outside 0..{self.n_buckets - 1}")
        self._pieces.append(table.select(self.schema.names).cast(self.schema))
        self._buckets.append(buckets)
        self._bytes += table.nbytes
        if self._bytes >= self.memory_limit:
            self._spill()

    def _write_collected(self, path: str) -> None:
        import pyarrow as pa

        if len(self._pieces) == 1:
            table = self._pieces[0]
        else:
            table = pa.concat_tables(self._pieces) if self._pieces else self.schema.empty_table()
        buckets = np.concatenate(self._buckets) if self._buckets else np.zeros(0, np.int64)
        self._pieces, self._buckets, self._bytes = [], [], 0
        order = np.argsort(buckets, kind="stable")
        table, buckets = table.take(pa.array(order, pa.int64())), buckets[order]
        writer = _FileWriter(path, self.schema, self.n_buckets)
        if len(buckets):
            cuts = np.flatnonzero(np.diff(buckets)) + 1
            for start, end in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(buckets)]]).tolist()):
                writer.write(int(buckets[start]), table.slice(start, end - start))
        writer.close()

    def _spill(self) -> None:
        path = os.path.join(self._tmp, f"run-{len(self._runs):05d}.bkt")
        self._write_collected(path)
        self._runs.append(path)

    def commit(self, store: Store, url: str) -> int:
        """Write the file at `url` (atomically); returns its size in bytes."""
        import pyarrow as pa

        try:
            final = os.path.join(self._tmp, "final.bkt")
            if not self._runs:  # everything is still in memory: write it directly
                self._write_collected(final)
            else:
                if self._pieces:
                    self._spill()
                writer = _FileWriter(final, self.schema, self.n_buckets)
                for bucket in range(self.n_buckets):
                    parts = [t for t in (_read_local(run, bucket) for run in self._runs) if t is not None]
                    if parts:
                        writer.write(bucket, pa.concat_tables(parts))
                writer.close()
            size = os.path.getsize(final)
            store.write_local_file(url, final)
            return size
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def read_bucket(store: Store, url: str, bucket: int):
    """The rows of `bucket` in the bucketed file at `url` (an empty table when it has none): two
    ranged reads."""
    fs, path = store.fs(url), store.path(url)
    end = _HEAD + _ENTRY.size * (bucket + 2)
    head = fs.cat_file(path, start=0, end=end)
    if len(head) < end or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{url} is not a bucketed file with a bucket {bucket}")
    (n_buckets,) = struct.unpack_from("<Q", head, len(MAGIC))
    if bucket >= n_buckets:
        raise ValueError(f"{url} has {n_buckets} buckets, not {bucket + 1}")
    offset, length = _ENTRY.unpack_from(head, _HEAD + _ENTRY.size * (bucket + 1))
    if not length:
        offset, length = _ENTRY.unpack_from(head, _HEAD)  # the schema, no rows
    return _parse(fs.cat_file(path, start=offset, end=offset + length))
