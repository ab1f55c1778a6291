"""``WORKDIR/selection/_work/``: the select stage's intermediate files (shuffle buckets, sorted picks,
ranks, subset runs): numeric and string columns, rows grouped by bucket, read back bucket by bucket
or by row range without reading the rest.

Why not parquet: these files are written once and read once by the next step of the same stage;
what matters is that a reader of one bucket (a partition reading its share of a map task's output)
or of one block of rows (a k-way merge streaming sorted runs) reads exactly those bytes, with no
decoding and no per-row-group overhead (a map task writes one bucket per partition: thousands of
tiny parquet row groups would cost more than the data). Committed atomically like every file of
the workdir (:meth:`pipeline.storage.Store.write_file`), so a resumed stage reuses what a killed
one finished.

Layout (little-endian)::

    b"D2COLS01"  uint64 header length  header (JSON, padded)  column blocks, each 64-byte aligned

Header: ``rows``, ``buckets`` (row offsets of each bucket, ``n_buckets + 1`` ints) and, per
column, ``name``, ``dtype`` (a numpy dtype string, or ``"string"``) and the byte offset of its
block. A numeric column is its values in row order; a string column is ``int64[rows + 1]`` offsets
into a data block that follows them (utf-8 bytes, as Arrow stores strings). Rows of bucket ``b``
are ``buckets[b]:buckets[b + 1]``, in the order they were given within the bucket.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ..storage import Store

MAGIC = b"D2COLS01"
_ALIGN = 64


def _pad(n: int) -> int:
    return -n % _ALIGN


def _string_buffers(array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets starting at 0, uint8 data) of a pyarrow string/binary array without nulls."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count:
        raise ValueError(f"string column has {array.null_count} nulls")
    large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    _, off_buf, data_buf = array.buffers()
    n = len(array)
    offsets = np.frombuffer(off_buf, np.int64 if large else np.int32, n + 1, array.offset * (8 if large else 4))
    offsets = offsets.astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buf, np.uint8, end - start, start) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets - start, data


def _string_array(offsets: np.ndarray, data: np.ndarray):
    import pyarrow as pa

    n = len(offsets) - 1
    if offsets.size and offsets[-1] >= 2**31:
        return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))


def bucket_order(buckets: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(row order grouping rows by bucket, stable within a bucket; row offsets of each bucket)."""
    buckets = np.asarray(buckets, np.int64)
    if buckets.size and (buckets.min() < 0 or buckets.max() >= n_buckets):
        raise ValueError(f"bucket ids must lie in 0..{n_buckets - 1}")
    order = np.argsort(buckets, kind="stable")
    offsets = np.zeros(n_buckets + 1, np.int64)
    np.cumsum(np.bincount(buckets, minlength=n_buckets), out=offsets[1:])
    return order, offsets


