"""Reading WebDataset shards (the DataComp / img2dataset layout), robust to bad data.

A shard is a tar whose members are grouped into samples by key (WebDataset rule: the member path
up to the first '.' of its basename; the rest is the extension): ``000123.jpg``, ``000123.txt``,
``000123.json``. Every stage that touches the pool reads it through :func:`iter_shard_samples`, so
the embed stage and the write stage agree exactly on what a sample is, what its uid is and which
samples are skipped (and why).

Why not ``ray.data.read_webdataset``: it hides what we need. It gives no per-shard identity of a
row that survives repartitioning, fails the whole read on a truncated tar instead of keeping what
was readable, has no hook to count corrupt members per shard, and decodes members eagerly (the
write stage needs the original bytes of kept samples, untouched). So the Ray Data pipelines here
start from one row per shard (``ray.data.from_items``) and a map task opens each tar with
:mod:`tarfile` through the job's :class:`~pipeline.storage.Store` (s3fs / local / any fsspec URL)
and *streams* its samples out as they are read: memory per task is one output batch, whatever the
shard or pool size, and per-shard counts travel with the rows.

Skip reasons (counted per shard, see :data:`SKIP_REASONS`):

``missing_image``      no member with one of ``input.image_exts``
``undecodable_image``  image bytes that PIL cannot decode (found by the decoding stage)
``missing_caption``    no caption member, an empty caption, or one that is not UTF-8
``bad_metadata``       a json member that is not a JSON object (its uid cannot be trusted)
``duplicate_uid``      a uid already seen earlier in the shard (or, in the embed stage, in an
                       earlier shard); the first occurrence wins
``truncated_tar``      the tar ends early or has a corrupt header: counted once per shard; the
                       samples before the damage are kept, the last sample read before the cut
                       is dropped (some of its members may be lost, its json/uid among them),
                       and the samples after it cannot be counted (they are unreadable)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from .config import InputConfig
from .storage import Store, basename, expand_urls

log = logging.getLogger(__name__)

MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
BAD_METADATA = "bad_metadata"
DUPLICATE_UID = "duplicate_uid"
TRUNCATED_TAR = "truncated_tar"
SKIP_REASONS = (MISSING_IMAGE, UNDECODABLE_IMAGE, MISSING_CAPTION, BAD_METADATA, DUPLICATE_UID, TRUNCATED_TAR)

# WebDataset's own key/extension split (webdataset.tariterators.base_plus_ext).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_BLOCK = tarfile.BLOCKSIZE
# s3fs reads ahead this much per request; a shard is read front to back, so big blocks are cheap.
READ_BLOCK_SIZE = 16 * 2**20


class ShardError(RuntimeError):
    """Input shards that are missing or unreadable (raised before any work starts)."""


@dataclass
class Sample:
    """One sample of a shard, with its members' original bytes.

    ``problem`` is None for a usable sample, else one of :data:`SKIP_REASONS`. A sample with
    ``problem == "truncated_tar"`` is not a real sample but the marker that the rest of the shard
    is unreadable (it carries the partial sample's key and members, if any); it is always last.
    """

    shard: str
    index: int  # position of the sample in its shard (tar order), 0-based
    key: str
    uid: str | None
    members: dict[str, bytes] = field(default_factory=dict)  # extension (as stored) -> raw bytes
    image_ext: str | None = None
    caption: str | None = None
    meta: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def image_bytes(self) -> bytes | None:
        return self.members.get(self.image_ext) if self.image_ext else None


def fallback_uid(shard_url: str, key: str) -> str:
    """uid of a sample whose json has none: md5 hex of "<shard basename>/<key>" (DataComp-like)."""
    return hashlib.md5(f"{basename(shard_url)}/{key}".encode()).hexdigest()


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, or None for names without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def _build_sample(shard: str, index: int, key: str, members: dict[str, bytes], cfg: InputConfig) -> Sample:
    sample = Sample(shard=shard, index=index, key=key, uid=None, members=members)
    lower = {ext.lower(): ext for ext in members}
    meta_ext = lower.get(cfg.meta_ext.lower())
    if meta_ext is not None:
        try:
            meta = json.loads(members[meta_ext].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            sample.problem = BAD_METADATA
            return sample
        sample.meta = meta
        uid = meta.get("uid")
        if uid is not None and str(uid) != "":
            sample.uid = str(uid)
    if sample.uid is None:
        sample.uid = fallback_uid(shard, key)
    sample.image_ext = next((lower[e.lower()] for e in cfg.image_exts if e.lower() in lower), None)
    if sample.image_ext is None:
        sample.problem = MISSING_IMAGE
        return sample
    caption_ext = lower.get(cfg.caption_ext.lower())
    caption = None
    if caption_ext is not None:
        try:
            caption = members[caption_ext].decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = None
    if not caption:
        sample.problem = MISSING_CAPTION
        return sample
    sample.caption = caption
    return sample


def _archive_ends_cleanly(tf: tarfile.TarFile) -> bool:
    """True when the block after the last member is a zero (end-of-archive) block.

    tarfile ends iteration *silently* on a header cut short or corrupt after the first member;
    this check is what tells a truncated shard from a complete one.
    """
    fileobj = tf.fileobj
    fileobj.seek(tf.offset)
    block = fileobj.read(_BLOCK)
    return len(block) == _BLOCK and block.count(0) == _BLOCK


def iter_tar_groups(fileobj) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Yield ``(key, {ext: bytes}, None)`` for each group of consecutive members sharing a key;
    if the archive is damaged, the last item is ``(partial_key, partial_members, error_message)``.

    Reads sequentially through a seekable file (s3fs files are, via range requests), holding one
    sample's members at a time.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:*")
        while True:
            info = tf.next()
            if info is None:
                break
            tf.members.clear()  # tarfile keeps every TarInfo; we stream, so drop them
            if not info.isfile():
                continue
            parts = split_key(info.name)
            if parts is None:
                continue
            member_key, ext = parts
            if member_key != key:
                # the previous sample is complete as soon as a new key starts: hand it out before
                # reading data that may turn out truncated
                if key is not None:
                    yield key, members, None
                key, members = member_key, {}
            data = tf.extractfile(info).read()
            # a repeated extension within one sample: keep the first (WebDataset would raise)
            members.setdefault(ext, data)
        clean = _archive_ends_cleanly(tf)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, ValueError) as err:
        # damaged *data*: a cut or corrupt archive (EOFError/BadGzipFile: compressed streams cut
        # short; ValueError: malformed numeric header fields). Other I/O errors (network, auth)
        # propagate: a transient failure must fail the task, never shorten a shard silently.
        yield key or "", members, f"{type(err).__name__}: {err}"
        return
    if not clean:
        yield key or "", members, "archive ends without an end-of-archive block (truncated or corrupt header)"
        return
    if key is not None:
        yield key, members, None


def iter_shard_samples(
    store: Store, url: str, cfg: InputConfig, dedupe: bool = True
) -> Iterator[Sample]:
    """Stream the samples of one shard in tar order, each with ``problem`` set when unusable.

    With ``dedupe`` a usable sample whose uid was already seen in this shard gets
    ``problem="duplicate_uid"`` (the first occurrence wins). Cross-shard duplicates are the
    caller's business (the embed stage keeps the occurrence in the earliest shard).
    """
    seen: set[str] = set()
    index = 0
    with store.fs(url).open(store.path(url), "rb", block_size=READ_BLOCK_SIZE) as fh:
        for key, members, error in iter_tar_groups(fh):
            if error is not None:
                log.warning("shard %s is damaged after %d samples (%s): keeping the samples before the damage",
                            url, index, error)
                yield Sample(shard=url, index=index, key=key, uid=None, members=members, problem=TRUNCATED_TAR)
                return
            sample = _build_sample(url, index, key, members, cfg)
            if dedupe and sample.problem is None:
                if sample.uid in seen:
                    sample.problem = DUPLICATE_UID
                else:
                    seen.add(sample.uid)
            yield sample
            index += 1


# -- images -------------------------------------------------------------------------------------

class ImageDecodeError(ValueError):
    pass


def decode_image(data: bytes):
    """Decode image bytes to an RGB PIL image, fully loaded; ImageDecodeError when PIL cannot."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # a decompression-bomb *warning* is a size hint, not an error; errors still raise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image
    except Exception as err:  # PIL raises a zoo of types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(f"{type(err).__name__}: {err}") from None


# -- shard lists --------------------------------------------------------------------------------

def shard_urls(cfg: InputConfig) -> list[str]:
    """The job's input shards, in the order that defines part numbers (part-NNNNN = index)."""
    urls = expand_urls(cfg.shards)
    if not urls:
        raise ShardError("input.shards expands to no shard URLs")
    return urls


def _probe(store: Store, url: str) -> str | None:
    """None when `url` is a readable tar (or compressed tar), else why not."""
    try:
        head = store.fs(url).cat_file(store.path(url), start=0, end=_BLOCK)
    except FileNotFoundError:
        return "not found"
    except PermissionError as err:
        return f"permission denied ({err})"
    except Exception as err:  # network, bad bucket, ...: report, don't crash the probe
        return f"unreadable ({type(err).__name__}: {err})"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return None  # compressed tar: checked when read
    if len(head) < _BLOCK:
        return f"not a tar archive ({len(head)} bytes)"
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        return f"not a tar archive ({err})"
    return None


def listing(lines: list[str], limit: int = 20) -> str:
    """Indented lines for an error message naming bad inputs: the first `limit`, then a count."""
    shown = "\n".join(f"  {line}" for line in lines[:limit])
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return shown + more


def verify_shards(store: Store, urls: list[str], max_workers: int = 16) -> None:
    """Check up front that every shard exists and starts with a tar header: one small ranged read
    per shard, in parallel threads. Raises ShardError naming every bad shard (the first 20)."""
    if not urls:
        raise ShardError("no input shards given")
    with ThreadPoolExecutor(max_workers=min(max_workers, len(urls))) as pool:
        problems = list(pool.map(lambda u: _probe(store, u), urls))
    bad = [f"{u}: {p}" for u, p in zip(urls, problems) if p is not None]
    if bad:
        raise ShardError(f"{len(bad)} of {len(urls)} input shard(s) missing or unreadable:\n{listing(bad)}")


def shards_dataset(shards: list[tuple[int, str]]):
    """A Ray Dataset with one row ``{"shard_index", "shard"}`` per shard and one block per row, so
    each downstream map task reads exactly one shard (the unit of parallelism and of commit)."""
    import ray.data

    items = [{"shard_index": int(i), "shard": url} for i, url in shards]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))
