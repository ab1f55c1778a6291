"""Filesystems, URLs and atomic commits over fsspec (local paths, s3:// through s3fs, any fsspec URL).

Every stage reads and writes through a :class:`Store`, which is built from the job's
``storage`` config section and is cheap to pickle into Ray tasks (the fsspec filesystem is
created lazily in each process).

Commits are atomic: on a local (POSIX) filesystem we write ``name.tmp-<random>`` and rename it;
on object stores a single PUT is already atomic (an object is invisible until its upload
completes), so a temporary name would only add a copy. Readers therefore never see a partial file.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
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
        if is_local(url):
            def fill(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())

            _replace_atomically(self.path(url), fill)
        else:
            self.fs(url).pipe_file(self.path(url), data)

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())

    def write_parquet(self, url: str, table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(url, buf.getvalue())

    def write_file(self, url: str, fill) -> None:
        """Commit a file that ``fill(path)`` writes, atomically, without holding it in memory:
        locally it is written next to `url` and renamed; elsewhere into a local temporary file
        that is then uploaded."""
        if is_local(url):
            _replace_atomically(self.path(url), fill)
            return
        with tempfile.TemporaryDirectory(prefix="d2prune-write-") as tmp:
            path = os.path.join(tmp, basename(url))
            fill(path)
            self.fs(url).put_file(path, self.path(url))

    def write_local_file(self, url: str, local_path: str) -> None:
        """Commit a finished local file (e.g. a large tar built on local disk) to `url` atomically."""
        if is_local(url):
            _replace_atomically(self.path(url), lambda tmp: shutil.copyfile(local_path, tmp))
        else:
            self.fs(url).put_file(local_path, self.path(url))

    # -- local copies ----------------------------------------------------------------------------
    def copy_to_local(self, url: str, local_path: str) -> str:
        """`url`'s own path when it is local; else a copy at `local_path` (atomic rename, so a
        concurrent reader never sees a partial file). Returns the path to open."""
        if is_local(url):
            return self.path(url)
        _replace_atomically(local_path, lambda tmp: self.fs(url).get_file(self.path(url), tmp))
        return local_path

    def identity(self, url: str) -> str:
        """What identifies the object's content without reading it: size and ETag / modification
        time. A cache keyed by it can never serve a replaced object."""
        info = self.fs(url).info(self.path(url))
        keys = ("size", "ETag", "etag", "LastModified", "mtime", "last_modified")
        return json.dumps({k: str(info[k]) for k in keys if k in info}, sort_keys=True)

    def node_local_copy(self, urls: list[str], namespace: str) -> list[str]:
        """Paths to open for `urls`: their own paths when local; for remote objects, copies in one
        node-local directory (files that name each other, such as a FAISS index and its
        inverted-list file, stay side by side). The directory is keyed by the URLs *and* their
        content identity (:meth:`identity`), and filled once per node under a file lock: the
        first task on a node copies, the others wait and reuse the copy."""
        if all(is_local(u) for u in urls):
            return [self.path(u) for u in urls]
        ident = json.dumps([[u, self.identity(u)] for u in urls])
        root = os.path.join(node_cache_root(), namespace)
        directory = os.path.join(root, hashlib.sha256(ident.encode()).hexdigest()[:20])
        os.makedirs(root, exist_ok=True)
        with open(directory + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            paths = [os.path.join(directory, basename(u)) for u in urls]
            for url, path in zip(urls, paths):
                if not os.path.exists(path):
                    self.copy_to_local(url, path)
        return paths


def _replace_atomically(path: str, fill) -> None:
    """Create `path` by writing a hidden temporary file next to it (``fill(tmp)``) and renaming it
    over `path`: a reader sees the old state or the whole new file, never a partial one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def node_cache_root() -> str:
    """Where node-local copies live ($D2PRUNE_CACHE_DIR, else the temp dir)."""
    return os.environ.get("D2PRUNE_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "d2prune-cache")


def clear_node_cache(namespace: str) -> None:
    """Remove this node's copies under `namespace` (a stage calls it once its output is committed)."""
    shutil.rmtree(os.path.join(node_cache_root(), namespace), ignore_errors=True)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
