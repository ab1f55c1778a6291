"""WebDataset shards (the DataComp / img2dataset layout) as samples, robust to bad data.

A shard is a tar whose members are grouped into samples by key (:mod:`.tar`): ``000123.jpg``,
``000123.txt``, ``000123.json``. Every stage that touches the pool (and the report) reads it
through :func:`iter_shard_samples`, so they agree exactly on what a sample is, what its uid is and
which samples are skipped (and why).

Why not ``ray.data.read_webdataset``: it hides what we need. It gives no per-shard identity of a
row that survives repartitioning, fails the whole read on a truncated tar instead of keeping what
was readable, has no hook to count corrupt members per shard, and decodes members eagerly (the
write stage needs the original bytes of kept samples, untouched). So the Ray Data pipelines here
start from one row per shard (``ray.data.from_items``) and a map task opens each tar with
:func:`.tar.iter_tar_groups` through the job's :class:`~pipeline.storage.Store` (s3fs / local / any fsspec URL)
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

import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..config import InputConfig
from ..errors import ConfigError
from ..storage import Store, basename, expand_urls
from .tar import BLOCK, iter_tar_groups, looks_like_tar

log = logging.getLogger(__name__)

MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
BAD_METADATA = "bad_metadata"
DUPLICATE_UID = "duplicate_uid"
TRUNCATED_TAR = "truncated_tar"
SKIP_REASONS = (MISSING_IMAGE, UNDECODABLE_IMAGE, MISSING_CAPTION, BAD_METADATA, DUPLICATE_UID, TRUNCATED_TAR)

# s3fs reads ahead this much per request; a shard is read front to back, so big blocks are cheap.
READ_BLOCK_SIZE = 16 * 2**20


class ShardError(ConfigError):
    """Input shards that are missing or not tar archives, found before any work starts (a wrong
    input location: no retry can fix it, exit 2)."""


class ShardReadError(RuntimeError):
    """Input shards that could not be read for a reason a retry may fix (network, throttling)."""


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


_TRANSIENT = "unreadable "


def _probe(store: Store, url: str) -> str | None:
    """None when `url` is a readable tar (or compressed tar), else why not."""
    try:
        head = store.fs(url).cat_file(store.path(url), start=0, end=BLOCK)
    except FileNotFoundError:
        return "not found"
    except PermissionError as err:
        return f"permission denied ({err})"
    except Exception as err:  # network, bad bucket, ...: report, don't crash the probe
        return f"{_TRANSIENT}({type(err).__name__}: {err})"
    return looks_like_tar(head)


def listing(lines: list[str], limit: int = 20) -> str:
    """Indented lines for an error message naming bad inputs: the first `limit`, then a count."""
    shown = "\n".join(f"  {line}" for line in lines[:limit])
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return shown + more


def verify_shards(store: Store, urls: list[str], max_workers: int = 16) -> None:
    """Check up front that every shard exists and starts with a tar header: one small ranged read
    per shard, in parallel threads. Raises ShardError naming every bad shard (the first 20), or
    ShardReadError when some could not be read for a reason a retry may fix."""
    if not urls:
        raise ShardError("no input shards given")
    with ThreadPoolExecutor(max_workers=min(max_workers, len(urls))) as pool:
        problems = list(pool.map(lambda u: _probe(store, u), urls))
    bad = [f"{u}: {p}" for u, p in zip(urls, problems) if p is not None]
    if bad:
        transient = any(p is not None and p.startswith(_TRANSIENT) for p in problems)
        error = ShardReadError if transient else ShardError
        raise error(f"{len(bad)} of {len(urls)} input shard(s) missing or unreadable:\n{listing(bad)}")


def find_samples(store: Store, url: str, keys: set[str], cfg: InputConfig) -> dict[str, Sample]:
    """The samples of one shard whose keys are in `keys` (usable or not), reading the shard front
    to back and stopping once all are found."""
    found: dict[str, Sample] = {}
    for sample in iter_shard_samples(store, url, cfg, dedupe=False):
        if sample.key in keys and sample.key not in found:
            found[sample.key] = sample
            if len(found) == len(keys):
                break
    return found
