"""``WORKDIR/selection/``: what the select stage commits.

``selected.parquet``: one row per selected sample, in selection order::

    uid            string
    rank           int64    0 = picked first
    forward_score  float64  the score the reverse pass started from (shifted to be >= 0)
    final_score    float64  the score when picked
    partition      int32    the partition that picked it (-1 for the baselines)

``subset.npy`` is what DataComp's resharder reads with ``--subset_file``: a 1-D numpy structured
array of dtype ``u8,u8`` (two little-endian uint64 fields: the upper and lower 64 bits of the
128-bit hex uid), sorted ascending (the resharder binary-searches it), saved with ``np.save``.
Only hex uids of at most 32 digits (DataComp's and our md5 default) can be written there.
"""

from __future__ import annotations

import io
import re

import numpy as np

from ..storage import Store, join

SELECTED = "selected.parquet"
SUBSET = "subset.npy"
DATACOMP_UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])  # == np.dtype("u8,u8") on x86/ARM
_HEX_UID = re.compile(r"^[0-9a-fA-F]{1,32}$")


def selected_table(uids: np.ndarray, forward: np.ndarray, final: np.ndarray, partition: np.ndarray):
    """selected.parquet's table; rows in selection order (rank = row number)."""
    import pyarrow as pa

    n = len(uids)
    return pa.table({
        "uid": pa.array(np.asarray(uids).astype(str) if n else np.zeros(0, str), pa.string()),
        "rank": pa.array(np.arange(n, dtype=np.int64)),
        "forward_score": pa.array(np.asarray(forward, np.float64)),
        "final_score": pa.array(np.asarray(final, np.float64)),
        "partition": pa.array(np.asarray(partition, np.int32)),
    })


def read_selected(store: Store, directory: str, columns: list[str] | None = None):
    return store.read_parquet(join(directory, SELECTED), columns=columns)


def datacomp_subset(uids) -> np.ndarray:
    """uids as DataComp's resharder reads them: dtype ``u8,u8`` (upper, lower 64 bits), sorted.

    Raises ValueError naming up to five uids that are not hex strings of at most 32 digits.
    """
    uids = [str(u) for u in uids]
    bad = [u for u in uids if not _HEX_UID.match(u)]
    if bad:
        raise ValueError(
            f"{len(bad)} uids are not 128-bit hex strings (DataComp subset files hold only those), "
            f"e.g. {', '.join(repr(u) for u in bad[:5])}"
        )
    out = np.empty(len(uids), DATACOMP_UID_DTYPE)
    for i, u in enumerate(uids):
        value = int(u, 16)
        out[i] = (value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF)
    out.sort()
    return out


def subset_npy_bytes(subset: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, subset, allow_pickle=False)
    return buf.getvalue()
