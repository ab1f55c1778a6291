"""Arrow column helpers shared by the formats: fixed-size list columns (embeddings, kNN lists)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_size_list(values: np.ndarray, dtype) -> pa.Array:
    """A [rows, size] array as a fixed_size_list column of `dtype` (numpy dtype)."""
    values = np.ascontiguousarray(values, dtype=dtype)
    rows = values.shape[0]
    size = values.shape[1] if values.ndim == 2 else 0
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(rows * size)), size)


def fixed_list_to_numpy(column, name: str, where: str) -> np.ndarray:
    """A fixed_size_list column as an [rows, size] numpy array; a column of another type or with
    nulls is an error naming the column and the file."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise ValueError(f"{where}: column {name} must be a fixed_size_list, got {arr.type}")
    if arr.null_count:
        raise ValueError(f"{where}: column {name} has {arr.null_count} null rows")
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