def write_columns(store: Store, url: str, columns: dict[str, Any], bucket_offsets=None) -> int:
    """Write `columns` (numpy 1-D arrays, or pyarrow string arrays) of equal length as one file,
    rows already grouped by bucket (``bucket_offsets``: ``n_buckets + 1`` row offsets; None = one
    bucket). Atomic. Returns the bytes written."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    for name in names:
        if len(columns[name]) != n:
            raise ValueError(f"column {name} has {len(columns[name])} rows, {names[0]} has {n}")
    offsets = [0, n] if bucket_offsets is None else [int(x) for x in bucket_offsets]
    if offsets[0] != 0 or offsets[-1] != n or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"bucket offsets must rise from 0 to the {n} rows")
    blocks: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    pos = 0  # relative to the first block
    for name in names:
        col = columns[name]
        if isinstance(col, np.ndarray):
            arr = np.ascontiguousarray(col)
            if arr.dtype.kind not in "biuf" or arr.ndim != 1:
                raise ValueError(f"column {name}: 1-D numeric arrays only, got {arr.dtype} {arr.shape}")
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            entries.append({"name": name, "dtype": arr.dtype.str, "offset": pos})
            arrays = [arr]
        else:
            off, data = _string_buffers(col)
            data_pos = pos + off.nbytes + _pad(off.nbytes)
            entries.append({"name": name, "dtype": "string", "offset": pos, "data_offset": data_pos})
            arrays = [off, data]
        for a in arrays:
            blocks.append(a)
            pos += a.nbytes + _pad(a.nbytes)
    head = json.dumps({"rows": n, "buckets": offsets, "columns": entries}).encode()
    start = len(MAGIC) + 8 + len(head) + _pad(len(MAGIC) + 8 + len(head))

    def fill(path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(MAGIC + struct.pack("<Q", len(head)) + head)
            fh.write(b"\0" * (start - fh.tell()))
            for a in blocks:
                fh.write(memoryview(a).cast("B"))
                fh.write(b"\0" * _pad(a.nbytes))

    store.write_file(url, fill)
    return start + pos


class ColumnFile:
    """A reader of one file written by :func:`write_columns` (open it with ``with``)."""

    def __init__(self, store: Store, url: str):
        self.url = url
        self._fh = store.open(url, "rb")
        magic = self._fh.read(len(MAGIC))
        if magic != MAGIC:
            self._fh.close()
            raise ValueError(f"{url} is not a d2prune column file")
        (size,) = struct.unpack("<Q", self._fh.read(8))
        meta = json.loads(self._fh.read(size))
        self._start = len(MAGIC) + 8 + size + _pad(len(MAGIC) + 8 + size)
        self.rows = int(meta["rows"])
        self.bucket_offsets = np.asarray(meta["buckets"], np.int64)
        self.columns = {c["name"]: c for c in meta["columns"]}

    def __enter__(self) -> "ColumnFile":
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    @property
    def n_buckets(self) -> int:
        return len(self.bucket_offsets) - 1

    def bucket_rows(self, bucket: int) -> tuple[int, int]:
        if not 0 <= bucket < self.n_buckets:
            raise ValueError(f"{self.url}: bucket {bucket} outside 0..{self.n_buckets - 1}")
        return int(self.bucket_offsets[bucket]), int(self.bucket_offsets[bucket + 1])

    def _read(self, offset: int, nbytes: int) -> bytes:
        self._fh.seek(offset)
        data = self._fh.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{self.url} is truncated")
        return data

    def read_rows(self, lo: int, hi: int, columns: list[str] | None = None) -> dict[str, Any]:
        """Rows ``lo..hi-1`` of `columns` (all by default): numpy arrays (writable copies) and
        pyarrow string arrays."""
        if not 0 <= lo <= hi <= self.rows:
            raise ValueError(f"{self.url}: rows {lo}..{hi} outside 0..{self.rows}")
        out: dict[str, Any] = {}
        for name in columns or list(self.columns):
            if name not in self.columns:
                raise ValueError(f"{self.url} has no column {name!r} (columns: {list(self.columns)})")
            col = self.columns[name]
            if col["dtype"] == "string":
                off = np.frombuffer(self._read(self._start + col["offset"] + 8 * lo, 8 * (hi - lo + 1)), np.int64)
                data_start = self._start + col["data_offset"]
                data = np.frombuffer(self._read(data_start + int(off[0]), int(off[-1] - off[0])), np.uint8)
                out[name] = _string_array(off - off[0], data)
            else:
                dtype = np.dtype(col["dtype"])
                raw = bytearray(self._read(self._start + col["offset"] + dtype.itemsize * lo, dtype.itemsize * (hi - lo)))
                out[name] = np.frombuffer(raw, dtype)
        return out

    def read_bucket(self, bucket: int, columns: list[str] | None = None) -> dict[str, Any]:
        return self.read_rows(*self.bucket_rows(bucket), columns)


def read_buckets(store: Store, urls: list[str], bucket: int, columns: list[str]) -> dict[str, Any]:
    """Bucket `bucket` of every file in `urls` (at least one), concatenated in url order."""
    import pyarrow as pa

    if not urls:
        raise ValueError("read_buckets needs at least one file")
    pieces = []
    for url in urls:
        with ColumnFile(store, url) as f:
            pieces.append(f.read_bucket(bucket, columns))
    out: dict[str, Any] = {}
    for name in columns:
        parts = [p[name] for p in pieces]
        if parts and not isinstance(parts[0], np.ndarray):
            out[name] = pa.concat_arrays(parts)
        else:
            out[name] = np.concatenate(parts)
    return out
