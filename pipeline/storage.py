"""Filesystems, URLs and atomic commits over fsspec (local paths, s3:// through s3fs, any fsspec URL).

Every stage reads and writes through a :class:`Store`, which is built from the job's
``storage`` config section and is cheap to pickle into Ray tasks (the fsspec filesystem is
created lazily in each process).

Commits are atomic: on a local (POSIX) filesystem we write ``name.tmp-<random>`` and rename it;
on object stores a single PUT is already atomic (an object is invisible until its upload
completes), so a temporary name would only add a copy. Readers therefore never see a partial file.

Reads that stream big objects (input shards) go through :meth:`Store.open_checked`: the object's
size is known up front, so a short or empty read is told apart from the end of the data, and a
transient failure (reset connection, throttling, a read that returns less than the object holds)
is retried with exponential back-off (``storage.read_attempts``). A read that still fails raises
:class:`ReadFailedError`, never hands out fewer bytes: damaged data and a failed read are never
confused.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from fsspec.core import split_protocol

from .config import StorageConfig
from .errors import DamagedFileError

log = logging.getLogger(__name__)
T = TypeVar("T")

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


# -- retries ------------------------------------------------------------------------------------

class ReadFailedError(RuntimeError):
    """An object could not be read completely after every attempt (a retry later may succeed)."""


class ObjectChangedError(ReadFailedError):
    """An object was replaced while it was being read (its size or ETag changed)."""


# Errors that say the object is not there or not ours to read: no retry can change that.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# Libraries whose own exceptions (not translated to OSError) are network or protocol failures.
_TRANSIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "http", "requests", "s3fs", "ssl"}


def is_transient(err: BaseException) -> bool:
    """Whether a storage error may go away on retry (network, throttling, a short read)."""
    if isinstance(err, (_PERMANENT, ReadFailedError)):
        return False
    name = type(err).__name__
    if any(word in name for word in ("Credential", "ParamValidation", "NoSuchBucket")):
        return False
    if isinstance(err, (OSError, TimeoutError)):  # ConnectionError, s3fs-translated 5xx / SlowDown
        return True
    return type(err).__module__.split(".")[0] in _TRANSIENT_PACKAGES


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with full jitter (AWS's advice for throttling: spread the retries)."""

    attempts: int = 6
    base_seconds: float = 0.5
    max_seconds: float = 20.0

    def delay(self, failure: int) -> float:
        """Seconds to wait after the `failure`-th consecutive failure (1-based)."""
        cap = min(self.max_seconds, self.base_seconds * 2 ** (failure - 1))
        return random.uniform(cap / 2, cap)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, retried on transient errors; ReadFailedError naming `what` when every attempt failed."""
        for failure in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified below
                if not is_transient(err):
                    raise
                if failure == self.attempts:
                    raise ReadFailedError(f"{what}: still failing after {self.attempts} attempts "
                                          f"({type(err).__name__}: {err})") from err
                wait = self.delay(failure)
                log.warning("%s: %s: %s; retrying in %.1f s (attempt %d of %d)", what, type(err).__name__, err,
                            wait, failure + 1, self.attempts)
                time.sleep(wait)
        raise AssertionError("unreachable")


class _ShortRead(OSError):
    """Fewer bytes than the object holds came back (the connection ended early): retried."""


class CheckedReader:
    """A read-only, seekable file over one object whose size is known up front.

    ``read(n)`` returns exactly ``min(n, size - position)`` bytes or raises: a read that comes back
    short (an empty body, a connection cut mid-response) or fails transiently is retried from the
    same offset on a fresh handle, after a back-off; when the object's identity (size, ETag)
    changes in between, :class:`ObjectChangedError`. Only the real end of the object reads as EOF,
    so a parser above it (tarfile) sees damaged data only when the data is damaged.
    """

    def __init__(self, store: "Store", url: str, block_size: int | None = None):
        self.store, self.url, self.block_size = store, url, block_size
        self.policy = store.retry_policy
        info = self.policy.call(lambda: store.fs(url).info(store.path(url)), f"{url}: stat")
        self.size = int(info["size"])
        self._identity = _identity_of(info)
        self._pos = 0
        self._fh = None

    # -- file protocol ---------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        want = self.size - self._pos if n is None or n < 0 else min(n, max(0, self.size - self._pos))
        if want <= 0:
            return b""
        chunks: list[bytes] = []
        got = 0
        failures = 0
        while got < want:
            try:
                fh = self._handle()
                if fh.tell() != self._pos:
                    fh.seek(self._pos)
                data = fh.read(want - got)
                if not data:
                    raise _ShortRead(f"read returned no data at byte {self._pos} of {self.size}")
            except Exception as err:  # noqa: BLE001 - classified by is_transient
                self._drop_handle()
                if not is_transient(err):
                    raise
                failures += 1
                if failures >= self.policy.attempts:
                    raise ReadFailedError(
                        f"{self.url}: read failed at byte {self._pos} of {self.size} after {failures} attempts "
                        f"({type(err).__name__}: {err})") from err
                wait = self.policy.delay(failures)
                log.warning("%s: %s: %s at byte %d; retrying in %.1f s (attempt %d of %d)", self.url,
                            type(err).__name__, err, self._pos, wait, failures + 1, self.policy.attempts)
                time.sleep(wait)
                self._check_unchanged()
                continue
            chunks.append(data)
            got += len(data)
            self._pos += len(data)
            failures = 0  # progress: the next failure starts a fresh back-off
        return b"".join(chunks)

    def close(self) -> None:
        self._drop_handle()

    def __enter__(self) -> "CheckedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _handle(self):
        if self._fh is None:
            kwargs = {"block_size": self.block_size} if self.block_size and not is_local(self.url) else {}
            self._fh = self.store.fs(self.url).open(self.store.path(self.url), "rb", **kwargs)
        return self._fh

    def _drop_handle(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:  # noqa: BLE001 - a broken handle is being discarded anyway
                pass
            self._fh = None

    def _check_unchanged(self) -> None:
        info = self.policy.call(lambda: self.store.fs(self.url).info(self.store.path(self.url)), f"{self.url}: stat")
        if _identity_of(info) != self._identity:
            raise ObjectChangedError(f"{self.url} changed while it was being read ({self._identity} -> "
                                     f"{_identity_of(info)}); rerun to read the new version from the start")


def content_tag(info: dict[str, Any]) -> str | None:
    """The content checksum an object store's listing or HEAD gives without reading the object
    (S3's ETag, GCS's md5Hash / crc32c), unquoted; None where there is none (local files)."""
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


@contextmanager
def damaged_on_error(url: str):
    """Reading committed file `url`: a parquet reader's "not a parquet file" (ArrowInvalid: bad
    magic bytes, a footer past the end, a corrupt page) becomes a :class:`DamagedFileError` naming
    the file and the stage to recompute (transient I/O errors pass through unchanged)."""
    try:
        yield
    except DamagedFileError:
        raise
    except Exception as err:  # noqa: BLE001 - classified below
        import pyarrow as pa

        if not isinstance(err, pa.ArrowInvalid):
            raise
        from .stage_names import rerun_hint

        raise DamagedFileError(f"{url} is damaged: not a readable parquet file ({str(err).splitlines()[0]})"
                               f"{rerun_hint(url)}") from err


def _identity_of(info: dict[str, Any]) -> str:
    """What identifies an object's content without reading it: size and ETag / modification time."""
    keys = ("size", "ETag", "etag", "LastModified", "mtime", "last_modified")
    return json.dumps({k: str(info[k]) for k in keys if k in info}, sort_keys=True)


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

    def list_files(self, url: str) -> dict[str, dict[str, Any]]:
        """Every file under the folder `url`, at any depth: path relative to `url` -> ``{"size": n,
        "etag": ...}`` (the content checksum the store's listing gives for free: S3's ETag, GCS's
        md5; None locally). One recursive listing (one paginated LIST on an object store, not a HEAD
        per file); hidden files (interrupted local writes, ``.name.tmp-…``) are left out; empty when
        the folder does not exist."""
        fs = self.fs(url)
        root = self.path(url).rstrip("/")
        try:
            found = self.retry_policy.call(lambda: fs.find(root, detail=True, withdirs=False), f"{url}: list")
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for path, info in found.items():
            if info.get("type", "file") != "file" or not path.startswith(root + "/"):
                continue
            rel = path[len(root) + 1:]
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            out[rel] = {"size": int(info.get("size") or 0), "etag": content_tag(info)}
        return out

    def glob(self, url: str) -> list[str]:
        fs = self.fs(url)
        protocol, _ = split_protocol(url)
        prefix = f"{protocol}://" if protocol and protocol not in ("file", "local") else ""
        return sorted(prefix + p for p in fs.glob(self.path(url)))

    def location_problem(self, url: str, writable: bool) -> str | None:
        """Why `url` cannot serve as a folder to read (or, with `writable`, to write), else None:
        a bucket that does not exist (named), a path that is a file, a read-only parent folder.
        Object stores are asked once (HEAD bucket, retried on transient errors); nothing is written."""
        if is_local(url):
            path = self.path(url)
            if os.path.exists(path):
                if not os.path.isdir(path):
                    return f"{path} exists and is not a folder"
                probe = path
            else:
                probe = os.path.dirname(path.rstrip("/")) or "/"
                while not os.path.exists(probe):
                    probe = os.path.dirname(probe) or "/"
                if not os.path.isdir(probe):
                    return f"{probe} is a file, so {path} cannot be created"
            if writable and not os.access(probe, os.W_OK | os.X_OK):
                return f"{probe} is not writable by this user"
            return None
        fs = self.fs(url)
        bucket = self.path(url).split("/", 1)[0]
        if not hasattr(fs, "call_s3"):  # another fsspec backend: its first write or read will tell
            return None
        try:
            self.retry_policy.call(lambda: fs.call_s3("head_bucket", Bucket=bucket), f"{url}: HEAD bucket {bucket}")
        except FileNotFoundError:
            return f"bucket '{bucket}' does not exist"
        except PermissionError as err:
            return f"bucket '{bucket}' is not accessible with these credentials ({err})"
        return None

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
    @property
    def retry_policy(self) -> RetryPolicy:
        s = self.storage
        return RetryPolicy(s.read_attempts, s.retry_base_seconds, s.retry_max_seconds)

    def open(self, url: str, mode: str = "rb"):
        return self.fs(url).open(self.path(url), mode)

    def open_checked(self, url: str, block_size: int | None = None) -> CheckedReader:
        """A :class:`CheckedReader` over `url`: complete reads with retries, or ReadFailedError."""
        return CheckedReader(self, url, block_size)

    def read_bytes(self, url: str) -> bytes:
        with self.open(url, "rb") as fh:
            return fh.read()

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_bytes(url).decode())

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file (one ranged GET on an object store, not the whole object)."""
        if end <= start:
            return b""
        data = self.fs(url).cat_file(self.path(url), start=start, end=end)
        if len(data) != end - start:
            raise RuntimeError(f"{url}: read {len(data)} bytes at {start}, expected {end - start} (a truncated file)")
        return data

    def read_parquet(self, url: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        with damaged_on_error(url), self.open(url, "rb") as fh:
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

    def write_parquet(self, url: str, table, **options) -> None:
        """`options`: pyarrow.parquet.write_table's (e.g. use_dictionary)."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, **{"compression": "zstd", **options})
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
        return _identity_of(self.fs(url).info(self.path(url)))

    def node_local_copy(self, urls: list[str], namespace: str) -> list[str]:
        """Paths to open for `urls`: their own paths when local; for remote objects, copies in one
        node-local directory (files that name each other, such as a FAISS index and its
        inverted-list file, stay side by side), keyed by the URLs *and* their content identity
        (:meth:`identity`), so a replaced object is a new entry, never the stale copy."""
        if all(is_local(u) for u in urls):
            return [self.path(u) for u in urls]
        ident = json.dumps([[u, self.identity(u)] for u in urls])
        return node_local_files(namespace, ident, [basename(u) for u in urls],
                                [lambda tmp, u=u: self.fs(u).get_file(self.path(u), tmp) for u in urls])


def node_local_files(namespace: str, key: str, names: list[str], fills: list) -> list[str]:
    """Files `names` in one node-local cache directory for `key` (under `namespace`, see
    :func:`clear_node_cache`), filled once per node under a file lock: the first process on a node
    calls ``fill(path)`` for each missing file (its writes land under a temporary name, renamed
    when complete), the others wait and reuse them."""
    root = os.path.join(node_cache_root(), namespace)
    directory = os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:20])
    os.makedirs(root, exist_ok=True)
    with open(directory + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths = [os.path.join(directory, name) for name in names]
        for fill, path in zip(fills, paths):
            if not os.path.exists(path):
                _replace_atomically(path, fill)
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
