"""LAION / clip-retrieval embedding folders, read as they are.

Layout (what ``clip-retrieval inference`` writes and LAION released for its pools)::

    ROOT/img_emb/img_emb_{i}.npy           float16/32 [rows_i, d]   image embeddings
    ROOT/text_emb/text_emb_{i}.npy         float16/32 [rows_i, d]   text embeddings
    ROOT/metadata/metadata_{i}.parquet     rows_i rows               url, caption, similarity, ...

Row r of one file of index i is row r of the other two. Files are paired by their index ``i``
(numerically: ``_10`` after ``_9``). A metadata file with no image or text file of its index, or
whose arrays have another number of rows, is a :class:`~.datacomp.MetadataError` naming the file,
found from the parquet footers and .npy headers before any work.

:func:`iter_laion_chunks` streams one index's three files together in row chunks (the .npy arrays
are read sequentially after their header), so a file never has to fit in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..storage import Store, basename, join
from .datacomp import MetadataError, _npy_header, _read_exactly, inspect_each, parquet_footer
from .webdataset import listing

IMAGE_KEY = "img"  # the arrays' names in a chunk (pipeline.embed.metadata_only normalises them)
TEXT_KEY = "txt"
_INDEX = re.compile(r"_(\d+)\.(?:npy|parquet)$")


@dataclass(frozen=True)
class LaionFile:
    parquet: str
    image: str
    text: str
    rows: int
    columns: tuple[str, ...]
    dim: int


def _by_index(store: Store, folder: str, prefix: str, suffix: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for url in store.glob(join(folder, f"{prefix}_*{suffix}")):
        match = _INDEX.search(basename(url))
        if match and basename(url) == f"{prefix}_{match.group(1)}{suffix}":
            out[int(match.group(1))] = url
    return out


def laion_files(store: Store, root: str) -> list[tuple[str, str, str]]:
    """(metadata parquet, image .npy, text .npy) per index under `root`, in index order; a
    metadata file missing either array file is an error naming it."""
    parquets = _by_index(store, join(root, "metadata"), "metadata", ".parquet")
    images = _by_index(store, join(root, "img_emb"), "img_emb", ".npy")
    texts = _by_index(store, join(root, "text_emb"), "text_emb", ".npy")
    if not parquets:
        raise MetadataError(f"embed.precomputed.metadata: {root} has no metadata/metadata_{{i}}.parquet files "
                            "(layout 'laion': img_emb/, text_emb/, metadata/)")
    missing = [f"{join(root, 'img_emb', f'img_emb_{i}.npy')} (for {parquets[i]})" for i in sorted(parquets)
               if i not in images]
    missing += [f"{join(root, 'text_emb', f'text_emb_{i}.npy')} (for {parquets[i]})" for i in sorted(parquets)
                if i not in texts]
    if missing:
        raise MetadataError(f"{len(missing)} embedding files of the laion layout are missing:\n{listing(missing)}")
    return [(parquets[i], images[i], texts[i]) for i in sorted(parquets)]


def _npy_shape(store: Store, url: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        with store.open(url, "rb") as fh:
            return _npy_header(fh)
    except FileNotFoundError:
        raise MetadataError(f"embedding file {url} not found") from None
    except ValueError as err:
        raise MetadataError(f"{url} is not an .npy file ({err})") from None


def inspect_laion(store: Store, parquet: str, image: str, text: str) -> LaionFile:
    """Rows and columns of one index's metadata (its footer) and its arrays' shapes (their
    headers), checked to line up row for row."""
    rows, columns = parquet_footer(store, parquet)
    dims = []
    for url in (image, text):
        shape, fortran, _ = _npy_shape(store, url)
        if len(shape) != 2 or fortran:
            raise MetadataError(f"{url}: array of shape {shape}{' (Fortran order)' if fortran else ''}, expected "
                                "[rows, d] in C order")
        if shape[0] != rows:
            raise MetadataError(f"{url} has {shape[0]} rows, but {parquet} has {rows} (row r of one file must be row "
                                "r of the others)")
        dims.append(int(shape[1]))
    if dims[0] != dims[1]:
        raise MetadataError(f"{image} is {dims[0]} wide, {text} {dims[1]}: image and text vectors must be of one model")
    return LaionFile(parquet, image, text, int(rows), columns, dims[0])


def inspect_laion_all(store: Store, triples: list[tuple[str, str, str]], max_workers: int = 16) -> list[LaionFile]:
    """:func:`inspect_laion` of every index, one MetadataError naming every bad file."""
    results = inspect_each(lambda triple: inspect_laion(store, *triple), triples, "laion embedding files", max_workers)
    for info in results[1:]:
        if info.dim != results[0].dim:
            raise MetadataError(f"{info.image} is {info.dim} wide, {results[0].image} {results[0].dim}")
    return results


def iter_laion_chunks(store: Store, parquet: str, image: str, text: str, columns: list[str],
                      chunk_rows: int = 16384) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """Stream one index: (a pyarrow RecordBatch of `columns`, {IMAGE_KEY: [n, d], TEXT_KEY: [n, d]})
    per chunk of at most `chunk_rows` rows. Memory: one chunk."""
    import pyarrow.parquet as pq

    with store.open(parquet, "rb") as pfh, store.open(image, "rb") as ifh, store.open(text, "rb") as tfh:
        layouts = {}
        for key, fh in ((IMAGE_KEY, ifh), (TEXT_KEY, tfh)):
            shape, _, dtype = _npy_header(fh)  # leaves fh at the first row
            layouts[key] = (fh, shape[1], dtype)
        for batch in pq.ParquetFile(pfh).iter_batches(batch_size=chunk_rows, columns=columns):
            n = batch.num_rows
            arrays = {key: np.frombuffer(_read_exactly(fh, n * width * dtype.itemsize), dtype=dtype).reshape(n, width)
                      for key, (fh, width, dtype) in layouts.items()}
            yield batch, arrays
