"""DataComp's files as its ``download_upstream.py`` + img2dataset lay them out, read as they are.

**Metadata** (``metadata/<scale>/<md5>.parquet`` + ``<md5>.npz``, any number, any names): the
parquet has one row per pool sample (``uid``, ``url``, ``text``, ``original_width``,
``original_height``, ``clip_b32_similarity_score``, ``clip_l14_similarity_score``, ``sha256``,
...); the ``.npz`` beside it holds float16 arrays ``b32_img``, ``b32_txt``, ``l14_img``,
``l14_txt`` whose rows are the parquet's rows, in order. One file holds many shards' worth of
rows, in no relation to how img2dataset later cut the shards.

**Shards** (``shards/{00000000..}.tar`` + ``.parquet`` + ``_stats.json``): each sample's json
carries its ``uid`` (the metadata's), ``url``, ``caption``, ``original_width``,
``original_height``, ``sha256``; samples whose download failed are in the metadata but in no tar.

**uids**: DataComp's are 32-digit hex (the md5 of the url); ``subset.npy`` stores them as two
uint64, and DataComp's resharder parses the json ``uid`` of every sample it reads the same way
(:func:`uid_notes` says when a pool's uids break that).

Only what a join needs is read: :func:`iter_metadata_chunks` streams the parquet and the npz
arrays together in row chunks (npz members are read sequentially, whether stored or deflated),
so a metadata file never has to fit in memory.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..storage import Store, basename, expand_braces, join
from .webdataset import fallback_uid, listing

UID_FALLBACK = "uid_fallback"  # the sample's json has no uid: d2prune used md5(shard/key)
UID_NOT_HEX = "uid_not_32_hex"  # the json uid is not 32 hex digits
_DATACOMP_UID = re.compile(r"^[0-9a-fA-F]{32}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_GLOB = re.compile(r"[*?\[]")


class MetadataError(ConfigError):
    """Precomputed metadata that cannot be used as given (missing file, column or array, rows
    that do not line up): a wrong input, found before any work (exit 2)."""


# -- uids and the sample json ---------------------------------------------------------------------

def uid_notes(uids: list[str], keys: list[str], shard_url: str) -> dict[str, int]:
    """How many of a shard's uids DataComp's resharder cannot select with ``subset.npy``: uids
    d2prune made up because the json had none (:func:`~.webdataset.fallback_uid`), and uids that
    are not 32 hex digits. Only non-zero counts."""
    notes: Counter = Counter()
    for uid, key in zip(uids, keys):
        if uid == fallback_uid(shard_url, key):
            notes[UID_FALLBACK] += 1
        elif not _DATACOMP_UID.match(uid):
            notes[UID_NOT_HEX] += 1
    return dict(notes)


def subset_file_warning(notes: dict[str, int]) -> str | None:
    """Why ``subset.npy`` will not work with DataComp's resharder for (some of) this pool, or None."""
    parts = []
    if notes.get(UID_FALLBACK):
        parts.append(
            f"{notes[UID_FALLBACK]} samples have no 'uid' in their json, so d2prune identified them by "
            "md5(shard name/key); DataComp's resharder reads the uid from each sample's json and skips "
            "samples without one, so subset.npy cannot select them"
        )
    if notes.get(UID_NOT_HEX):
        parts.append(
            f"{notes[UID_NOT_HEX]} samples have a json uid that is not 32 hex digits; subset.npy stores "
            "uids as 128-bit integers parsed from hex (as the resharder parses each json uid), so these "
            "cannot be written there (the select stage then writes no subset.npy)"
        )
    if not parts:
        return None
    return "; ".join(parts) + ". selected.parquet and the write stage's output are complete either way."


def valid_sha256(values: list) -> tuple[list[str | None], int]:
    """The metadata's ``sha256`` values as the embedding parts store them: lowercased when 64 hex
    digits, else None; and how many non-empty values were not 64 hex digits (counted in the stats)."""
    out, bad = [], 0
    for v in values:
        if v is None or v == "":
            out.append(None)
        elif isinstance(v, str) and _SHA256.match(v):
            out.append(v.lower())
        else:
            out.append(None)
            bad += 1
    return out, bad


