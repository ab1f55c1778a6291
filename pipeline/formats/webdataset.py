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
``bad_uid``            a json ``uid`` that is not a string (``1`` and ``"1"`` would be one uid:
                       rather than guess, the sample is skipped)
``bad_key``            a member name that is not UTF-8 (the key cannot be stored or looked up)
``too_large``          an image with more than ``input.max_image_pixels`` pixels (read from its
                       header, before decoding) or a member over ``input.max_member_bytes``
``duplicate_uid``      a uid already seen earlier in the shard (or, in the embed stage, in an
                       earlier shard); the first occurrence wins
``truncated_tar``      the tar ends early or has a corrupt header: counted once per shard; the
                       samples before the damage are kept, the last sample read before the cut
                       is dropped (some of its members may be lost, its json/uid among them),
                       and the samples after it cannot be counted (they are unreadable)

A key may repeat in a shard (back to back, or later): each occurrence is its own sample (see
:func:`.tar.iter_tar_groups`), told apart by its uid and its position in the shard.

Damaged data and failed reads are different things: shards are read through
:meth:`~pipeline.storage.Store.open_checked`, which retries transient failures and raises
:class:`~pipeline.storage.ReadFailedError` rather than hand out fewer bytes, so ``truncated_tar``
only ever counts data that is really cut or corrupt.
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
from ..storage import ReadFailedError, Store, basename, expand_urls, is_transient
from .tar import BLOCK, iter_tar_groups, looks_like_tar

log = logging.getLogger(__name__)

MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
BAD_METADATA = "bad_metadata"
DUPLICATE_UID = "duplicate_uid"
TRUNCATED_TAR = "truncated_tar"
BAD_UID = "bad_uid"
BAD_KEY = "bad_key"
TOO_LARGE = "too_large"
SKIP_REASONS = (MISSING_IMAGE, UNDECODABLE_IMAGE, MISSING_CAPTION, BAD_METADATA, BAD_UID, BAD_KEY, TOO_LARGE,
                DUPLICATE_UID, TRUNCATED_TAR)

# s3fs reads ahead this much per request; a shard is read front to back, so big blocks are cheap.
READ_BLOCK_SIZE = 16 * 2**20


class ShardError(ConfigError):
    """Input shards that are missing or not tar archives, found before any work starts (a wrong
    input location: no retry can fix it, exit 2)."""


class ShardReadError(RuntimeError):
    """Input shards that could not be read for a reason a retry may fix (network, throttling)."""


class NotATarError(ShardError):
    """A shard whose first block is not a tar header (found when it is opened for reading)."""


# What makes a whole shard unusable, as opposed to some of its samples: no shard-level retry or
# skip-counting can recover samples from it. The embed stage fails the job naming the shard, or
# skips it (input.allow_missing_shards).
SHARD_FAILURES = (FileNotFoundError, PermissionError, NotATarError, ReadFailedError)


def shard_failure(err: BaseException, url: str = "") -> str:
    """A short reason for a shard-level failure (one of SHARD_FAILURES), without the shard's name."""
    if isinstance(err, FileNotFoundError):
        return "not found"
    if isinstance(err, PermissionError):
        return f"permission denied ({err})"
    return str(err).removeprefix(f"{url}: ") if url else str(err)


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


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # tarfile decodes undecodable name bytes as surrogates
        return False


def _build_sample(shard: str, index: int, key: str, members: dict[str, bytes], cfg: InputConfig,
                  oversized: tuple[str, ...] = ()) -> Sample:
    sample = Sample(shard=shard, index=index, key=key, uid=None, members=members)
    if not _utf8(key) or not all(_utf8(ext) for ext in members):
        sample.problem = BAD_KEY
        return sample
    if oversized:
        sample.problem = TOO_LARGE
        return sample
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
        if uid is not None and not isinstance(uid, str):
            sample.problem = BAD_UID
            return sample
        if uid:
            sample.uid = uid
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


def json_uid(sample: Sample, cfg: InputConfig) -> str:
    """The sample's json ``uid`` when it has one that is a non-empty string, else "" (the md5
    fallback uid is not a uid anyone else knows). Samples rejected before their json was read
    (``too_large``, ``bad_key``) still have it read here: a skip record is most useful by uid."""
    meta = sample.meta
    if meta is None and sample.problem != TRUNCATED_TAR:
        raw = next((data for ext, data in sample.members.items() if ext.lower() == cfg.meta_ext.lower()), None)
        try:
            meta = json.loads(raw.decode("utf-8")) if raw is not None else None
        except (UnicodeDecodeError, ValueError):
            meta = None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return uid if isinstance(uid, str) and _utf8(uid) else ""


def skip_record(sample: Sample, cfg: InputConfig, reason: str | None = None) -> tuple[str, str, str]:
    """(key, uid, reason) of a skipped sample, as :mod:`.embeddings` stores it: `reason` (default
    the sample's ``problem``); the key "" for a ``truncated_tar`` marker (no whole sample is
    behind it) and for a name that is not UTF-8 (it cannot be stored as a string)."""
    reason = reason or sample.problem
    if reason == TRUNCATED_TAR:
        return "", "", reason
    return (sample.key if _utf8(sample.key) else ""), json_uid(sample, cfg), reason


