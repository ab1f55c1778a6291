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
from typing import BinaryIO, Iterator

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


def iter_tar_groups(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
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


def looks_like_tar(head: bytes) -> str | None:
    """None when the first block of a file can start a tar (or a compressed tar), else why not."""
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return None  # compressed tar: checked when read
    if len(head) < BLOCK:
        return f"not a tar archive ({len(head)} bytes)"
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