def json_original_size(meta: dict[str, Any] | None) -> tuple[int, int] | None:
    """(width, height) of the image before img2dataset resized it, from the sample's json
    (``original_width``/``original_height``), or None when the json does not say."""
    if not meta:
        return None
    width, height = meta.get("original_width"), meta.get("original_height")
    try:
        width, height = int(width), int(height)
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def header_size(image_bytes: bytes | None) -> tuple[int, int] | None:
    """(width, height) from the image's header (PIL opens lazily: no pixels are decoded), or None."""
    if not image_bytes:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - PIL raises many types; an unreadable header is "unknown"
        return None
    return (int(width), int(height)) if width > 0 and height > 0 else None


# -- finding the metadata files -------------------------------------------------------------------

def _expand(store: Store, spec: str | list[str], suffix: str, what: str) -> list[str]:
    """Files named by `spec`: a file, a brace pattern, a glob, a directory (its ``*<suffix>``
    files, else those of its direct subfolders, e.g. ``metadata/`` -> ``metadata/small/``), or a
    list of these; sorted, each once."""
    found: dict[str, None] = {}
    for item in [spec] if isinstance(spec, str) else list(spec):
        for url in expand_braces(item):
            if _GLOB.search(url):
                urls = [u for u in store.glob(url) if u.endswith(suffix)]
            elif url.endswith(suffix):
                urls = [url]
            else:
                urls = store.glob(join(url, "*" + suffix)) or store.glob(join(url, "*", "*" + suffix))
            if not urls:
                raise MetadataError(f"embed.precomputed.{what}: {url!r} names no {suffix} files")
            for u in urls:
                found.setdefault(u, None)
    return sorted(found)


def _stem(url: str, suffix: str) -> str:
    name = basename(url)
    return name.removesuffix(suffix)


def metadata_files(store: Store, metadata: str | list[str],
                   embeddings: str | list[str] | None = None) -> list[tuple[str, str]]:
    """(parquet, npz) pairs: every metadata parquet named by `metadata`, with the ``.npz`` of the
    same name beside it, or of the same name among the files `embeddings` names."""
    parquets = _expand(store, metadata, ".parquet", "metadata")
    if embeddings is None:
        return [(p, p[: -len(".parquet")] + ".npz") for p in parquets]
    by_stem: dict[str, str] = {}
    for url in _expand(store, embeddings, ".npz", "embeddings"):
        by_stem.setdefault(_stem(url, ".npz"), url)
    unmatched = [p for p in parquets if _stem(p, ".parquet") not in by_stem]
    if unmatched:
        raise MetadataError(f"{len(unmatched)} metadata files have no .npz of the same name among "
                            f"embed.precomputed.embeddings:\n{listing(unmatched)}")
    return [(p, by_stem[_stem(p, ".parquet")]) for p in parquets]


# -- the npz arrays -------------------------------------------------------------------------------

def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"unsupported .npy format version {version}")


@dataclass(frozen=True)
class MetadataInfo:
    parquet: str
    npz: str
    rows: int
    columns: tuple[str, ...]
    dims: dict[str, int]  # npz key -> vector width


def parquet_footer(store: Store, parquet: str) -> tuple[int, tuple[str, ...]]:
    """Rows and column names of a metadata parquet, from its footer (MetadataError when missing)."""
    import pyarrow.parquet as pq

    try:
        with store.open(parquet, "rb") as fh:
            meta = pq.ParquetFile(fh)
            return int(meta.metadata.num_rows), tuple(meta.schema_arrow.names)
    except FileNotFoundError:
        raise MetadataError(f"metadata file {parquet} not found") from None


