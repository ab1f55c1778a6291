"""The graph stage's scratch files: row blocks by destination, read a block at a time.

Every shuffle of the stage (training sample → coarse cells, pool rows → search groups, candidates
→ merge units) is a *blocked file*: a map task writes one file whose rows are cut into blocks, one
per destination, and each destination task reads only its block of every map task's file with a
ranged read (one ranged GET on an object store). So no task holds more than its own block of each
file, nothing passes through the driver and no node copies a whole index; there are
(map tasks × destinations) blocks, but only (map tasks) files.

Why files in the work directory and not Ray's object store (Ray Data or task returns): a blocked
file is committed by its map task, so a killed stage resumes with the blocks it has (Ray objects
die with the job), a block is read by whichever node runs its destination (local disk or S3, the
same code), and the object store is never filled with the pool (at 512-d float16 the shuffled rows
are about 2.5 KiB per node: 2.5 TB at 10^9).

Layout of ``NAME.bin`` (data) and ``NAME.idx`` (index, the commit: written after the data)::

    NAME.idx  little-endian int64[B + 1]: the first row of each block, then the total row count
    NAME.bin  the blocks in order; block b holds rows idx[b]..idx[b+1] column after column
              (each column's rows contiguous), every row `schema.row_bytes` bytes

Not a contract between stages (no reader outside :mod:`pipeline.graph`; the stage removes these
files when its output is complete), so it lives here and not in :mod:`pipeline.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..storage import Store

DATA, INDEX = ".bin", ".idx"


@dataclass(frozen=True)
class BlockSchema:
    """The columns of a blocked file: (name, little-endian numpy dtype such as "<f2", width) each;
    width 0 = a scalar column."""

    columns: tuple[tuple[str, str, int], ...]

    @property
    def row_bytes(self) -> int:
        return sum(np.dtype(dtype).itemsize * max(1, width) for _, dtype, width in self.columns)

    def check(self, block: dict[str, np.ndarray]) -> int:
        """Rows of `block`, checking it has every column with the right width and equal lengths."""
        rows = None
        for name, _, width in self.columns:
            arr = block[name]
            shape = (arr.shape[0], width) if width else (arr.shape[0],)
            if arr.shape != shape:
                raise ValueError(f"scratch column {name}: shape {arr.shape}, expected {shape}")
            if rows is not None and arr.shape[0] != rows:
                raise ValueError(f"scratch column {name}: {arr.shape[0]} rows, other columns {rows}")
            rows = arr.shape[0]
        return int(rows or 0)


def index_url(url: str) -> str:
    """The file that commits the blocked file at `url` (its index, written last)."""
    return url + INDEX


def exists(store: Store, url: str) -> bool:
    """True when the blocked file at `url` is committed (its index exists)."""
    return store.exists(index_url(url))


def write(store: Store, url: str, schema: BlockSchema, blocks: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """Write the blocks (an iterable, consumed one block at a time: the data is streamed to disk,
    never held whole) to ``url.bin``, then commit ``url.idx``; returns the rows per block."""
    starts = [0]

    def fill(path: str) -> None:
        with open(path, "wb") as fh:
            for block in blocks:
                starts.append(starts[-1] + schema.check(block))
                for name, dtype, _ in schema.columns:
                    fh.write(np.ascontiguousarray(block[name], dtype=dtype).tobytes())

    store.write_file(url + DATA, fill)
    index = np.asarray(starts, dtype="<i8")
    store.write_bytes(url + INDEX, index.tobytes())
    return np.diff(index)


def block_rows(store: Store, url: str) -> np.ndarray:
    """Rows of every block of a committed blocked file (reads only its index)."""
    return np.diff(np.frombuffer(store.read_bytes(url + INDEX), dtype="<i8"))


def read_blocks(store: Store, urls: list[str], schema: BlockSchema, block: int) -> dict[str, np.ndarray]:
    """Block `block` of each of `urls`, concatenated in the order of `urls`, without holding more
    than the result and one block (the result is allocated from the index entries first)."""
    spans = [tuple(int(v) for v in np.frombuffer(store.read_range(url + INDEX, 8 * block, 8 * block + 16), dtype="<i8"))
             for url in urls]
    total = sum(hi - lo for lo, hi in spans)
    out = {name: np.empty((total, width) if width else total, np.dtype(dtype)) for name, dtype, width in schema.columns}
    at = 0
    for url, (lo, hi) in zip(urls, spans):
        rows = hi - lo
        if rows == 0:
            continue
        data = store.read_range(url + DATA, lo * schema.row_bytes, hi * schema.row_bytes)
        offset = 0
        for name, dtype, width in schema.columns:
            dt = np.dtype(dtype)
            count = rows * max(1, width)
            out[name][at:at + rows] = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(
                (rows, width) if width else rows)
            offset += count * dt.itemsize
        at += rows
    return out
