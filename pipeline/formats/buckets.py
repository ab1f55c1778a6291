"""Bucketed files: the intermediate format of every join by uid that must not hold a pool in one
process (``WORKDIR/embeddings/_join/``, ``WORKDIR/write/_join/``).

Why a file-based hash shuffle: joining two sides by uid in one process needs both sides' uids
in memory (1.28·10^8 DataComp-medium uids alone are several GB in Python, and the precomputed
vectors 400 GB). Instead every map task writes its rows into *buckets* (a uid's bucket is a hash
of the uid, so all rows of a uid, from either side, land in the same bucket); one task per
bucket then joins a small slice of the pool; its output is bucketed again by where the rows go
next (a group of consecutive shards). Each step's files are committed atomically and kept until
the stage commits, so a killed job resumes from the last finished step.

A bucketed file is one parquet file whose row group ``r`` holds the rows of one bucket; which
bucket each row group holds is stored in the file's schema metadata (``d2prune.buckets``: a
JSON list of [bucket, row group] pairs). Empty buckets have no row group. :class:`BucketedWriter`
spills sorted runs to local disk when its rows exceed a memory limit and merges them bucket by
bucket on :meth:`~BucketedWriter.commit`, so a map task's memory is bounded by that limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from ..storage import Store

BUCKETS_KEY = "d2prune.buckets"


def uid_hashes(uids) -> np.ndarray:
    """A 64-bit hash of each uid (blake2b; the same on every machine and Python version)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uids),
        dtype=np.uint64, count=len(uids),
    )


def uid_buckets(hashes: np.ndarray, n_buckets: int) -> np.ndarray:
    """The bucket (0..n_buckets-1) of each uid hash (:func:`uid_hashes`)."""
    return (np.asarray(hashes, np.uint64) % np.uint64(n_buckets)).astype(np.int64)


def _sorted_by_bucket(table, buckets: np.ndarray):
    order = np.argsort(buckets, kind="stable")
    return table.take(order), buckets[order]


def _bucket_runs(buckets: np.ndarray) -> list[tuple[int, int, int]]:
    """(bucket, start, end) of each run of equal values in a sorted bucket array."""
    if not len(buckets):
        return []
    cuts = np.flatnonzero(np.diff(buckets)) + 1
    starts = np.concatenate([[0], cuts]).tolist()
    ends = np.concatenate([cuts, [len(buckets)]]).tolist()
    return [(int(buckets[s]), s, e) for s, e in zip(starts, ends)]


class _IndexedWriter:
    """A local parquet file written one bucket (one row group) at a time, its index in the footer."""

    def __init__(self, path: str, schema):
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.index: list[list[int]] = []

    def write(self, bucket: int, table) -> None:
        if table.num_rows:
            self._writer.write_table(table, row_group_size=table.num_rows)  # exactly one row group
            self.index.append([bucket, len(self.index)])

    def close(self) -> dict[int, int]:
        self._writer.add_key_value_metadata({BUCKETS_KEY: json.dumps(self.index)})
        self._writer.close()
        return dict((b, r) for b, r in self.index)


class BucketedWriter:
    """Collects (table, buckets) pieces and commits them as one bucketed file at `url`.

    Rows are held in memory up to `memory_limit` bytes, then sorted by bucket and spilled to a
    local run file; :meth:`commit` merges the runs bucket by bucket (one bucket in memory at a
    time) into the final file and writes it atomically. Rows of one bucket keep the order in
    which they were added."""

    def __init__(self, schema, memory_limit: int = 256 * 2**20):
        self.schema = schema
        self.memory_limit = memory_limit
        self._pieces: list = []
        self._buckets: list[np.ndarray] = []
        self._bytes = 0
        self._tmp = tempfile.mkdtemp(prefix="d2prune-buckets-")
        self._runs: list[tuple[str, dict[int, int]]] = []

    def add(self, table, buckets: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        self._pieces.append(table.select(self.schema.names).cast(self.schema))
        self._buckets.append(np.asarray(buckets, np.int64))
        self._bytes += table.nbytes
        if self._bytes >= self.memory_limit:
            self._spill()

    def _collected(self):
        import pyarrow as pa

        table = pa.concat_tables(self._pieces) if self._pieces else self.schema.empty_table()
        buckets = np.concatenate(self._buckets) if self._buckets else np.zeros(0, np.int64)
        self._pieces, self._buckets, self._bytes = [], [], 0
        return _sorted_by_bucket(table, buckets)

    def _write_sorted(self, path: str) -> dict[int, int]:
        table, buckets = self._collected()
        writer = _IndexedWriter(path, self.schema)
        for bucket, start, end in _bucket_runs(buckets):
            writer.write(bucket, table.slice(start, end - start))
        return writer.close()

    def _spill(self) -> None:
        path = os.path.join(self._tmp, f"run-{len(self._runs):05d}.parquet")
        self._runs.append((path, self._write_sorted(path)))

    def commit(self, store: Store, url: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            final = os.path.join(self._tmp, "final.parquet")
            if not self._runs:  # everything is still in memory: write it directly
                self._write_sorted(final)
            else:
                if self._pieces:
                    self._spill()
                runs = [(pq.ParquetFile(path), groups) for path, groups in self._runs]
                writer = _IndexedWriter(final, self.schema)
                for bucket in sorted({b for _, groups in runs for b in groups}):
                    writer.write(bucket, pa.concat_tables([f.read_row_group(groups[bucket])
                                                           for f, groups in runs if bucket in groups]))
                writer.close()
            store.write_local_file(url, final)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def read_bucket(store: Store, url: str, bucket: int, columns: list[str] | None = None):
    """The rows of `bucket` in the bucketed file at `url` (an empty table when it has none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with store.open(url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        index = dict(json.loads(pf.metadata.metadata[BUCKETS_KEY.encode()]))
        group = index.get(bucket)
        if group is None:
            schema = pf.schema_arrow
            if columns is not None:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pf.read_row_group(group, columns=columns)