def iter_shard_samples(
    store: Store, url: str, cfg: InputConfig, dedupe: bool = True
) -> Iterator[Sample]:
    """Stream the samples of one shard in tar order, each with ``problem`` set when unusable.

    With ``dedupe`` a usable sample whose uid was already seen in this shard gets
    ``problem="duplicate_uid"`` (the first occurrence wins). Cross-shard duplicates are the
    caller's business (the embed stage keeps the occurrence in the earliest shard).

    Raises one of :data:`SHARD_FAILURES` when the shard as a whole cannot be read (missing, not a
    tar, or still failing after the storage retries): never a shortened shard.
    """
    seen: set[str] = set()
    index = 0
    with store.open_checked(url, block_size=READ_BLOCK_SIZE) as fh:
        problem = looks_like_tar(fh.read(BLOCK))
        if problem is not None:
            raise NotATarError(f"{url}: {problem}")
        fh.seek(0)
        for group in iter_tar_groups(fh, cfg.max_member_bytes):
            if group.error is not None:
                log.warning("shard %s is damaged after %d samples (%s): keeping the samples before the damage",
                            url, index, group.error)
                yield Sample(shard=url, index=index, key=group.key, uid=None, members=group.members,
                             problem=TRUNCATED_TAR)
                return
            sample = _build_sample(url, index, group.key, group.members, cfg, group.oversized)
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


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the configured limit (found from the header, nothing decoded)."""


def decode_image(data: bytes, max_pixels: int | None = None):
    """Decode image bytes to an RGB PIL image, fully loaded.

    ImageTooLargeError when the header announces more than `max_pixels` pixels (checked after
    ``Image.open``, which reads only the header, before any pixel is decoded); ImageDecodeError
    when PIL cannot decode it. Any mode PIL reads (palette with transparency, LA, CMYK, 16-bit
    grey, 1-bit, float) comes out as 8-bit RGB; PIL's warnings about them are not ours to print.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Our own limit replaces PIL's decompression-bomb check (a warning above 89 Mpx, an
            # error above 179 Mpx): it is configurable and counted. PIL's other warnings (palette
            # transparency, corrupt EXIF) describe images that decode fine.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{width}x{height} = {width * height} pixels > {max_pixels}")
            image.load()
            image = _to_rgb(image)
        return image
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(str(err)) from None
    except Exception as err:  # PIL raises a zoo of types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(f"{type(err).__name__}: {err}") from None


def _to_rgb(image):
    """8-bit RGB from any PIL mode: transparency through RGBA (what PIL asks for palette images),
    16-bit and float grey scaled to 8 bits rather than clipped."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 257.0
        elif image.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # float images are conventionally 0..1 (or already 0..255)
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


# -- shard lists --------------------------------------------------------------------------------

def shard_urls(cfg: InputConfig) -> list[str]:
    """The job's input shards, in the order that defines part numbers (part-NNNNN = index)."""
    urls = expand_urls(cfg.shards)
    if not urls:
        raise ShardError("input.shards expands to no shard URLs")
    return urls


def _probe(store: Store, url: str) -> tuple[str, bool] | None:
    """None when `url` is a readable tar (or compressed tar), else (why not, whether a retry may help)."""
    try:
        # through the checked reader: a read that comes back short or empty is retried, never taken
        # for a file that is not a tar (that is exit 2, and no retry would ever be tried)
        with store.open_checked(url, block_size=2 * BLOCK) as fh:  # not s3fs's 50 MB read-ahead
            head = fh.read(BLOCK)
    except FileNotFoundError:
        return "not found", False
    except PermissionError as err:
        return f"permission denied ({err})", False
    except ReadFailedError as err:
        return f"unreadable: {str(err).removeprefix(url + ': ')}", True
    except Exception as err:  # noqa: BLE001 - an unexpected error: report it, don't crash the probe
        return f"unreadable ({type(err).__name__}: {err})", is_transient(err)
    problem = looks_like_tar(head)
    return (problem, False) if problem else None


def listing(lines: list[str], limit: int = 20) -> str:
    """Indented lines for an error message naming bad inputs: the first `limit`, then a count."""
    shown = "\n".join(f"  {line}" for line in lines[:limit])
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return shown + more


def verify_shards(store: Store, urls: list[str], max_workers: int = 16, allow_missing: bool = False) -> dict[str, str]:
    """Check up front that every shard exists and starts with a tar header: one small ranged read
    per shard (retried like every read), in parallel threads. Returns {url: problem} of the bad
    shards. Unless `allow_missing`, raises ShardError naming every bad shard (the first 20), or
    ShardReadError when some could not be read for a reason a retry may fix."""
    if not urls:
        raise ShardError("no input shards given")
    with ThreadPoolExecutor(max_workers=min(max_workers, len(urls))) as pool:
        problems = list(pool.map(lambda u: _probe(store, u), urls))
    bad = {u: p[0] for u, p in zip(urls, problems) if p is not None}
    if bad:
        lines = [f"{u}: {p}" for u, p in bad.items()]
        if allow_missing:
            log.warning("%d of %d input shard(s) missing or unreadable; skipping them (input.allow_missing_shards):"
                        "\n%s", len(bad), len(urls), listing(lines))
            return bad
        transient = any(p is not None and p[1] for p in problems)
        error = ShardReadError if transient else ShardError
        raise error(f"{len(bad)} of {len(urls)} input shard(s) missing or unreadable "
                    f"(input.allow_missing_shards: true skips them):\n{listing(lines)}")
    return bad


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
