"""The one tar reader and the one deterministic tar writer (input shards, output shards, the demo
pool and the test pools all go through these two).

Reading groups consecutive members into samples by key, the WebDataset rule: the member path up
to the first '.' of its basename is the key, the rest the extension (``000123.jpg``,
``000123.seg.png``). Writing fixes every header field that is not content (mtime 0, uid/gid 0,
empty owner names, mode 0644), so the same members give the same bytes on any machine.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from typing import BinaryIO, Iterator, NamedTuple

# WebDataset's own key/extension split (webdataset.tariterators.base_plus_ext).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
BLOCK = tarfile.BLOCKSIZE


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, or None for names without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def _archive_ends_cleanly(tf: tarfile.TarFile) -> bool:
    """True when the block after the last member is a zero (end-of-archive) block.

    tarfile ends iteration *silently* on a header cut short or corrupt after the first member;
    this check is what tells a truncated shard from a complete one.
    """
    fileobj = tf.fileobj
    fileobj.seek(tf.offset)
    block = fileobj.read(BLOCK)
    return len(block) == BLOCK and block.count(0) == BLOCK


class TarGroup(NamedTuple):
    """One sample's members as read from a tar (see :func:`iter_tar_groups`)."""

    key: str
    members: dict[str, bytes]  # extension -> bytes, in tar order
    error: str | None = None  # set on the last group when the archive is damaged
    oversized: tuple[str, ...] = ()  # extensions whose data exceeded max_member_bytes (not read)


def iter_tar_groups(fileobj: BinaryIO, max_member_bytes: int | None = None) -> Iterator[TarGroup]:
    """Yield a :class:`TarGroup` for each run of consecutive members sharing a key; if the
    archive is damaged, the last group carries ``error`` (and the members read before the damage).

    A key that repeats *back to back* (``d1.jpg d1.txt d1.jpg d1.txt``) is two samples, not one:
    a member whose extension the current group already has starts a new group with the same key,
    so no sample's members are merged into another's (WebDataset would raise). A member larger
    than `max_member_bytes` is not read (its data is skipped, memory stays bounded); its
    extension is listed in ``oversized``.

    Reads sequentially through a seekable file (s3fs files are, via range requests), holding one
    sample's members at a time.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    oversized: list[str] = []
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
            if member_key != key or ext in members or ext in oversized:
                # the previous sample is complete as soon as a new one starts: hand it out before
                # reading data that may turn out truncated
                if key is not None:
                    yield TarGroup(key, members, None, tuple(oversized))
                key, members, oversized = member_key, {}, []
            if max_member_bytes is not None and info.size > max_member_bytes:
                oversized.append(ext)  # tarfile seeks past the data on the next header
                continue
            members[ext] = tf.extractfile(info).read()
        clean = _archive_ends_cleanly(tf)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, ValueError) as err:
        # damaged *data*: a cut or corrupt archive (EOFError/BadGzipFile: compressed streams cut
        # short; ValueError: malformed numeric header fields). Read failures (network, auth, a
        # short read) are raised by the reader underneath as other exceptions and propagate: a
        # transient failure must fail the shard, never shorten it silently.
        yield TarGroup(key or "", members, f"{type(err).__name__}: {err}", tuple(oversized))
        return
    if not clean:
        yield TarGroup(key or "", members, "archive ends without an end-of-archive block (truncated or corrupt header)",
                       tuple(oversized))
        return
    if key is not None:
        yield TarGroup(key, members, None, tuple(oversized))


def looks_like_tar(head: bytes) -> str | None:
    """None when the first block of a file can start a tar (or a compressed tar), else why not."""
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return None  # compressed tar: checked when read
    if len(head) < BLOCK:
        return f"not a tar archive ({len(head)} bytes)"
    if head.count(0) == BLOCK:
        return None  # an end-of-archive block first: a valid, empty archive
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        return f"not a tar archive ({err})"
    return None


class TarWriter:
    """Deterministic tar writing: ``with TarWriter(fileobj_or_path) as tar: tar.add(name, data)``.

    GNU format (member names of any length); every non-content header field fixed. ``offset`` is
    where the next member's header will start (test pools use it to cut an archive mid-member).
    """

    def __init__(self, target: str | BinaryIO):
        if isinstance(target, str):
            self._tar = tarfile.open(target, "w", format=tarfile.GNU_FORMAT)
        else:
            self._tar = tarfile.open(fileobj=target, mode="w", format=tarfile.GNU_FORMAT)

    @property
    def offset(self) -> int:
        return self._tar.offset

    def add(self, name: str, data: bytes) -> int:
        """Append one member; returns the offset of its header."""
        offset = self._tar.offset
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        return offset

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