def inspect_metadata(store: Store, parquet: str, npz: str, keys: list[str]) -> MetadataInfo:
    """Rows and columns of a metadata parquet (its footer) and the width of each npz array in
    `keys` (its .npy headers), checked to line up: every array is 2-D with one row per parquet row."""
    rows, columns = parquet_footer(store, parquet)
    dims: dict[str, int] = {}
    try:
        with store.open(npz, "rb") as fh, zipfile.ZipFile(fh) as zf:
            names = set(zf.namelist())
            for key in keys:
                if key + ".npy" not in names:
                    have = sorted(n[: -len(".npy")] for n in names if n.endswith(".npy"))
                    raise MetadataError(f"{npz} has no array {key!r} (it has {have})")
                with zf.open(key + ".npy") as member:
                    shape, _, _ = _npy_header(member)
                if len(shape) != 2 or shape[0] != rows:
                    raise MetadataError(f"{npz}: array {key!r} has shape {shape}, but {parquet} has {rows} rows "
                                        "(the arrays' rows must be the parquet's rows)")
                dims[key] = int(shape[1])
    except FileNotFoundError:
        raise MetadataError(f"embedding file {npz} not found (expected beside {parquet})") from None
    except zipfile.BadZipFile as err:
        raise MetadataError(f"{npz} is not an .npz file ({err})") from None
    if "uid" not in columns:
        raise MetadataError(f"metadata file {parquet} has no 'uid' column (columns: {list(columns)})")
    return MetadataInfo(parquet, npz, int(rows), columns, dims)


def inspect_each(inspect, items: list, what: str, max_workers: int = 16) -> list:
    """`inspect(item)` of every item (threads: a footer and a few headers each), raising one
    MetadataError naming every bad one (`what`: the kind of files, for the message)."""
    def one(item):
        try:
            return inspect(item)
        except MetadataError as err:
            return str(err)

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items)))) as pool:
        results = list(pool.map(one, items))
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise MetadataError(f"{len(bad)} of {len(items)} {what} cannot be used:\n{listing(bad)}")
    return results


def inspect_all(store: Store, pairs: list[tuple[str, str]], keys: list[str],
                max_workers: int = 16) -> list[MetadataInfo]:
    """:func:`inspect_metadata` of every pair (one footer and the npz directory each), raising one
    MetadataError naming every bad file, and checking all files agree on widths."""
    results = inspect_each(lambda pair: inspect_metadata(store, pair[0], pair[1], keys), pairs,
                           "precomputed metadata files", max_workers)
    first = results[0]
    for info in results[1:]:
        if info.dims != first.dims:
            raise MetadataError(f"{info.npz} has array widths {info.dims}, {first.npz} has {first.dims}")
    return results


def _read_exactly(member, nbytes: int) -> bytes:
    chunks, left = [], nbytes
    while left:
        data = member.read(left)
        if not data:
            raise ValueError(f"npz array ends {left} bytes early")
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def iter_metadata_chunks(store: Store, parquet: str, npz: str, columns: list[str], keys: list[str],
                         chunk_rows: int = 16384) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """Stream one metadata file: (a pyarrow RecordBatch of `columns`, {key: float16/32 [rows, d]})
    per chunk of at most `chunk_rows` rows, the arrays' rows being the batch's rows. Memory: one
    chunk, whatever the file's size."""
    import pyarrow.parquet as pq

    with store.open(parquet, "rb") as pfh, store.open(npz, "rb") as nfh, zipfile.ZipFile(nfh) as zf:
        members, layouts = {}, {}
        try:
            for key in keys:
                member = zf.open(key + ".npy")
                members[key] = member
                shape, fortran, dtype = _npy_header(member)
                if fortran:
                    # rows are not contiguous in Fortran order: read the array whole (this file only)
                    members[key] = None
                    member.close()
                    with zf.open(key + ".npy") as whole:
                        layouts[key] = np.load(whole, allow_pickle=False)
                else:
                    layouts[key] = (shape, dtype)
            position = 0
            for batch in pq.ParquetFile(pfh).iter_batches(batch_size=chunk_rows, columns=columns):
                n = batch.num_rows
                arrays = {}
                for key in keys:
                    layout = layouts[key]
                    if isinstance(layout, np.ndarray):
                        arrays[key] = layout[position:position + n]
                        continue
                    shape, dtype = layout
                    width = shape[1]
                    raw = _read_exactly(members[key], n * width * dtype.itemsize)
                    arrays[key] = np.frombuffer(raw, dtype=dtype).reshape(n, width)
                position += n
                yield batch, arrays
        finally:
            for member in members.values():
                if member is not None:
                    member.close()
