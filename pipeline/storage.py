"""Filesystems, URLs and atomic commits over fsspec (local paths, s3:// through s3fs, any fsspec URL).

Every stage reads and writes through a :class:`Store`, which is built from the job's
``storage`` config section and is cheap to pickle into Ray tasks (the fsspec filesystem is
created lazily in each process).

Commits are atomic: on a local (POSIX) filesystem we write ``name.tmp-<random>`` and rename it;
on object stores a single PUT is already atomic (an object is invisible until its upload
completes), so a temporary name would only add a copy. Readers therefore never see a partial file.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from typing import Any, Iterable

import fsspec
from fsspec.core import split_protocol

from .config import StorageConfig

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_ALT = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand WebDataset-style brace patterns left to right: ``{00000..00009}`` (zero-padded
    ranges) and ``{a,b}`` alternatives."""
    matches = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_ALT.search(pattern)) if m]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())
    head, tail = pattern[: match.start()], pattern[match.end():]
    if match.re is _BRACE_RANGE:
        lo, hi = match.group(1), match.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"brace range {match.group(0)} in {pattern!r} is empty (end before start)")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = match.group(1).split(",")
    return [url for choice in choices for url in expand_braces(head + choice + tail)]


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """A URL, brace pattern or list of either, expanded to a de-duplicated ordered list."""
    items = [spec] if isinstance(spec, str) else list(spec)
    seen: dict[str, None] = {}
    for item in items:
        for url in expand_braces(item):
            seen.setdefault(url, None)
    return list(seen)


def join(base: str, *parts: str) -> str:
    """Join URL/path components with '/' (works for local paths and URLs alike)."""
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def is_local(url: str) -> bool:
    protocol, _ = split_protocol(url)
    return protocol in (None, "file", "local")


class Store:
    """fsspec access configured from the job's storage section. Picklable."""

    def __init__(self, storage: StorageConfig | None = None):
        self.storage = storage or StorageConfig()
        self._fs_cache: dict[str, fsspec.AbstractFileSystem] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"storage": self.storage}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.storage = state["storage"]
        self._fs_cache = {}

    # -- filesystems -----------------------------------------------------------------------------
    def storage_options(self, protocol: str | None) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict[str, Any] = {"anon": self.storage.anon, "use_listings_cache": False}
        client_kwargs: dict[str, Any] = {}
        if self.storage.endpoint_url:
            client_kwargs["endpoint_url"] = self.storage.endpoint_url
        if self.storage.region:
            client_kwargs["region_name"] = self.storage.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        if self.storage.profile:
            opts["profile"] = self.storage.profile
        return opts

    def fs(self, url: str) -> fsspec.AbstractFileSystem:
        protocol, _ = split_protocol(url)
        protocol = protocol or "file"
        if protocol not in self._fs_cache:
            self._fs_cache[protocol] = fsspec.filesystem(protocol, **self.storage_options(protocol))
        return self._fs_cache[protocol]

    def path(self, url: str) -> str:
        """The filesystem-internal path of a URL (bucket/key for s3, absolute path locally)."""
        return self.fs(url)._strip_protocol(url)

    def pyarrow_fs(self, url: str):
        """A pyarrow filesystem for Ray Data / pyarrow readers, sharing this store's settings."""
        import pyarrow.fs as pafs

        if is_local(url):
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs(url)))

    # -- queries ---------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        return self.fs(url).exists(self.path(url))

    def size(self, url: str) -> int:
        return int(self.fs(url).size(self.path(url)))

    def ls(self, url: str) -> list[str]:
        """Names (not paths) directly under a directory URL; empty when it does not exist."""
        fs = self.fs(url)
        path = self.path(url)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(basename(e) for e in entries)

    def glob(self, url: str) -> list[str]:
        fs = self.fs(url)
        protocol, _ = split_protocol(url)
        prefix = f"{protocol}://" if protocol and protocol not in ("file", "local") else ""
        return sorted(prefix + p for p in fs.glob(self.path(url)))

    def makedirs(self, url: str) -> None:
        if is_local(url):
            os.makedirs(self.path(url), exist_ok=True)
        # object stores have no directories; a key's prefix exists once an object is under it

    def rm(self, url: str, recursive: bool = False) -> None:
        fs = self.fs(url)
        path = self.path(url)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    # -- reading ---------------------------------------------------------------------------------
    def open(self, url: str, mode: str = "rb"):
        return self.fs(url).open(self.path(url), mode)

    def read_bytes(self, url: str) -> bytes:
        with self.open(url, "rb") as fh:
            return fh.read()

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_bytes(url).decode())

    def read_parquet(self, url: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        with self.open(url, "rb") as fh:
            return pq.read_table(fh, columns=columns)

    # -- atomic writes ---------------------------------------------------------------------------
    def write_bytes(self, url: str, data: bytes) -> None:
        """Write `data` to `url` atomically: readers see the old state or the whole new file."""
        fs = self.fs(url)
        path = self.path(url)
        if is_local(url):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs.pipe_file(path, data)

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())

    def write_parquet(self, url: str, table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(url, buf.getvalue())

    def write_local_file(self, url: str, local_path: str) -> None:
        """Commit a finished local file (e.g. a large tar built on local disk) to `url` atomically."""
        if is_local(url):
            path = self.path(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                import shutil

                shutil.copyfile(local_path, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs(url).put_file(local_path, self.path(url))


def fixed_list_to_numpy(column, name: str, where: str):
    """A fixed_size_list column (embeddings, kNN lists) as an [rows, size] numpy array; a column of
    another type or with nulls is an error naming the column and the file."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise ValueError(f"{where}: column {name} must be a fixed_size_list, got {arr.type}")
    if arr.null_count:
        raise ValueError(f"{where}: column {name} has {arr.null_count} null rows")
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
